"""The spool: the bytes of photos the local model answered, kept for their LLM upgrade.

A check-cache request carries no image, so a local answer served from the cache
can only be re-classified by the LLM if its bytes were kept when the local model
answered (:mod:`._upgrades`). They are kept here, on local disk, per replica:

- content-addressed: ``<data dir>/spool/<hash[:2]>/<hash>``, the SHA-256 of the
  bytes (a file whose bytes do not hash to its name is never returned);
- size-capped (``store.spool_mb``): past the cap the oldest files are deleted
  first; a photo larger than the cap is not kept;
- deleted when an LLM answer replaces the local one, or when the entry is purged.

It holds users' photos (SECURITY.md): the directory is made ``0700`` and its files
``0600``. Each process knows the files it wrote and those it found at start (the
index, oldest first, by modification time); processes sharing a data directory
(``--workers N``) read each other's files, and each keeps its own share under the
cap. Every file operation runs in a worker thread; the index is changed only on
the Trio thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from .._types import is_image_hash

__all__ = ["Spool", "SpoolStatistics"]

log = structlog.get_logger("xintu.spool")

# The spool's own thread limiter: file work never fills Trio's default one.
_THREADS = 2


@dataclass(frozen=True, slots=True)
class SpoolStatistics:
    files: int  # files this process knows
    bytes: int  # their size
    max_bytes: int  # the cap (0: the spool is off)
    written: int
    evicted: int  # deleted to stay under the cap, oldest first
    deleted: int  # deleted because an LLM answer replaced the local one, or a purge
    write_errors: int


class Spool:
    """The photos of local answers on disk, under *directory*, at most *max_bytes*
    (0: keep nothing)."""

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes!r}")
        self.directory = directory
        self.max_bytes = max_bytes
        self._index: OrderedDict[str, int] = OrderedDict()  # hash -> size, oldest first
        self._bytes = 0
        self._limiter = trio.CapacityLimiter(_THREADS)
        self._written = 0
        self._evicted = 0
        self._deleted = 0
        self._write_errors = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def statistics(self) -> SpoolStatistics:
        return SpoolStatistics(
            files=len(self._index),
            bytes=self._bytes,
            max_bytes=self.max_bytes,
            written=self._written,
            evicted=self._evicted,
            deleted=self._deleted,
            write_errors=self._write_errors,
        )

    def _path(self, image_hash: str) -> Path:
        return self.directory / image_hash[:2] / image_hash

    # --- start ---------------------------------------------------------------------

    async def open(self) -> None:
        """Create the directory and index the files already there, oldest first;
        delete what the cap no longer allows."""
        if not self.enabled:
            return
        found = await trio.to_thread.run_sync(self._scan, limiter=self._limiter)
        for image_hash, size in found:
            self._index[image_hash] = size
            self._bytes += size
        await self._evict()

    def _scan(self) -> list[tuple[str, int]]:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        found: list[tuple[float, str, int]] = []
        for path in self.directory.glob("??/*"):
            name = path.name
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    path.unlink()  # a write that did not finish
                continue
            if not is_image_hash(name):
                continue
            with contextlib.suppress(OSError):
                st = path.stat()
                found.append((st.st_mtime, name, st.st_size))
        found.sort()
        return [(name, size) for _, name, size in found]

    # --- the operations --------------------------------------------------------------

    async def put(self, image_hash: str, data: bytes) -> bool:
        """Keep *data* under *image_hash* (its SHA-256); ``False`` if not kept (the
        spool is off, the photo is over the cap, or the write failed)."""
        if not self.enabled or len(data) > self.max_bytes or not is_image_hash(image_hash):
            return False
        if image_hash in self._index:
            self._index.move_to_end(image_hash)
            return True
        try:
            await trio.to_thread.run_sync(self._write, image_hash, data, limiter=self._limiter)
        except OSError as exc:
            self._write_errors += 1
            log.warning("spool_write_failed", image_hash=image_hash[:12], error=str(exc))
            return False
        self._index[image_hash] = len(data)
        self._bytes += len(data)
        self._written += 1
        await self._evict()
        return True

    def _write(self, image_hash: str, data: bytes) -> None:
        path = self._path(image_hash)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f"{image_hash}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    async def get(self, image_hash: str) -> bytes | None:
        """The bytes kept under *image_hash*, or ``None`` (never kept, evicted, or
        damaged: bytes that do not hash to their name are deleted)."""
        if not self.enabled or not is_image_hash(image_hash):
            return None
        data: bytes | None = await trio.to_thread.run_sync(
            self._read, image_hash, limiter=self._limiter
        )
        return data

    def _read(self, image_hash: str) -> bytes | None:
        path = self._path(image_hash)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != image_hash:
            log.warning("spool_file_damaged", image_hash=image_hash[:12])
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return data

    async def has(self, hashes: list[str]) -> set[str]:
        """Which of *hashes* have bytes kept (by any process sharing the directory)."""
        if not self.enabled:
            return set()
        wanted = [h for h in hashes if is_image_hash(h)]

        def look() -> set[str]:
            return {h for h in wanted if self._path(h).is_file()}

        found: set[str] = await trio.to_thread.run_sync(look, limiter=self._limiter)
        return found

    async def delete(self, image_hash: str) -> bool:
        """Delete the bytes of *image_hash*; whether there were any."""
        if not self.enabled or not is_image_hash(image_hash):
            return False
        size = self._index.pop(image_hash, None)
        if size is not None:
            self._bytes -= size
        removed: bool = await trio.to_thread.run_sync(
            self._unlink, image_hash, limiter=self._limiter
        )
        if removed:
            self._deleted += 1
        return removed

    def _unlink(self, image_hash: str) -> bool:
        try:
            self._path(image_hash).unlink()
        except FileNotFoundError:
            return False
        return True

    async def _evict(self) -> None:
        """Delete the oldest files until the spool is under its cap."""
        victims: list[str] = []
        while self._bytes > self.max_bytes and self._index:
            image_hash, size = self._index.popitem(last=False)
            self._bytes -= size
            victims.append(image_hash)
        if not victims:
            return

        def unlink_all() -> None:
            for h in victims:
                with contextlib.suppress(OSError):
                    self._path(h).unlink()

        await trio.to_thread.run_sync(unlink_all, limiter=self._limiter)
        self._evicted += len(victims)
