"""Who gets in, and how often: the one ``before_request`` hook that applies
client identity (:mod:`._identity`), API keys (:mod:`._auth`) and rate limits
(:mod:`._ratelimit`); it also installs the body limit (:mod:`._body_limit`).

:func:`install_guard` registers the hook. For every request it

1. resolves the client's IP and identity (:class:`~._identity.TrustedProxies`,
   :class:`~._identity.Client`);
2. matches ``Authorization: Bearer KEY`` against ``security.api_key_sha256`` and
   ``security.admin_key_sha256`` (:class:`~._auth.KeyRing`, constant time);
3. charges the client's token bucket (:class:`~._ratelimit.RateLimiter`) and
   answers 429 ``rate_limited`` with an integer ``Retry-After`` when it is empty;
4. refuses, with API keys configured, every endpoint but ``/healthz`` and the album
   page's static shell (``/``, ``/assets/*``, which hold no data) without a valid
   key (401 ``unauthorized``, ``WWW-Authenticate: Bearer``), and, with admin keys
   configured, the admin endpoints (``/metrics``, ``/api/v1/stats``, ``/admin…``)
   without an admin key (401 without any valid key, 403 ``forbidden`` with an
   ordinary one).

``/healthz`` is never limited nor authenticated, ``/readyz`` never limited.

The hook (:meth:`Guard.admit`, which check-cache served below Quart runs too, see
:mod:`._hot`) stores the outcome in ``g.client`` (a :class:`~._identity.Client`) and the
resolved address in ``g.client_ip``, for the request log and the idempotency layer,
which read it through :func:`client_of` and :func:`alias_scope` (re-exported here).

:func:`install_guard` also replaces the app's request class with
:class:`~._body_limit.LimitedRequest`, whose body counts every byte received, so an
upload is cut off with 413 as soon as it passes ``server.max_body_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import trio
from quart import Request, Response, g, request
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers

from .._config import Config
from ..errors import Forbidden, RateLimited, Unauthorized, XintuError
from ._auth import KeyRing, bearer_token, is_admin_path
from ._body_limit import LimitedRequest, close_cut_off_uploads
from ._cors import is_preflight
from ._identity import Client, TrustedProxies, digest_id
from ._identity import alias_scope as alias_scope
from ._identity import client_of as client_of
from ._ratelimit import Clock, RateLimiter
from ._respond import error_response

__all__ = ["Guard", "GuardStatistics", "alias_scope", "client_of", "install_guard"]

log = structlog.get_logger("xintu.guard")

# Never authenticated, never rate-limited: the liveness probe.
_OPEN_PATHS = frozenset({"/healthz", "/"})
# The album page's static files hold no data; the page sends the key on API calls.
_OPEN_PREFIX = "/assets/"
# Authenticated like everything else, but never rate-limited: the readiness probe.
_UNLIMITED_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass(frozen=True, slots=True)
class GuardStatistics:
    """Totals since start: requests refused by the guard, and the bucket table."""

    unauthorized: int
    forbidden: int
    rate_limited: int
    clients_tracked: int
    clients_evicted: int


class Guard:
    """Authentication, client address and rate limiting for one app; see the module."""

    def __init__(self, config: Config, *, clock: Clock = trio.current_time) -> None:
        sec = config.security
        self.api_keys = KeyRing(sec.api_key_sha256, setting="security.api_key_sha256")
        self.admin_keys = KeyRing(sec.admin_key_sha256, setting="security.admin_key_sha256")
        self.proxies = TrustedProxies(sec.trusted_proxies)
        rl = config.ratelimit
        self.limiter = RateLimiter(rl.rate_per_s, rl.burst, rl.max_clients, clock=clock)
        self._unauthorized = 0
        self._forbidden = 0

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys)

    def statistics(self) -> GuardStatistics:
        return GuardStatistics(
            unauthorized=self._unauthorized,
            forbidden=self._forbidden,
            rate_limited=self.limiter.limited,
            clients_tracked=len(self.limiter),
            clients_evicted=self.limiter.evicted,
        )

    def identify(
        self,
        *,
        peer: str | None,
        forwarded_for: Sequence[str],
        authorization: str | None,
        user_id: str | None,
    ) -> Client:
        """The :class:`Client` behind these request properties (no side effects)."""
        ip = self.proxies.client_ip(peer, forwarded_for)
        token = bearer_token(authorization) if (self.api_keys or self.admin_keys) else None
        if token is not None:
            admin = self.admin_keys.match(token)
            ordinary = self.api_keys.match(token)  # both rings, always: same time either way
            digest = admin or ordinary
            if digest is not None:
                identity = digest_id("key", digest)
                return Client(ip=ip, identity=identity, key_id=identity[4:20], admin=bool(admin))
        if user_id and not self.auth_required:
            return Client(ip=ip, identity=digest_id("user", user_id.encode("latin-1", "replace")))
        return Client(ip=ip, identity=digest_id("ip", ip.encode()))

    def check(self, client: Client, path: str) -> XintuError | None:
        """The error that refuses *client* on *path*, or ``None`` (charges its bucket)."""
        if path in _OPEN_PATHS or path.startswith(_OPEN_PREFIX):
            return None
        if path not in _UNLIMITED_PATHS:
            wait_s = self.limiter.acquire(client.identity)
            if wait_s > 0.0:
                return RateLimited(
                    "too many requests; slow down", retry_after_s=float(math.ceil(wait_s))
                )
        if self.auth_required and client.key_id is None:
            self._unauthorized += 1
            return Unauthorized("a valid API key is required (Authorization: Bearer KEY)")
        if self.admin_keys and is_admin_path(path) and not client.admin:
            if client.key_id is None:
                self._unauthorized += 1
                return Unauthorized("an admin API key is required (Authorization: Bearer KEY)")
            self._forbidden += 1
            return Forbidden("this endpoint needs an admin API key")
        return None

    async def before_request(self) -> Response | None:
        """The hook: :meth:`admit` for the current request."""
        # The request is looked up once (each ``request.`` goes through Quart's
        # context-local proxy).
        req: Request = request._get_current_object()  # type: ignore[attr-defined]
        method = req.method
        return self.admit(
            g._get_current_object(),
            path=req.path,
            peer=req.remote_addr,
            headers=req.headers,
            preflight=method == "OPTIONS" and is_preflight(),
        )

    def admit(
        self, ctx: Any, *, path: str, peer: str | None, headers: Headers, preflight: bool
    ) -> Response | None:
        """Identify the client of one request and decide on it: sets ``client`` and
        ``client_ip`` on *ctx* (the request's ``g``, or its state below Quart, see
        :mod:`._hot`) and returns the refusal to answer, or ``None``."""
        client = self.identify(
            peer=peer,
            forwarded_for=headers.getlist("X-Forwarded-For") if self.proxies else (),
            authorization=headers.get("Authorization"),
            user_id=headers.get("X-User-ID"),
        )
        ctx.client = client
        ctx.client_ip = client.ip
        if preflight:
            # A CORS preflight carries no key by the CORS rules and no data comes
            # back: the CORS layer answers it (see :mod:`._cors`).
            return None
        refusal = self.check(client, path)
        if refusal is None:
            return None
        rid = getattr(ctx, "request_id", None)
        response = error_response(refusal, rid if isinstance(rid, str) else "")
        if isinstance(refusal, Unauthorized):
            challenge = 'Bearer realm="xintu"'
            if headers.get("Authorization"):
                challenge += ', error="invalid_token"'
            response.headers["WWW-Authenticate"] = challenge
        return response


def install_guard(app: QuartTrio, config: Config, *, clock: Clock | None = None) -> Guard:
    """Install the guard on *app* (before any hook that needs ``g.client``).

    Raises :class:`~xintu.errors.ConfigError` for a malformed key digest or proxy.
    *clock* replaces Trio's clock for the rate limiter (tests).
    """
    guard = Guard(config, clock=clock or trio.current_time)
    app.request_class = LimitedRequest
    app.asgi_app = close_cut_off_uploads(app.asgi_app)  # type: ignore[method-assign,assignment]
    app.before_request(guard.before_request)
    app.extensions["xintu.guard"] = guard
    if guard.auth_required or guard.admin_keys:
        log.info(
            "guard_keys",
            api_keys=len(config.security.api_key_sha256),
            admin_keys=len(config.security.admin_key_sha256),
        )
    return guard
