"""The client protocol without I/O: what to send, how to read answers, when to retry.

The two flows, :func:`classify_flow` (one photo) and :func:`window_flow` (up to 100
photos of ``classify_many``), are generators that *yield* operations (hash a file,
read a file, POST a request, emit a result) and are *sent* their outcomes, or have
the failure thrown in. :class:`~xintu.client.Client` runs them with blocking calls
and :class:`~xintu.client.AsyncClient` with awaits, so the protocol is written once:

1. hash locally (SHA-256); 2. ask ``check-cache`` / ``batch-check-cache``;
3. upload only the misses, each photo once, in batches of at most
``max_batch_files`` files and ``max_batch_bytes`` bytes (a batch refused with 413
is split in two and sent again).
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import random
import uuid
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._limits import MAX_BATCH_IMAGES, MAX_CHECK_HASHES
from ._errors import (
    FileUnreadable,
    PayloadTooLargeError,
    RetryLater,
    TransportError,
    XintuClientError,
    error_from_item,
)
from ._types import BatchItem, ClassifyResult, RetryPolicy

__all__ = [
    "CHECK_CACHE",
    "CHECK_CACHE_BATCH",
    "CLASSIFY",
    "CLASSIFY_BATCH",
    "MAX_CHECK_HASHES",
    "MAX_UPLOAD_FILES",
    "Emit",
    "Flow",
    "Hash",
    "ImageInput",
    "Post",
    "Read",
    "RetryState",
    "classify_flow",
    "hash_file",
    "window_flow",
    "windows",
]

CHECK_CACHE = "/api/v1/classify/check-cache"
CHECK_CACHE_BATCH = "/api/v1/classify/batch-check-cache"
CLASSIFY = "/api/v1/classify"
CLASSIFY_BATCH = "/api/v1/classify/batch"
MAX_UPLOAD_FILES = MAX_BATCH_IMAGES  # the server's limit for the batch endpoint

#: A photo: its bytes, or the path of its file.
ImageInput = bytes | str | os.PathLike[str]

_CHUNK_BYTES = 1 << 20


def hash_file(path: Path) -> tuple[str, int]:
    """SHA-256 hex digest and size of the file at *path*, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# --- operations the flows yield --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hash:
    """Hash the file at ``path``; answered with ``(sha256_hex, size)``."""

    path: Path


@dataclass(frozen=True, slots=True)
class Read:
    """Read the file at ``path``; answered with its bytes."""

    path: Path


@dataclass(frozen=True, slots=True)
class Post:
    """POST one logical request (retried by the runner); answered with ``(body, request_id)``.

    ``files`` are multipart parts ``(field, (filename, bytes, content_type))``.
    """

    path: str
    json: Mapping[str, Any] | None = None
    files: Sequence[tuple[str, tuple[str, bytes, str]]] | None = None
    data: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Emit:
    """Hand one finished item to the caller's ``on_result``; answered with ``None``."""

    item: BatchItem


Op = Hash | Read | Post | Emit
#: A protocol flow: yields operations, returns its value.
Flow = Generator[Op, Any, Any]


# --- retries -------------------------------------------------------------------------


@dataclass(slots=True)
class RetryState:
    """The retry budget of one logical request, and its ``Idempotency-Key``.

    The key is made once and sent with every attempt, so the server can recognise
    a retry of work it has already done.
    """

    policy: RetryPolicy
    started: float
    attempts: int = 0
    idempotency_key: str = field(default_factory=lambda: uuid.uuid4().hex)

    def delay(self, error: XintuClientError, now: float) -> float | None:
        """Seconds to wait before attempt ``attempts + 1``, or ``None``: give up with *error*."""
        policy = self.policy
        if self.attempts >= policy.max_attempts:
            return None
        if isinstance(error, RetryLater) and error.status in policy.retry_statuses:
            wait = error.retry_after_s
        elif isinstance(error, TransportError) and policy.retry_transport_errors:
            wait = None
        else:
            return None
        if wait is None:
            ceiling = min(policy.backoff_max_s, policy.backoff_base_s * 2 ** (self.attempts - 1))
            wait = ceiling * random.uniform(0.5, 1.0)  # jitter, not crypto
        if now + wait - self.started > policy.max_total_s:
            return None
        return wait


# --- reading answers -------------------------------------------------------------------


def _result(
    data: object, image_hash: str, *, from_cache: bool, request_id: str | None
) -> ClassifyResult:
    if not isinstance(data, Mapping):
        raise XintuClientError("the server's answer has no 'data' object", request_id=request_id)
    try:
        return ClassifyResult.from_data(
            data, image_hash=image_hash, from_cache=from_cache, request_id=request_id
        )
    except ValueError as exc:
        raise XintuClientError(str(exc), request_id=request_id) from None


def _content_type(name: str) -> str:
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


# --- one photo -----------------------------------------------------------------------------


def classify_flow(image: ImageInput, filename: str | None) -> Flow:
    """Hash, ask check-cache, upload on a miss; returns a :class:`ClassifyResult`."""
    if isinstance(image, bytes):
        data = image
        name = filename or "image"
    else:
        path = Path(image)
        name = filename or path.name
        try:
            data = yield Read(path)
        except OSError as exc:
            raise FileUnreadable(f"{path}: {exc.strerror or exc}") from exc
    image_hash = hashlib.sha256(data).hexdigest()
    body, rid = yield Post(CHECK_CACHE, json={"image_hash": image_hash})
    if body.get("cached"):
        return _result(body.get("data"), image_hash, from_cache=True, request_id=rid)
    body, rid = yield Post(
        CLASSIFY,
        files=[("image", (name, data, _content_type(name)))],
        data={"image_hash": image_hash},
    )
    return _result(
        body.get("data"), image_hash, from_cache=bool(body.get("from_cache")), request_id=rid
    )


# --- many photos ------------------------------------------------------------------------


def windows(count: int, concurrency: int) -> list[range]:
    """Split ``range(count)`` into windows of at most 100 inputs, enough for *concurrency*.

    A small job is cut finer, so that *concurrency* windows can run at once.
    """
    if count == 0:
        return []
    size = max(1, min(MAX_CHECK_HASHES, -(-count // max(1, concurrency))))
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


@dataclass(slots=True)
class _Entry:
    index: int
    name: str
    source: bytes | Path
    image_hash: str | None = None
    size: int = 0


def _plan(entries: Sequence[_Entry], max_files: int, max_bytes: int) -> list[list[_Entry]]:
    """Greedy batches in input order: at most *max_files* files and *max_bytes* bytes."""
    batches: list[list[_Entry]] = []
    current: list[_Entry] = []
    used = 0
    for entry in entries:
        if current and (len(current) >= max_files or used + entry.size > max_bytes):
            batches.append(current)
            current, used = [], 0
        current.append(entry)
        used += entry.size
    if current:
        batches.append(current)
    return batches


def window_flow(
    inputs: Sequence[tuple[int, str, bytes | Path]],
    *,
    max_batch_files: int,
    max_batch_bytes: int,
) -> Flow:
    """``classify_many`` for one window of inputs ``(index, name, bytes or path)``.

    Emits one :class:`BatchItem` per input as soon as it is known; returns ``None``.
    """
    entries: list[_Entry] = []
    for index, name, source in inputs:
        entry = _Entry(index, name, source)
        if isinstance(source, bytes):
            entry.image_hash = hashlib.sha256(source).hexdigest()
            entry.size = len(source)
        else:
            try:
                entry.image_hash, entry.size = yield Hash(source)
            except OSError as exc:
                error = FileUnreadable(f"{source}: {exc.strerror or exc}")
                yield Emit(BatchItem(index, name, None, error=error))
                continue
        entries.append(entry)
    if not entries:
        return None

    by_hash: dict[str, list[_Entry]] = {}
    for entry in entries:
        assert entry.image_hash is not None
        by_hash.setdefault(entry.image_hash, []).append(entry)

    def emit_all(image_hash: str, outcome: ClassifyResult | XintuClientError) -> Flow:
        for e in by_hash[image_hash]:
            if isinstance(outcome, ClassifyResult):
                yield Emit(BatchItem(e.index, e.name, image_hash, result=outcome))
            else:
                yield Emit(BatchItem(e.index, e.name, image_hash, error=outcome))

    hashes = list(by_hash)
    try:
        body, rid = yield Post(CHECK_CACHE_BATCH, json={"image_hashes": hashes})
    except XintuClientError as exc:
        for h in hashes:
            yield from emit_all(h, exc)
        return None
    cached: set[str] = set()
    for item in body.get("items") or []:
        hit = item.get("image_hash") if isinstance(item, Mapping) else None
        if isinstance(hit, str) and hit in by_hash and item.get("cached"):
            try:
                result = _result(item.get("data"), hit, from_cache=True, request_id=rid)
            except XintuClientError:
                continue  # unreadable hit: upload it instead
            cached.add(hit)
            yield from emit_all(hit, result)

    misses = [by_hash[h][0] for h in hashes if h not in cached]
    pending = _plan(misses, max_batch_files, max_batch_bytes)
    while pending:
        batch = pending.pop(0)
        parts: list[tuple[str, tuple[str, bytes, str]]] = []
        sent: list[_Entry] = []
        for entry in batch:
            assert entry.image_hash is not None
            if isinstance(entry.source, bytes):
                data = entry.source
            else:
                try:
                    data = yield Read(entry.source)
                except OSError as exc:
                    err = FileUnreadable(f"{entry.source}: {exc.strerror or exc}")
                    yield from emit_all(entry.image_hash, err)
                    continue
            name = entry.source.name if isinstance(entry.source, Path) else f"image-{entry.index}"
            parts.append(("images", (name, data, _content_type(name))))
            sent.append(entry)
        if not sent:
            continue
        claimed = json.dumps([e.image_hash for e in sent])
        try:
            body, rid = yield Post(CLASSIFY_BATCH, files=parts, data={"image_hashes": claimed})
        except PayloadTooLargeError as exc:
            if len(sent) > 1:  # too big together: send the halves on their own
                half = len(sent) // 2
                pending[:0] = [sent[:half], sent[half:]]
                continue
            yield from emit_all(_hash_of(sent[0]), exc)
            continue
        except XintuClientError as exc:
            for e in sent:
                yield from emit_all(_hash_of(e), exc)
            continue
        items = body.get("items")
        answered: dict[int, Mapping[str, Any]] = {}
        for item in items if isinstance(items, list) else []:
            if isinstance(item, Mapping) and isinstance(item.get("index"), int):
                answered[item["index"]] = item
        for position, e in enumerate(sent):
            h = _hash_of(e)
            item = answered.get(position)
            outcome: ClassifyResult | XintuClientError
            if item is None:
                outcome = XintuClientError("the batch answer lacks this image", request_id=rid)
            elif item.get("success"):
                try:
                    outcome = _result(
                        item.get("data"),
                        h,
                        from_cache=bool(item.get("from_cache")),
                        request_id=rid,
                    )
                except XintuClientError as exc:
                    outcome = exc
            else:
                outcome = error_from_item(dict(item), rid)
            yield from emit_all(h, outcome)
    return None


def _hash_of(entry: _Entry) -> str:
    assert entry.image_hash is not None
    return entry.image_hash
