"""The v1 classification API, wire-compatible with the original Xintu backend.

Paths, field names, types and meanings are the original ones; ``data`` gains the
additive fields ``image_hash``, ``source``, ``provider`` and ``model``.

The handlers parse and answer HTTP; everything else is asked of the runtime's
facade (:class:`~xintu.actors.Runtime`): ``lookup`` / ``lookup_many`` (hits are
counted there), ``refusal``, ``classify``, ``name_alias`` and ``log_request``.

check-cache is the one route also served below Quart (:mod:`._hot`, the hit path's
cost): both ways run :func:`check_cache_answer`.

An upload that no classifier could take is refused from its headers alone
(:func:`_refuse_early`), before its body is read and hashed: a refusal does not
wait behind the bytes of the work it refuses. check-cache is never refused so.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import trio
from quart import Blueprint, Response, g, request, stream_with_context
from werkzeug.datastructures import FileStorage

from .._config import Config
from .._limits import MAX_BATCH_IMAGES, MAX_CHECK_HASHES, MAX_USER_ID_CHARS
from .._types import is_image_hash
from ..actors import SHARED_SCOPE, Answer, ClassifyRequest, Runtime
from ..errors import (
    BadRequest,
    Draining,
    HashMismatch,
    PayloadTooLarge,
    Unavailable,
    ValidationFailed,
    XintuError,
)
from ._app import XintuApp, current_xintu
from ._guard import alias_scope
from ._respond import json_response, now_iso, sized_work

__all__ = ["check_cache_answer", "json_too_large", "parse_json_body", "v1"]

v1 = Blueprint("v1", __name__, url_prefix="/api/v1/classify")


def _runtime() -> Runtime:
    return current_xintu().runtime


def _config() -> Config:
    return current_xintu().xintu_config


def _rid() -> str:
    return cast(str, g.request_id)


def _ms_since(start: float) -> int:
    """Milliseconds since *start*, an integer on the wire as in the original API
    (strictly typed clients, Kotlin or Swift, reject a float there)."""
    return round((trio.current_time() - start) * 1000.0)


async def _json_body() -> dict[str, Any]:
    """The request's JSON object, within ``server.max_json_bytes``.

    A body declared or found larger is refused with 413 before it is parsed (so a
    large one never costs the event loop a parse), and one nested too deeply for the
    parser is a 400, not a crash.
    """
    limit = _config().server.max_json_bytes
    declared = request.content_length
    if declared is not None and declared > limit:
        raise json_too_large(limit)
    raw = await request.get_data(cache=True, as_text=False)
    return parse_json_body(cast(bytes, raw), limit)


def json_too_large(limit: int) -> PayloadTooLarge:
    """The error of a JSON body over *limit* (``server.max_json_bytes``) bytes."""
    return PayloadTooLarge(f"a JSON body may have at most {limit} bytes")


def parse_json_body(raw: bytes, limit: int) -> dict[str, Any]:
    """The JSON object in *raw*, a body received in full (see :func:`_json_body`)."""
    if len(raw) > limit:
        raise json_too_large(limit)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _user_id(body: dict[str, Any] | None = None) -> str | None:
    """The user: the ``X-User-ID`` header, else the body's ``user_id``; both validated."""
    return _user_id_of(request.headers.get("X-User-ID"), body, g)


def _user_id_of(header: str | None, body: dict[str, Any] | None, ctx: Any) -> str | None:
    """:func:`_user_id` from the header's value, set on *ctx* (``g``) for the log.
    Both are validated, the body's too when the header names the user."""
    in_header = _checked_user_id(header)
    in_body = _checked_user_id(body.get("user_id") if body is not None else None)
    value = in_header or in_body
    if value is not None:
        ctx.user_id = value
    return value


def _checked_user_id(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_USER_ID_CHARS:
        raise ValidationFailed(
            f"user_id must be a string of at most {MAX_USER_ID_CHARS} characters"
        )
    return value


def _hash_field(value: object, name: str) -> str:
    if not isinstance(value, str) or not is_image_hash(value.lower()):
        raise ValidationFailed(f"{name} must be 64 hexadecimal characters (SHA-256)")
    return value.lower()


def _deadline_budget() -> float:
    """Seconds the request's classification may take: the configured deadline, or
    less if the client asks (``X-Deadline-Ms``).

    The clock starts once the body has arrived (see the upload handlers): a slow
    upload from a phone on a weak network is bounded by ``server.body_timeout_s``,
    not by the classification deadline.
    """
    budget = _config().server.request_deadline_s
    asked = request.headers.get("X-Deadline-Ms")
    if asked is not None:
        try:
            ms = int(asked)
        except ValueError:
            raise ValidationFailed("X-Deadline-Ms must be an integer") from None
        if ms <= 0:
            raise ValidationFailed("X-Deadline-Ms must be positive")
        budget = min(budget, ms / 1000.0)
    return float(budget)


def _refuse_early(budget: float, *, batch: bool = False) -> None:
    """Raise the runtime's refusal (503, ``Retry-After``) when no classifier could
    take a new photo for *budget* seconds from now, or the service is draining;
    else take the upload's admission ticket (:meth:`Runtime.reserve`).

    Asked from the headers, before the body is read: the body is left unread, so
    the app answers ``Connection: close`` with the refusal. The ticket counts as
    work queued ahead of the next uploads' checks until the runtime's ``classify``
    submits this one's work, or the request's task ends without it.

    A deadline the client shortened (``X-Deadline-Ms``) that only it cannot meet,
    while the standard one could be, is not refused here: see
    :meth:`Runtime.only_deadline_too_short`.
    """
    runtime = _runtime()
    now = trio.current_time()
    standard = _config().server.request_deadline_s
    if budget < standard and runtime.only_deadline_too_short(now + budget, now + standard):
        # The client's own deadline is too short, not the service too busy: the body
        # is read and validated first (a malformed upload is a 4xx, whatever its
        # deadline), and the work is refused or times out after that as usual.
        return
    # A batch's ticket counts the photos its body is expected to bring.
    batch_bytes = (request.content_length or 0) if batch else None
    runtime.reserve(now + budget, batch_bytes=batch_bytes)


async def _sha256(data: bytes) -> str:
    return await sized_work(len(data), lambda: hashlib.sha256(data).hexdigest())


def _log(
    *,
    request_id: str,
    user_id: str | None,
    image_hash: str | None,
    image_size: int | None,
    answer: Answer | None,
    processing_time_ms: float,
    hashes_asked: int | None = None,
    hashes_hit: int | None = None,
    ctx: Any = None,
    remote_addr: str | None = None,
    runtime: Runtime | None = None,
) -> None:
    """One ``request_log`` row for this request (or one of its items; a batch
    check's row carries its counts instead of an answer). *ctx*, *remote_addr* and
    *runtime* are the request's ``g``, its peer and the app's runtime unless given
    (a request served below Quart gives them)."""
    if ctx is None:
        ctx, remote_addr = g, request.remote_addr
    (runtime or _runtime()).log_request(
        request_id=request_id,
        user_id=user_id,
        ip=getattr(ctx, "client_ip", None) or remote_addr,
        image_hash=image_hash,
        image_size=image_size,
        answer=answer,
        processing_time_ms=processing_time_ms,
        hashes_asked=hashes_asked,
        hashes_hit=hashes_hit,
    )


def _data(answer: Answer, *, evidence: bool = True) -> dict[str, Any]:
    data = answer.classification.to_data(answer.image_hash, from_cache=answer.from_cache)
    if not evidence:
        data["local_inference_result"] = None
    return data


def _wants_evidence() -> bool:
    """Cache checks leave the local model's evidence out (null, as the original's
    LLM answers had it) unless the client asks with ``?evidence=true``: an album
    syncing 100 hashes a request should not pay about 1 KB a hit for it."""
    if not request.query_string:  # most requests: no query string to parse
        return False
    value = request.args.get("evidence")
    if value is None or value in ("false", "0"):
        return False
    if value in ("true", "1"):
        return True
    raise ValidationFailed("evidence must be true, false, 1 or 0")


# --- check-cache -------------------------------------------------------------------


@v1.post("/check-cache")
async def check_cache() -> Response:
    body = await _json_body()
    return await check_cache_answer(
        current_xintu(),
        g._get_current_object(),
        body,
        user_header=request.headers.get("X-User-ID"),
        remote_addr=request.remote_addr,
        wants_evidence=_wants_evidence,
    )


async def check_cache_answer(
    app: XintuApp,
    ctx: Any,
    body: dict[str, Any],
    *,
    user_header: str | None,
    remote_addr: str | None,
    wants_evidence: Callable[[], bool],
) -> Response:
    """The check-cache answer to the JSON object *body*, for the request whose state
    is *ctx* (its ``g``, or its state below Quart: :mod:`._hot` serves this route
    with this function too). *wants_evidence* reads ``?evidence``."""
    image_hash = _hash_field(body.get("image_hash"), "image_hash")
    evidence = wants_evidence()
    ctx.image_hash = image_hash
    user_id = _user_id_of(user_header, body, ctx)
    runtime = app.runtime
    rid: str = ctx.request_id
    # An alias hit answers with (and counts the hit on) the verified entry.
    answer = await runtime.lookup(image_hash, alias_scope(user_id, getattr(ctx, "client", None)))
    ctx.source = "cache" if answer is not None else "none"
    # A miss carries "data": null, as the original's answer does.
    out: dict[str, Any] = {"success": True, "cached": answer is not None, "data": None}
    if answer is not None:
        out["data"] = _data(answer, evidence=evidence)
        _log(
            request_id=rid,
            user_id=user_id,
            image_hash=answer.image_hash,
            image_size=None,
            answer=answer,
            processing_time_ms=_ms_since(ctx.started),
            ctx=ctx,
            remote_addr=remote_addr,
            runtime=runtime,
        )
    out |= {"from_cache": answer is not None, "request_id": rid, "timestamp": now_iso()}
    return json_response(out)


@v1.post("/batch-check-cache")
async def batch_check_cache() -> Response:
    body = await _json_body()
    hashes = body.get("image_hashes")
    if not isinstance(hashes, list) or not 1 <= len(hashes) <= MAX_CHECK_HASHES:
        raise ValidationFailed(f"image_hashes must be a list of 1 to {MAX_CHECK_HASHES} hashes")
    normalised = [_hash_field(h, f"image_hashes[{i}]") for i, h in enumerate(hashes)]
    user_id = _user_id(body)
    found = await _runtime().lookup_many(normalised, alias_scope(user_id))
    items: list[dict[str, Any]] = []
    elapsed_ms = _ms_since(g.started)
    evidence = _wants_evidence()
    for h in normalised:
        answer = found.get(h)
        # A miss carries "data": null, as in the original.
        item: dict[str, Any] = {"image_hash": h, "cached": answer is not None, "data": None}
        if answer is not None:
            item["data"] = _data(answer, evidence=evidence)
        items.append(item)
    # One log row for the request, with its counts; the stats count its hits as
    # requests served, as they count a check-cache hit.
    _log(
        request_id=_rid(),
        user_id=user_id,
        image_hash=None,
        image_size=None,
        answer=None,
        processing_time_ms=elapsed_ms,
        hashes_asked=len(normalised),
        hashes_hit=sum(1 for h in normalised if h in found),
    )
    return json_response(
        {
            "success": True,
            "total": len(items),
            "cached_count": sum(1 for i in items if i["cached"]),
            "items": items,
            "request_id": _rid(),
            "timestamp": now_iso(),
        }
    )


# --- classify ----------------------------------------------------------------------


async def _read_image(storage: FileStorage) -> bytes:
    limit = _config().images.max_image_bytes
    data: bytes = storage.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"image is larger than {limit} bytes")
    if not data:
        raise BadRequest("the image is empty")
    return data


async def _classify_one(
    data: bytes, claimed_hash: str | None, user_id: str | None, request_id: str, deadline: float
) -> Answer:
    """Classify the uploaded bytes under their own SHA-256; a different client-sent
    hash becomes an alias of that entry, or a 422, by ``api.client_hash_mode``."""
    image_hash = await _sha256(data)
    g.image_hash = image_hash
    mode = _config().api.client_hash_mode
    renamed = claimed_hash is not None and claimed_hash != image_hash
    if renamed and mode == "verify":
        raise HashMismatch("image_hash does not match the SHA-256 of the uploaded image")
    runtime = _runtime()
    answer = await runtime.classify(
        ClassifyRequest(data, image_hash, request_id, user_id, g.get("started")),
        deadline=deadline,
    )
    if renamed:
        assert claimed_hash is not None
        scope = SHARED_SCOPE if mode == "shared" else alias_scope(user_id)
        await runtime.name_alias(scope, claimed_hash, image_hash)
    return answer


@v1.post("")
async def classify() -> Response:
    started = cast(float, g.started)
    budget = _deadline_budget()
    _refuse_early(budget)
    files = await request.files
    form = await request.form
    deadline = trio.current_time() + budget  # from the body's arrival
    storage = files.get("image")
    if storage is None:
        raise BadRequest("multipart field 'image' is required")
    claimed = form.get("image_hash") or None
    claimed_hash = _hash_field(claimed, "image_hash") if claimed is not None else None
    user_id = _user_id()
    data = await _read_image(storage)
    answer: Answer | None = None
    try:
        answer = await _classify_one(data, claimed_hash, user_id, _rid(), deadline)
        g.source = "cache" if answer.from_cache else answer.classification.source.value
        g.provider = answer.classification.provider
    finally:
        _log(
            request_id=_rid(),
            user_id=user_id,
            image_hash=answer.image_hash if answer else None,
            image_size=len(data),
            answer=answer,
            processing_time_ms=_ms_since(started),
        )
    return json_response(
        {
            "success": True,
            "data": _data(answer),
            "from_cache": answer.from_cache,
            "processing_time_ms": _ms_since(started),
            "request_id": _rid(),
            "timestamp": now_iso(),
        }
    )


def _batch_hashes(raw: str | None, count: int) -> list[str | None]:
    """The client's hash of each image, by index. As in the original, a list shorter
    than the images names only the first ones and entries past them are ignored;
    unlike it, a value that is not a JSON list of hashes is a 422, not ignored."""
    if raw is None or raw == "":
        return [None] * count
    try:
        values = json.loads(raw)
    except ValueError:
        raise ValidationFailed("image_hashes must be a JSON list") from None
    if not isinstance(values, list):
        raise ValidationFailed("image_hashes must be a JSON list")
    named = [
        None if v in (None, "") else _hash_field(v, f"image_hashes[{i}]")
        for i, v in enumerate(values[:count])
    ]
    return named + [None] * (count - len(named))


@v1.post("/batch")
async def classify_batch() -> Response:
    started = cast(float, g.started)
    budget = _deadline_budget()
    _refuse_early(budget, batch=True)  # draining, or not even one photo could be taken
    files = await request.files
    form = await request.form
    deadline = trio.current_time() + budget  # from the body's arrival
    images = files.getlist("images")
    if not 1 <= len(images) <= MAX_BATCH_IMAGES:
        raise ValidationFailed(f"'images' must hold 1 to {MAX_BATCH_IMAGES} files")
    claimed = _batch_hashes(form.get("image_hashes"), len(images))
    user_id = _user_id()
    rid = _rid()
    runtime = _runtime()
    if runtime.draining:
        # One refusal for the whole batch rather than twenty.
        raise Draining("the service is shutting down", retry_after_s=runtime.retry_after_s())

    # Read every part now: the uploaded files are closed once the handler returns,
    # and a streamed body is produced after that.
    payloads: list[tuple[str, bytes | XintuError]] = []
    for storage in images:
        try:
            payloads.append((storage.filename or "", await _read_image(storage)))
        except XintuError as exc:
            payloads.append((storage.filename or "", exc))

    refusals: list[Unavailable] = []  # items refused for capacity (or draining)

    async def one(index: int) -> dict[str, Any]:
        t0 = trio.current_time()
        filename, payload = payloads[index]
        # Every item has every field, null where it does not apply (as the original).
        item: dict[str, Any] = {"index": index, "filename": filename or f"image_{index}"}
        answer: Answer | None = None
        data = payload if isinstance(payload, bytes) else b""
        try:
            if isinstance(payload, XintuError):
                raise payload
            answer = await _classify_one(payload, claimed[index], user_id, rid, deadline)
        except XintuError as exc:
            if isinstance(exc, Unavailable):
                refusals.append(exc)
            item |= {
                "success": False,
                "data": None,
                "error": exc.message,
                "error_code": exc.error_code,
            }
        else:
            item |= {"success": True, "data": _data(answer), "error": None}
        item["from_cache"] = bool(answer and answer.from_cache)
        item["processing_time_ms"] = _ms_since(t0)
        _log(
            request_id=f"{rid}-{index}",
            user_id=user_id,
            image_hash=answer.image_hash if answer else None,
            image_size=len(data) if data else None,
            answer=answer,
            processing_time_ms=item["processing_time_ms"],
        )
        return item

    def summary(items: list[dict[str, Any]]) -> dict[str, Any]:
        ok = sum(1 for i in items if i["success"])
        return {
            "success": True,
            "total": len(images),
            "success_count": ok,
            "fail_count": len(images) - ok,
            "request_id": rid,
            "total_processing_time_ms": _ms_since(started),
            "timestamp": now_iso(),
        }

    if "application/x-ndjson" in request.headers.get("Accept", ""):
        stream = stream_with_context(_stream)
        return Response(stream(one, len(images), summary), content_type="application/x-ndjson")

    items: list[dict[str, Any]] = [{} for _ in images]

    async def fill(i: int) -> None:
        items[i] = await one(i)

    async with trio.open_nursery() as nursery:
        for i in range(len(images)):
            nursery.start_soon(fill, i)
    if len(refusals) == len(images):
        # Nothing was done: the batch as a whole is refused, as one photo would be.
        raise max(refusals, key=lambda r: r.retry_after_s)
    body = summary(items)
    body["items"] = items
    if refusals:
        # Some items were refused for capacity: say when to retry them.
        retry_after_s = max(r.retry_after_s for r in refusals)
        return json_response(body, Retry_After=str(max(1, math.ceil(retry_after_s))))
    return json_response(body)


async def _stream(
    one: Callable[[int], Awaitable[dict[str, Any]]],
    count: int,
    summary: Callable[[list[dict[str, Any]]], dict[str, Any]],
) -> AsyncIterator[bytes]:
    """NDJSON: one line per item as it finishes, then one summary line."""
    send, receive = trio.open_memory_channel[dict[str, Any]](count)
    done: list[dict[str, Any]] = []

    async def run(i: int) -> None:
        await send.send(await one(i))

    # The body is iterated by the task that sends the response, so a client that
    # disconnects cancels this nursery through the generator's own frame.
    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(run, i)
        for _ in range(count):
            item = await receive.receive()
            done.append(item)
            yield (json.dumps(item, separators=(",", ":")) + "\n").encode()
    yield (json.dumps(summary(done), separators=(",", ":")) + "\n").encode()
