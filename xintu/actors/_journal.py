"""The writer's journal: store writes that could not be made, kept on local disk.

When the store is still down as the writer shuts down, its pending batch and its
queued operations are written here instead of being lost; the next writer to start
on the same data directory replays them into the store, exactly once. While it runs,
the writer also moves its queue here when the inbox is full (more load than the
store takes) or half full during an outage, and replays it before newer work.

Layout: one directory (``<data dir>/journal``) of files named
``<UTC time>-<pid>-<random>.jsonl`` (replayed in that order: the time is when the
writes were taken), one :class:`~xintu.store.WriteBatch` per line::

    <sha256 of the JSON, 64 hex> <the batch as one line of JSON>\\n

The format is still 1 with aliases (DESIGN §2) added: a line written before them
has no ``aliases`` key and reads as a batch without aliases; an older Xintu reading
a newer line ignores the key, so a downgrade loses aliases only, never results.
The same holds for the keys added since: a result's ``replace`` (an operator's
re-classification; absent: false) and a log row's ``hashes_asked`` and
``hashes_hit`` (a batch check's counts; absent: none).

Writing (:meth:`Journal.write`): the whole file is written under a temporary name
(``.tmp``), fsync'd, renamed into place and the directory fsync'd. A crash part-way
leaves only the ``.tmp`` file, which is never replayed; a file that exists under its
final name is complete, so nothing journaled before can be lost by a later crash.
Every line carries its own checksum as well: a line that fails it (disk damage, a
hand edit) is skipped and logged, never applied in part.

Replaying (:meth:`Journal.claim`): each file is locked with ``flock`` while it is
replayed, so that workers sharing the data directory never replay one file
together; a worker that finds a file locked leaves it to its owner. Every batch
keeps the ``batch_id`` it was given before the outage and the store applies a batch
id at most once (``applied_batches``), so a batch whose commit was in doubt, or a
replay that is interrupted and run again, counts nothing twice. The file is deleted
only after its last batch has committed.

All methods here block (file I/O, fsync): the writer calls them through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from .._types import Category, Classification, Source
from ..store import AliasWrite, HitIncrement, RequestLogRow, ResultWrite, WriteBatch

__all__ = ["ClaimedFile", "Journal", "decode_batch", "encode_batch"]

log = structlog.get_logger("xintu.journal")

_SUFFIX = ".jsonl"
_TMP_SUFFIX = ".tmp"
_FORMAT = 1


# --- one batch as JSON ---------------------------------------------------------------


def _json_default(obj: object) -> Any:
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars in model evidence
    if callable(tolist):
        return tolist()
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_time(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"not a timestamp: {value!r}")
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _need_time(value: object) -> datetime:
    parsed = _parse_time(value)
    if parsed is None:
        raise ValueError("missing timestamp")
    return parsed


def encode_batch(batch: WriteBatch) -> str:
    """*batch* as one line of JSON (no newline), keys sorted."""
    payload = {
        "v": _FORMAT,
        "batch_id": batch.batch_id,
        "results": [
            {
                "image_hash": r.image_hash,
                "image_size": r.image_size,
                "created_at": _time(r.created_at),
                "replace": r.replace,
                "category": r.classification.category.value,
                "confidence": r.classification.confidence,
                "source": r.classification.source.value,
                "model": r.classification.model,
                "description": r.classification.description,
                "provider": r.classification.provider,
                "local_inference_result": (
                    dict(r.classification.local_inference_result)
                    if r.classification.local_inference_result is not None
                    else None
                ),
            }
            for r in batch.results
        ],
        "hits": [
            {"image_hash": h.image_hash, "count": h.count, "last_hit_at": _time(h.last_hit_at)}
            for h in batch.hits
        ],
        "logs": [
            {
                "request_id": row.request_id,
                "user_id": row.user_id,
                "ip": row.ip,
                "image_hash": row.image_hash,
                "image_size": row.image_size,
                "category": row.category,
                "confidence": row.confidence,
                "from_cache": row.from_cache,
                "source": row.source,
                "processing_time_ms": row.processing_time_ms,
                "created_at": _time(row.created_at),
                "hashes_asked": row.hashes_asked,
                "hashes_hit": row.hashes_hit,
            }
            for row in batch.logs
        ],
        "aliases": [
            {
                "scope": a.scope,
                "alias_hash": a.alias_hash,
                "image_hash": a.image_hash,
                "created_at": _time(a.created_at),
            }
            for a in batch.aliases
        ],
    }
    return json.dumps(
        payload,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        default=_json_default,
    )


def decode_batch(text: str) -> WriteBatch:
    """The batch of one :func:`encode_batch` line; ``ValueError`` if it is not one."""
    try:
        payload = json.loads(text)
        if payload.get("v") != _FORMAT:
            raise ValueError(f"unknown journal format {payload.get('v')!r}")
        results = tuple(
            ResultWrite(
                image_hash=r["image_hash"],
                classification=Classification(
                    category=Category(r["category"]),
                    confidence=float(r["confidence"]),
                    source=Source(r["source"]),
                    model=r["model"],
                    description=r["description"],
                    provider=r["provider"],
                    local_inference_result=r["local_inference_result"],
                ),
                image_size=r["image_size"],
                created_at=_parse_time(r["created_at"]),
                replace=bool(r.get("replace", False)),
            )
            for r in payload["results"]
        )
        hits = tuple(
            HitIncrement(h["image_hash"], int(h["count"]), _need_time(h["last_hit_at"]))
            for h in payload["hits"]
        )
        logs = tuple(
            RequestLogRow(
                request_id=row["request_id"],
                user_id=row["user_id"],
                ip=row["ip"],
                image_hash=row["image_hash"],
                image_size=row["image_size"],
                category=row["category"],
                confidence=row["confidence"],
                from_cache=bool(row["from_cache"]),
                source=row["source"],
                processing_time_ms=float(row["processing_time_ms"]),
                created_at=_need_time(row["created_at"]),
                hashes_asked=row.get("hashes_asked"),
                hashes_hit=row.get("hashes_hit"),
            )
            for row in payload["logs"]
        )
        aliases = tuple(
            AliasWrite(
                scope=a["scope"],
                alias_hash=a["alias_hash"],
                image_hash=a["image_hash"],
                created_at=_parse_time(a["created_at"]),
            )
            for a in payload.get("aliases", ())  # absent in lines written before aliases
        )
        return WriteBatch(
            batch_id=payload["batch_id"], results=results, hits=hits, logs=logs, aliases=aliases
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed journal batch: {exc!r}") from exc


def _line(batch: WriteBatch) -> bytes:
    text = encode_batch(batch).encode("ascii")
    return hashlib.sha256(text).hexdigest().encode("ascii") + b" " + text + b"\n"


def _unline(line: bytes) -> WriteBatch:
    if not line.endswith(b"\n"):
        raise ValueError("incomplete line")
    digest, sep, text = line[:-1].partition(b" ")
    if not sep or hashlib.sha256(text).hexdigest().encode("ascii") != digest:
        raise ValueError("checksum mismatch")
    return decode_batch(text.decode("ascii"))


# --- files ---------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class ClaimedFile:
    """A journal file this process holds the lock of, with its batches in order.

    Call :meth:`done` once every batch has committed (deletes the file), or
    :meth:`release` to leave it for a later replay.
    """

    path: Path
    batches: list[WriteBatch]
    skipped_lines: int
    _fd: int

    def done(self) -> None:
        """Delete the file (its batches are in the store), then unlock it."""
        try:
            self.path.unlink(missing_ok=True)
            _fsync_dir(self.path.parent)
        finally:
            self.release()

    def release(self) -> None:
        """Unlock the file without deleting it."""
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


class Journal:
    """The journal directory of one data directory; see the module docstring."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def pending(self) -> list[Path]:
        """The complete journal files, oldest first (names sort by time)."""
        try:
            names = sorted(p for p in self.directory.iterdir() if p.name.endswith(_SUFFIX))
        except FileNotFoundError:
            return []
        except OSError as exc:  # not a directory, no permission: say so, start anyway
            log.error("journal_unreadable", directory=str(self.directory), error=str(exc))
            return []
        return names

    def count_operations(self) -> int:
        """Operations in the readable lines of the complete files (for a gauge; reads
        without locking, so a file being replayed meanwhile may be counted)."""
        total = 0
        for path in self.pending():
            try:
                raw = path.read_bytes()
            except OSError:
                continue
            for line in raw.splitlines(keepends=True):
                try:
                    b = _unline(line)
                except ValueError:
                    continue
                total += len(b.results) + len(b.hits) + len(b.logs) + len(b.aliases)
        return total

    def write(self, batches: list[WriteBatch], *, at: datetime | None = None) -> Path | None:
        """Write *batches* durably as one new journal file; ``None`` if there are none.

        The file is named by *at* (else now), so that it is replayed in that order:
        the writer dates a batch it had in hand by the time it took it.
        """
        if not batches:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = (at or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{stamp}-{os.getpid()}-{secrets.token_hex(4)}{_SUFFIX}"
        final = self.directory / name
        tmp = self.directory / (name + _TMP_SUFFIX)
        data = b"".join(_line(b) for b in batches)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        return final

    def claim(self) -> Iterator[ClaimedFile]:
        """Lock and read each pending file in turn (skipping those another process
        holds or has finished); the caller must :meth:`~ClaimedFile.done` or
        :meth:`~ClaimedFile.release` each before asking for the next."""
        for path in self.pending():
            claimed = self.claim_path(path)
            if claimed is not None:
                yield claimed

    def claim_path(self, path: Path) -> ClaimedFile | None:
        """Lock and read the journal file *path*; ``None`` if another process holds
        it or has finished it (or it cannot be read: logged)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None  # replayed and deleted by another process meanwhile
        except OSError as exc:
            log.error("journal_unreadable", file=path.name, error=str(exc))
            return None
        keep = False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # another process is replaying it now
            if os.fstat(fd).st_nlink == 0:
                return None  # it finished with the file while we waited to open it
            with os.fdopen(os.dup(fd), "rb") as fh:
                raw = fh.read()
            keep = True
        finally:
            if not keep:
                os.close(fd)
        batches: list[WriteBatch] = []
        skipped = 0
        for number, line in enumerate(raw.splitlines(keepends=True), start=1):
            try:
                batches.append(_unline(line))
            except ValueError as exc:
                skipped += 1
                log.error("journal_line_skipped", file=path.name, line=number, error=str(exc))
        return ClaimedFile(path, batches, skipped, fd)
