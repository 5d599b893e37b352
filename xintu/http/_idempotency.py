"""``Idempotency-Key`` on every POST, after the IETF draft (httpapi-idempotency-key-header).

A client that may retry a POST sends ``Idempotency-Key: <1..255 visible ASCII>``.
The key is scoped per client (its API key, else ``X-User-ID``, else its IP: the
identity the guard resolved, see :mod:`xintu.http._guard`) and lives in the store's
``idempotency_keys`` table, so it holds across replicas and restarts::

    absent ──first request──▶ in_flight ──answer < 500──▶ completed ──ttl_s──▶ expired
                                  │
                                  └── 5xx, cancelled, crashed ──▶ released (absent)

The request *fingerprint* is a SHA-256 of what the request means, not of its bytes
(:mod:`._fingerprint`), so that any client can retry by building the request again:
a new multipart boundary or another JSON key order is the same request.

A request carrying a key that is

- new (or expired): claims it, runs, and its answer (status, body, content type)
  is stored, unless the status is 5xx: then the claim is released so that a retry
  can succeed;
- completed with the same fingerprint: gets the stored answer byte for byte, with
  ``Idempotency-Replayed: true``, and runs nothing (no classification, no hit, no
  request-log row);
- in use with a different fingerprint: 422 ``idempotency_key_reused``;
- in flight with the same fingerprint: 409 ``idempotency_key_in_flight`` with
  ``Retry-After: 1``. We answer at once rather than wait for the first request:
  waiting would hold a connection and a worker per retry for up to the request
  deadline, across replicas it would mean polling the store, and a client that
  retries because it timed out would time out again; the first request's result is
  cached by image hash anyway, so a retry after 409 is cheap.

A claim older than ``idempotency.lease_s`` that is still in flight was left by a
process that died mid-request; a retry takes it over. A malformed key is 422
``validation_failed``. When the store cannot be reached the request runs without
idempotency (logged and counted): classification is idempotent by content hash
anyway, and refusing keyed requests would turn a store outage into an outage of
the API.

Streamed answers (``Accept: application/x-ndjson``) are recorded as they are sent
and stored when the stream ends; a retry racing the very end of a stream may see
409.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import structlog
import trio
from quart import Response, g, request
from quart.wrappers.response import DataBody, ResponseBody
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers

from .._config import Config
from ..errors import IdempotencyInFlight, IdempotencyKeyReused, StoreError, ValidationFailed
from ..store import IdempotencyRecord, Store
from ._fingerprint import fingerprint as request_fingerprint
from ._guard import client_of
from ._respond import error_response, sized_work

__all__ = ["REPLAYED_HEADER", "Idempotency", "IdempotencyStatistics", "install_idempotency"]

log = structlog.get_logger("xintu.idempotency")

REPLAYED_HEADER = "Idempotency-Replayed"
_KEY_HEADER = "Idempotency-Key"
_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")
# Bound on the shielded store calls made while a request is being torn down.
_CLEANUP_TIMEOUT_S = 5.0

WallClock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class _Claim:
    """This request holds (scope, key) in flight; ``settled`` once answered for."""

    scope: str
    key: str
    settled: bool = False


@dataclass(frozen=True, slots=True)
class IdempotencyStatistics:
    """Totals since start."""

    claimed: int
    completed: int
    released: int
    replayed: int
    in_flight_conflicts: int
    reused: int
    taken_over: int
    store_errors: int


class Idempotency:
    """The hooks; see the module docstring. One per app."""

    def __init__(self, app: QuartTrio, config: Config, *, now: WallClock = _utcnow) -> None:
        self._app = app
        self._ttl_s = config.idempotency.ttl_s
        self._max_json_bytes = config.server.max_json_bytes
        self._lease = timedelta(seconds=config.idempotency.lease_s)
        self.now = now  # the wall clock; replaceable (tests)
        self._claimed = 0
        self._completed = 0
        self._released = 0
        self._replayed = 0
        self._conflicts = 0
        self._reused = 0
        self._taken_over = 0
        self._store_errors = 0

    def statistics(self) -> IdempotencyStatistics:
        return IdempotencyStatistics(
            claimed=self._claimed,
            completed=self._completed,
            released=self._released,
            replayed=self._replayed,
            in_flight_conflicts=self._conflicts,
            reused=self._reused,
            taken_over=self._taken_over,
            store_errors=self._store_errors,
        )

    def _store(self) -> Store | None:
        store = getattr(self._app, "store", None)
        return store if isinstance(store, Store) else None

    # --- before: claim, refuse or replay ----------------------------------------------

    @staticmethod
    def applies(method: str, headers: Headers) -> bool:
        """Whether this layer has anything to do with a request: a POST with an
        ``Idempotency-Key`` (the check-cache route below Quart, :mod:`._hot`, leaves
        every other request to Quart and this layer)."""
        return method == "POST" and _KEY_HEADER in headers

    async def before_request(self) -> Response | None:
        if not self.applies(request.method, request.headers):
            return None
        keys = request.headers.getlist(_KEY_HEADER)
        if len(keys) > 1:
            raise ValidationFailed("send one Idempotency-Key header, not several")
        key = keys[0]
        if _KEY_RE.fullmatch(key) is None:
            raise ValidationFailed("Idempotency-Key must be 1 to 255 visible ASCII characters")
        store = self._store()
        if store is None:
            return None
        body = await request.get_data(cache=True, as_text=False, parse_form_data=False)
        method, path, query = request.method, request.path, request.query_string
        content_type = request.headers.get("Content-Type", "")
        # The limits the request's form parser and the JSON handlers apply.
        memory, parts = request.max_form_memory_size, request.max_form_parts
        max_json_bytes = self._max_json_bytes
        fingerprint = await sized_work(
            len(body),
            lambda: request_fingerprint(
                method,
                path,
                query,
                content_type,
                body,
                max_form_memory_size=memory,
                max_form_parts=parts,
                max_json_bytes=max_json_bytes,
            ),
        )
        scope = client_of().identity
        try:
            record = await self._begin(store, scope, key, fingerprint)
        except StoreError as exc:
            self._store_errors += 1
            log.warning("idempotency_unavailable", error=str(exc))
            return None
        if record is None:
            self._claimed += 1
            g.idempotency = _Claim(scope, key)
            return None
        if record.fingerprint != fingerprint:
            self._reused += 1
            raise IdempotencyKeyReused(
                "this Idempotency-Key was already used for a different request"
            )
        if record.state == "in_flight":
            self._conflicts += 1
            response = error_response(
                IdempotencyInFlight(
                    "a request with this Idempotency-Key is still in progress; retry later"
                ),
                _request_id(),
            )
            response.headers["Retry-After"] = "1"
            return response
        self._replayed += 1
        replay = Response(
            record.body or b"",
            status=record.status or 200,
            content_type=record.content_type or "application/octet-stream",
        )
        replay.headers[REPLAYED_HEADER] = "true"
        return replay

    async def _begin(
        self, store: Store, scope: str, key: str, fingerprint: str
    ) -> IdempotencyRecord | None:
        now = self.now()
        record = await store.idempotency_begin(scope, key, fingerprint, now=now, ttl_s=self._ttl_s)
        if (
            record is not None
            and record.state == "in_flight"
            and now - record.created_at > (self._lease)
        ):
            # Its request died with its process: take the key over.
            log.warning(
                "idempotency_claim_abandoned",
                age_s=round((now - record.created_at).total_seconds()),
            )
            self._taken_over += 1
            await store.idempotency_release(scope, key)
            record = await store.idempotency_begin(
                scope, key, fingerprint, now=now, ttl_s=self._ttl_s
            )
        return record

    # --- after: store the answer, or release the claim --------------------------------

    async def after_request(self, response: Response) -> Response:
        claim = g.get("idempotency")
        if not isinstance(claim, _Claim) or claim.settled:
            return response
        status = response.status_code
        if status >= 500:
            await self._release(claim)
            return response
        content_type = response.content_type or "application/octet-stream"
        if isinstance(response.response, DataBody):
            await self._complete(claim, status, response.response.data, content_type)
            return response
        claim.settled = True  # from now on the recording body answers for it

        async def finish(data: bytes | None) -> None:
            if data is None:
                await self._release(claim, settled_ok=True)
            else:
                await self._complete(claim, status, data, content_type, settled_ok=True)

        response.response = _RecordingBody(response.response, finish)
        return response

    async def teardown_request(self, exc: BaseException | None) -> None:
        """A request that ended without an answer (cancelled, crashed) releases its key."""
        claim = g.get("idempotency")
        if isinstance(claim, _Claim) and not claim.settled:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT_S):
                await self._release(claim)

    async def _complete(
        self,
        claim: _Claim,
        status: int,
        body: bytes,
        content_type: str,
        *,
        settled_ok: bool = False,
    ) -> None:
        if claim.settled and not settled_ok:
            return
        claim.settled = True
        store = self._store()
        if store is None:
            return
        try:
            await store.idempotency_complete(claim.scope, claim.key, status, body, content_type)
        except StoreError as exc:
            # The claim stays in flight until lease_s passes; retries get 409 until then.
            self._store_errors += 1
            log.warning("idempotency_complete_failed", error=str(exc))
            return
        self._completed += 1

    async def _release(self, claim: _Claim, *, settled_ok: bool = False) -> None:
        if claim.settled and not settled_ok:
            return
        claim.settled = True
        store = self._store()
        if store is None:
            return
        try:
            await store.idempotency_release(claim.scope, claim.key)
        except StoreError as exc:
            self._store_errors += 1
            log.warning("idempotency_release_failed", error=str(exc))
            return
        self._released += 1


class _RecordingBody(ResponseBody):
    """A streamed response body that keeps a copy of what it sends.

    When the stream has been sent to the end, ``finish`` gets the whole body;
    when it stopped early (client gone, error), ``finish(None)``: release the key.
    """

    def __init__(self, inner: ResponseBody, finish: Callable[[bytes | None], Any]) -> None:
        self._inner = inner
        self._finish = finish
        self._chunks: list[bytes] = []
        self._ended = False
        self._iter: AsyncIterator[Any] | None = None

    async def __aenter__(self) -> _RecordingBody:
        body = await self._inner.__aenter__()
        self._iter = body.__aiter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._inner.__aexit__(exc_type, exc_value, tb)  # type: ignore[arg-type]
        finally:
            data = b"".join(self._chunks) if self._ended and exc_type is None else None
            with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT_S):
                await self._finish(data)

    def __aiter__(self) -> _RecordingBody:
        return self

    async def __anext__(self) -> bytes:
        assert self._iter is not None, "iterate inside 'async with'"
        try:
            chunk = await self._iter.__anext__()
        except StopAsyncIteration:
            self._ended = True
            raise
        data: bytes = chunk.encode() if isinstance(chunk, str) else chunk
        self._chunks.append(data)
        return data


def _request_id() -> str:
    rid = g.get("request_id")
    return rid if isinstance(rid, str) else ""


def install_idempotency(
    app: QuartTrio, config: Config, *, now: WallClock | None = None
) -> Idempotency:
    """Install the ``Idempotency-Key`` hooks on *app*, after :func:`install_guard`
    (whose client identity scopes the keys). *now* replaces the wall clock (tests)."""
    layer = Idempotency(app, config, now=now or _utcnow)
    app.before_request(layer.before_request)
    app.after_request(layer.after_request)
    app.teardown_request(layer.teardown_request)
    app.extensions["xintu.idempotency"] = layer
    return layer
