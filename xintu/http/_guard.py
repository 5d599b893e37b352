"""Who gets in, and how often: API keys, admin keys, the client's address, rate limits.

:func:`install_guard` registers one ``before_request`` hook. For every request it

1. resolves the client's IP: the direct peer, or, when that peer is one of
   ``security.trusted_proxies``, the rightmost address of ``X-Forwarded-For`` that is
   not a trusted proxy (everything left of it was written by the client and proves
   nothing);
2. matches ``Authorization: Bearer KEY`` against ``security.api_key_sha256`` and
   ``security.admin_key_sha256`` by comparing SHA-256 digests in constant time (the
   keys themselves are never held, logged or compared as text);
3. charges the client's token bucket (``[ratelimit]``) and answers 429
   ``rate_limited`` with an integer ``Retry-After`` when it is empty;
4. refuses, with API keys configured, every endpoint but ``/healthz`` and the album
   page's static shell (``/``, ``/assets/*``, which hold no data) without a valid
   key (401 ``unauthorized``, ``WWW-Authenticate: Bearer``), and, with admin keys
   configured, the admin endpoints (``/metrics``, ``/api/v1/stats``, ``/admin…``)
   without an admin key (401 without any valid key, 403 ``forbidden`` with an
   ordinary one).

The client's identity, which the rate limiter and the idempotency keys are scoped
by, is its API key, else its ``X-User-ID``, else its IP address. ``X-User-ID`` is
the client's own claim: it counts only while no API keys are configured (with keys,
a request without a valid key is limited by its IP). Identities are hashed, so that
neither a key's digest nor a user id is kept in the bucket table or the store.
``/healthz`` is never limited nor authenticated, ``/readyz`` never limited.

The hook stores the outcome in ``g.client`` (a :class:`Client`) and the resolved
address in ``g.client_ip``, for the request log and the idempotency layer.

:func:`install_guard` also replaces the app's request class with one whose body
counts every byte received against ``MAX_CONTENT_LENGTH``: Quart's own check counts
only the bytes buffered at the moment, and the multipart parser consumes the buffer
as it goes, so a chunked upload without ``Content-Length`` was read (and spooled to
disk) whole before any limit applied. Now it is cut off with 413 as soon as it
passes ``server.max_body_bytes``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Literal

import structlog
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope
from quart import Response, g, request
from quart.formparser import FormDataParser
from quart_trio import QuartTrio
from quart_trio.wrappers.request import TrioBody, TrioRequest
from werkzeug.datastructures import iter_multi_items
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import default_stream_factory

from .._config import Config
from ..errors import ConfigError, Forbidden, RateLimited, Unauthorized, XintuError
from ._cors import is_preflight
from ._respond import error_response

__all__ = [
    "ADMIN_PATHS",
    "Client",
    "Guard",
    "GuardStatistics",
    "KeyRing",
    "RateLimiter",
    "TrustedProxies",
    "alias_scope",
    "client_of",
    "install_guard",
]

log = structlog.get_logger("xintu.guard")

Clock = Callable[[], float]

# Endpoints that need an admin key when admin keys are configured.
ADMIN_PATHS = frozenset({"/metrics", "/api/v1/stats"})
_ADMIN_PREFIX = "/admin"
# Never authenticated, never rate-limited: the liveness probe.
_OPEN_PATHS = frozenset({"/healthz", "/"})
# The album page's static files hold no data; the page sends the key on API calls.
_OPEN_PREFIX = "/assets/"
# Authenticated like everything else, but never rate-limited: the readiness probe.
_UNLIMITED_PATHS = frozenset({"/healthz", "/readyz"})

_IdentityKind = Literal["key", "user", "ip"]
_IDENTITY_SALT = b"xintu-client\0"


def _digest_id(kind: _IdentityKind, value: bytes) -> str:
    """``kind:`` and 40 hex of a salted SHA-256: fits the store's 64-character scope."""
    digest = hashlib.sha256(_IDENTITY_SALT + value).hexdigest()
    return f"{kind}:{digest[:40]}"


@dataclass(frozen=True, slots=True)
class Client:
    """The client of one request, as far as the guard could tell.

    ``key_id`` names the matching API key without revealing it (a hash of its
    digest); ``identity`` is the hashed key the rate limiter and idempotency keys
    are scoped by.
    """

    ip: str
    identity: str
    key_id: str | None = None
    admin: bool = False


def client_of(user_id: str | None = None) -> Client:
    """``g.client`` as set by the guard; without a guard, one built from the request."""
    client = g.get("client")
    if isinstance(client, Client):
        return client
    ip = request.remote_addr or "unknown"
    uid = user_id if user_id is not None else request.headers.get("X-User-ID")
    if uid:
        return Client(ip=ip, identity=_digest_id("user", uid.encode("latin-1", "replace")))
    return Client(ip=ip, identity=_digest_id("ip", ip.encode()))


def alias_scope(user_id: str | None = None) -> str:
    """The scope a client's aliases live in (DESIGN §2, client-named photos): its API
    key when keys are configured, else its user id (*user_id*, from the header or the
    body), else its address; hashed like every identity."""
    client = client_of(user_id)
    if client.key_id is not None:
        return client.identity
    if user_id:
        return _digest_id("user", user_id.encode("utf-8", "replace"))
    return client.identity


# --- API keys ------------------------------------------------------------------------


class KeyRing:
    """API keys by their SHA-256 digests; :meth:`match` compares in constant time."""

    def __init__(self, digests: Iterable[str], *, setting: str) -> None:
        keys: list[bytes] = []
        for text in digests:
            value = text.strip().lower()
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ConfigError(setting, "each entry must be a SHA-256 digest (64 hex)")
            keys.append(bytes.fromhex(value))
        self._keys = tuple(keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def match(self, token: bytes) -> bytes | None:
        """The digest of *token* if it is one of the keys, else ``None``.

        Every configured digest is compared, with :func:`hmac.compare_digest`, so the
        time taken does not depend on which key (if any) matched, nor where the
        digests first differ.
        """
        digest = hashlib.sha256(token).digest()
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(digest, key)
        return digest if found else None


def bearer_token(header: str | None) -> bytes | None:
    """The token of ``Authorization: Bearer TOKEN`` as raw bytes, else ``None``.

    Header values reach Quart decoded as Latin-1, so encoding back to Latin-1 gives
    the bytes the client sent: what ``printf %s "$KEY" | sha256sum`` hashes.
    """
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        return token.encode("latin-1")
    except UnicodeEncodeError:
        return None


# --- client address ------------------------------------------------------------------

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_address(text: str) -> _Address | None:
    """An address from a peer or ``X-Forwarded-For`` entry (ports and brackets allowed)."""
    value = text.strip().strip('"')
    if value.startswith("["):  # [v6]:port
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:  # v4:port
        value = value.partition(":")[0]
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedProxies:
    """The configured proxies; :meth:`client_ip` applies them to one request."""

    def __init__(self, entries: Iterable[str]) -> None:
        networks: list[_Network] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ConfigError(
                    "security.trusted_proxies", f"not an IP address or network: {entry!r}"
                ) from None
        self._networks = tuple(networks)

    def trusted(self, addr: _Address) -> bool:
        return any(addr in net for net in self._networks)

    def client_ip(self, peer: str | None, forwarded_for: Sequence[str]) -> str:
        """The client's address: *peer*, unless *peer* is a trusted proxy; then the
        rightmost ``X-Forwarded-For`` hop that is not one (the leftmost if all are).
        A malformed hop stops the walk at the last good address."""
        peer_addr = _parse_address(peer or "")
        if peer_addr is None:
            return peer or "unknown"
        if not self._networks or not self.trusted(peer_addr):
            return str(peer_addr)
        hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
        current = peer_addr
        for hop in reversed(hops):
            addr = _parse_address(hop)
            if addr is None:
                break
            current = addr
            if not self.trusted(addr):
                break
        return str(current)


# --- rate limiting -------------------------------------------------------------------


class RateLimiter:
    """A token bucket per client: ``burst`` tokens, refilled at ``rate_per_s``.

    At most ``max_clients`` buckets are kept; the least recently seen client is
    forgotten first (and starts again with a full bucket). ``rate_per_s = 0``
    disables limiting. *clock* is Trio's clock by default, so tests drive it with
    ``autojump_clock``.
    """

    def __init__(
        self, rate_per_s: float, burst: int, max_clients: int, *, clock: Clock = trio.current_time
    ) -> None:
        self._rate = float(rate_per_s)
        self._burst = float(burst)
        self._max_clients = max_clients
        self.clock = clock  # replaceable (tests)
        # identity -> (tokens, time of that count)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.admitted = 0
        self.limited = 0
        self.evicted = 0

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, identity: str) -> float:
        """Take one token for *identity*: ``0.0`` if it had one, else the seconds until
        it will have one (nothing is taken then)."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        state = self._buckets.get(identity)
        if state is None:
            tokens = self._burst
            while len(self._buckets) >= self._max_clients:
                self._buckets.popitem(last=False)
                self.evicted += 1
        else:
            tokens = min(self._burst, state[0] + max(0.0, now - state[1]) * self._rate)
            self._buckets.move_to_end(identity)
        if tokens >= 1.0:
            self._buckets[identity] = (tokens - 1.0, now)
            self.admitted += 1
            return 0.0
        self._buckets[identity] = (tokens, now)
        self.limited += 1
        return (1.0 - tokens) / self._rate


# --- the hook ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GuardStatistics:
    """Totals since start: requests refused by the guard, and the bucket table."""

    unauthorized: int
    forbidden: int
    rate_limited: int
    clients_tracked: int
    clients_evicted: int


def _is_admin_path(path: str) -> bool:
    path = path.rstrip("/") or "/"
    return path in ADMIN_PATHS or path == _ADMIN_PREFIX or path.startswith(_ADMIN_PREFIX + "/")


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
                identity = _digest_id("key", digest)
                return Client(ip=ip, identity=identity, key_id=identity[4:20], admin=bool(admin))
        if user_id and not self.auth_required:
            return Client(ip=ip, identity=_digest_id("user", user_id.encode("latin-1", "replace")))
        return Client(ip=ip, identity=_digest_id("ip", ip.encode()))

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
        if self.admin_keys and _is_admin_path(path) and not client.admin:
            if client.key_id is None:
                self._unauthorized += 1
                return Unauthorized("an admin API key is required (Authorization: Bearer KEY)")
            self._forbidden += 1
            return Forbidden("this endpoint needs an admin API key")
        return None

    async def before_request(self) -> Response | None:
        """The hook: sets ``g.client`` and ``g.client_ip``; answers refusals itself."""
        client = self.identify(
            peer=request.remote_addr,
            forwarded_for=request.headers.getlist("X-Forwarded-For"),
            authorization=request.headers.get("Authorization"),
            user_id=request.headers.get("X-User-ID"),
        )
        g.client = client
        g.client_ip = client.ip
        if is_preflight():
            # A CORS preflight carries no key by the CORS rules and no data comes
            # back: the CORS layer answers it (see :mod:`._cors`).
            return None
        refusal = self.check(client, request.path)
        if refusal is None:
            return None
        rid = g.get("request_id")
        response = error_response(refusal, rid if isinstance(rid, str) else "")
        if isinstance(refusal, Unauthorized):
            challenge = 'Bearer realm="xintu"'
            if request.headers.get("Authorization"):
                challenge += ', error="invalid_token"'
            response.headers["WWW-Authenticate"] = challenge
        return response


# --- the body limit ------------------------------------------------------------------


class _CountingBody(TrioBody):
    """A request body whose limit counts every byte received, not just those buffered."""

    def __init__(self, expected_content_length: int | None, max_content_length: int | None):
        super().__init__(expected_content_length, max_content_length)
        self._received = 0

    def append(self, data: bytes) -> None:
        if not data or self._must_raise is not None:
            return
        self._received += len(data)
        limit = self._max_content_length
        if limit is not None and self._received > limit:
            self._data.clear()
            self._must_raise = RequestEntityTooLarge()
            self.set_complete()
            return
        super().append(data)

    async def __anext__(self) -> bytes:
        try:
            return await super().__anext__()
        except StopAsyncIteration:
            # Cut off while a reader waited: an error, not the end of the body.
            if self._must_raise is not None:
                raise self._must_raise from None
            raise


class _LimitedRequest(TrioRequest):
    """Counts every body byte (:class:`_CountingBody`) and closes the spooled files
    of multipart parts that did not make it into ``request.files`` (the body went
    over a limit or was malformed part-way): Quart closes only the files it keeps,
    and left the others to the garbage collector."""

    body_class = _CountingBody

    def make_form_data_parser(self) -> FormDataParser:
        spooled: list[IO[bytes]] = []
        self._spooled = spooled

        def stream_factory(
            total_content_length: int | None,
            content_type: str | None,
            filename: str | None,
            content_length: int | None = None,
        ) -> IO[bytes]:
            stream = default_stream_factory(
                total_content_length, content_type, filename, content_length
            )
            spooled.append(stream)
            return stream

        return self.form_data_parser_class(
            max_content_length=self.max_content_length,
            max_form_memory_size=self.max_form_memory_size,
            max_form_parts=self.max_form_parts,
            cls=self.parameter_storage_class,
            stream_factory=stream_factory,
        )

    async def _load_form_data(self) -> None:
        try:
            await super()._load_form_data()
        finally:
            # Parts of a body that failed (or was given up silently as malformed)
            # are in no FileStorage; the request closes only those it keeps.
            kept = {id(f.stream) for _, f in iter_multi_items(self._files or ())}
            for stream in getattr(self, "_spooled", ()):
                if id(stream) not in kept:
                    stream.close()


# Bound on the shielded last send of a response (normally microseconds).
_FINAL_SEND_TIMEOUT_S = 5.0

_AsgiApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


def _close_cut_off_uploads(inner: _AsgiApp) -> _AsgiApp:
    """Let Hypercorn close a connection whose request body was refused unread.

    A response sent before the whole body arrived (413, 401, 429) leaves Hypercorn
    to close the connection, as HTTP/1.1 requires, from inside the app's last
    ``send``. But quart-trio cancels the app's tasks as soon as the request ends,
    which cancels that close half-way: the connection stayed open and Hypercorn
    read and discarded the rest of the upload, however long. Shielding the last
    send (bounded) lets the close finish, so the upload is cut off at the limit.
    """

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return

        async def send_last_shielded(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True), trio.move_on_after(_FINAL_SEND_TIMEOUT_S):
                    await send(message)
                return
            await send(message)

        await inner(scope, receive, send_last_shielded)

    return app


def install_guard(app: QuartTrio, config: Config, *, clock: Clock | None = None) -> Guard:
    """Install the guard on *app* (before any hook that needs ``g.client``).

    Raises :class:`~xintu.errors.ConfigError` for a malformed key digest or proxy.
    *clock* replaces Trio's clock for the rate limiter (tests).
    """
    guard = Guard(config, clock=clock or trio.current_time)
    app.request_class = _LimitedRequest
    app.asgi_app = _close_cut_off_uploads(app.asgi_app)  # type: ignore[method-assign,assignment]
    app.before_request(guard.before_request)
    app.extensions["xintu.guard"] = guard
    if guard.auth_required or guard.admin_keys:
        log.info(
            "guard_keys",
            api_keys=len(config.security.api_key_sha256),
            admin_keys=len(config.security.admin_key_sha256),
        )
    return guard
