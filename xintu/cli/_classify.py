"""``xintu classify``: classify a folder of photos, report, and sort them into albums.

::

    xintu classify PATH... [--server URL] [--api-key KEY] [--output FILE.json|FILE.csv]
                   [--sort-into DIR [--mode copy|move|link]] [--dry-run] [--concurrency N]

- PATHs are files or folders; folders are walked for image files (hidden files and
  folders, and the ``--sort-into`` folder itself, are skipped).
- With ``--server`` the photos go through :class:`xintu.client.AsyncClient` (hash,
  batch-check-cache, upload the misses in batches); without it they are classified
  here by the local model, with the same output.
- Every result is appended, as it arrives, to a state file (JSON lines keyed by
  SHA-256: ``DIR/.xintu-state.jsonl`` with ``--sort-into``, else
  ``FILE.xintu-state.jsonl`` next to ``--output``, or ``--state PATH``). A re-run
  skips the photos already there, so interrupting is safe; ``--fresh`` starts over.
- Sorting never overwrites: a taken name gets a ``-1``, ``-2``... suffix, and a file
  whose identical copy is already in place is left alone. Copies and cross-device
  moves are written to a temporary name and linked into place, so an interrupted
  run leaves no half-written photo behind.
- ``--dry-run`` classifies and prints what it would do, and writes nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import io
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

import trio

from .._config import Config
from .._types import Classification
from ..client import (
    AsyncClient,
    AuthenticationError,
    BatchItem,
    TransportError,
    XintuClientError,
    hash_file,
)

__all__ = ["IMAGE_EXTENSIONS", "Options", "collect", "run"]

#: File extensions taken as photos when walking folders (compared lower-case).
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".webp",
        ".gif",
        ".bmp",
        ".tif",
        ".tiff",
        ".heic",
        ".heif",
        ".avif",
        ".mpo",
    }
)

Mode = Literal["copy", "move", "link"]
STATE_NAME = ".xintu-state.jsonl"
_PAST: dict[str, str] = {"copy": "copied", "move": "moved", "link": "linked"}


@dataclass(frozen=True, slots=True)
class Options:
    """The parsed options of ``xintu classify``."""

    paths: Sequence[Path]
    server: str | None = None
    api_key: str | None = None
    output: Path | None = None
    sort_into: Path | None = None
    mode: Mode = "copy"
    dry_run: bool = False
    concurrency: int = 4
    state: Path | None = None
    fresh: bool = False

    def state_path(self) -> Path | None:
        """Where results are journaled: ``--state``, the sort folder, or next to --output."""
        if self.state is not None:
            return self.state
        if self.sort_into is not None:
            return self.sort_into / STATE_NAME
        if self.output is not None:
            return self.output.with_name(self.output.name + ".xintu-state.jsonl")
        return None


@dataclass(slots=True)
class Record:
    """One photo's outcome: a row of the JSON/CSV output."""

    path: str
    image_hash: str | None = None
    category: str | None = None
    confidence: float | None = None
    source: str | None = None
    from_cache: bool | None = None
    description: str | None = None
    provider: str | None = None
    model: str | None = None
    resumed: bool = False
    destination: str | None = None
    action: str | None = None
    error: str | None = None
    error_code: str | None = None

    @property
    def ok(self) -> bool:
        return self.category is not None


FIELDS = [f.name for f in dataclasses.fields(Record)]
_RESULT_FIELDS = (
    "category",
    "confidence",
    "source",
    "from_cache",
    "description",
    "provider",
    "model",
)


# --- finding photos --------------------------------------------------------------------


def collect(paths: Iterable[Path], *, exclude: Path | None = None) -> list[Path]:
    """Image files under *paths*, in a stable order, each once; *exclude* is not walked.

    A file named on the command line is taken whatever its extension; folders are
    walked (without following symlinked folders) for :data:`IMAGE_EXTENSIONS`,
    skipping hidden entries. A path that does not exist raises ``FileNotFoundError``.
    """
    skip = exclude.resolve() if exclude is not None else None
    seen: set[Path] = set()
    out: list[Path] = []

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(path)

    for root in paths:
        if root.is_file():
            add(root)
            continue
        if not root.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such file or folder", str(root))
        for folder, dirs, files in os.walk(root):
            here = Path(folder)
            dirs[:] = sorted(
                d for d in dirs if not d.startswith(".") and (here / d).resolve() != skip
            )
            for name in sorted(files):
                if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                add(here / name)
    return out


# --- the state file ------------------------------------------------------------------------


class State:
    """Finished results, journaled as JSON lines keyed by SHA-256.

    Each line is written and flushed as its result arrives; a torn last line (the
    process killed mid-write) is ignored on reading. Only successes are kept, so
    failures are tried again by the next run.
    """

    def __init__(self, path: Path | None, *, fresh: bool, writable: bool) -> None:
        self.path = path
        self.by_hash: dict[str, dict[str, Any]] = {}
        self.by_file: dict[tuple[str, int, int], str] = {}
        self._out: TextIO | None = None
        self._writable = writable and path is not None
        if path is not None and path.exists() and not fresh:
            self._load(path)
        if fresh and self._writable and path is not None and path.exists():
            path.unlink()

    def _load(self, path: Path) -> None:
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("image_hash"), str):
                    continue
                if not isinstance(row.get("category"), str):
                    continue
                self.by_hash[row["image_hash"]] = row
                key = row.get("file")
                if isinstance(key, list) and len(key) == 3:
                    self.by_file[(str(key[0]), int(key[1]), int(key[2]))] = row["image_hash"]

    def __len__(self) -> int:
        return len(self.by_hash)

    @staticmethod
    def file_key(path: Path) -> tuple[str, int, int]:
        """``(absolute path, size, mtime_ns)``: a re-run trusts it instead of re-hashing."""
        st = path.stat()
        return (str(path.resolve()), st.st_size, st.st_mtime_ns)

    def append(self, record: Record, key: tuple[str, int, int] | None) -> None:
        if not self._writable or record.image_hash is None or not record.ok:
            return
        row: dict[str, Any] = {"image_hash": record.image_hash}
        row |= {name: getattr(record, name) for name in _RESULT_FIELDS}
        row["file"] = list(key) if key else None
        if self._out is None:
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._out = self.path.open("a", encoding="utf-8")
            if self._out.tell() and not _ends_with_newline(self.path):
                self._out.write("\n")  # a torn line from a killed run stays on its own
        self._out.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._out.flush()
        self.by_hash[record.image_hash] = row

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# --- sorting into folders ------------------------------------------------------------------


def _same_content(a: Path, b: Path) -> bool:
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
        return hash_file(a)[0] == hash_file(b)[0]
    except OSError:
        return False


def _install(src: Path, dest: Path, mode: Mode) -> None:
    """Put *src* at *dest*, never replacing anything there (``FileExistsError``)."""
    if mode == "link":
        os.symlink(src.resolve(), dest)
        return
    if mode == "move":
        try:
            os.link(src, dest)
        except FileExistsError:
            raise
        except OSError:
            pass  # another device, or no hard links there: copy, then remove
        else:
            src.unlink()
            return
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        shutil.copy2(src, tmp)
        try:
            os.link(tmp, dest)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this filesystem (FAT, some network shares)
            if os.path.lexists(dest):
                raise FileExistsError(errno.EEXIST, "exists", str(dest)) from None
            os.rename(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    if mode == "move":
        src.unlink()


class Sorter:
    """Places photos into ``root/<category>/`` by copy, move or symlink."""

    def __init__(self, root: Path, mode: Mode, *, dry_run: bool) -> None:
        self.root = root
        self.mode = mode
        self.dry_run = dry_run
        self._planned: set[Path] = set()  # names a dry run has already handed out

    def place(self, src: Path, category: str) -> tuple[Path, str]:
        """``(destination, action)``; action is ``copied``/``moved``/``linked``,
        ``already there``, or ``would copy`` (and so on) in a dry run."""
        folder = self.root / category
        stem, suffix = src.stem, src.suffix
        for n in range(100_000):
            dest = folder / (f"{stem}-{n}{suffix}" if n else src.name)
            if dest in self._planned:
                continue
            if os.path.lexists(dest):
                if _same_content(src, dest):
                    if self.mode == "move" and not self.dry_run and not _samefile(src, dest):
                        src.unlink()  # the earlier run's copy is complete
                    return dest, "already there"
                continue
            if self.dry_run:
                self._planned.add(dest)
                return dest, f"would {self.mode}"
            folder.mkdir(parents=True, exist_ok=True)
            try:
                _install(src, dest, self.mode)
            except FileExistsError:
                continue
            return dest, _PAST[self.mode]
        raise OSError(f"no free name for {src.name} in {folder}")


def _samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# --- progress --------------------------------------------------------------------------------


class Progress:
    """A one-line bar on a terminal; otherwise a plain count every tenth of the way."""

    WIDTH = 28

    def __init__(self, total: int, stream: TextIO, *, clock: Callable[[], float]) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        self.tty = stream.isatty()
        self._clock = clock
        self._t0 = clock()
        self._step = max(1, math.ceil(total / 10))
        self._drawn = False

    def advance(self, note: str = "") -> None:
        self.done += 1
        if self.tty:
            self._draw(note)
        elif self.done % self._step == 0 or self.done == self.total:
            print(f"classified {self.done}/{self.total}", file=self.stream, flush=True)

    def _draw(self, note: str) -> None:
        frac = self.done / self.total if self.total else 1.0
        filled = round(frac * self.WIDTH)
        elapsed = max(self._clock() - self._t0, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        line = (
            f"\r[{bar}] {self.done}/{self.total} {frac:4.0%}  {rate:5.1f}/s  "
            f"eta {eta:4.0f}s  {note[:24]:<24}"
        )
        self.stream.write(line)
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        """Erase the bar (before other output, and at the end)."""
        if self._drawn:
            self.stream.write("\r" + " " * (self.WIDTH + 70) + "\r")
            self.stream.flush()
            self._drawn = False


# --- output ------------------------------------------------------------------------------------


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def write_output(path: Path, records: Sequence[Record], summary: dict[str, Any]) -> None:
    """Results as JSON (``{"summary", "results"}``) or CSV (one row per photo)."""
    rows = [dataclasses.asdict(r) for r in records]
    if path.suffix.lower() == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        _write_atomically(path, buf.getvalue())
    else:
        text = json.dumps({"summary": summary, "results": rows}, ensure_ascii=False, indent=2)
        _write_atomically(path, text + "\n")


def summarise(records: Sequence[Record], elapsed_s: float) -> dict[str, Any]:
    """Counts for the table and the JSON output."""
    ok = [r for r in records if r.ok]
    fresh = [r for r in ok if not r.resumed]
    sources = Counter("resumed" if r.resumed else (r.source or "unknown") for r in ok)
    return {
        "photos": len(records),
        "classified": len(ok),
        "failed": len(records) - len(ok),
        "resumed": sum(1 for r in ok if r.resumed),
        "cache_hits": sum(1 for r in fresh if r.from_cache),
        "categories": dict(Counter(r.category for r in ok).most_common()),
        "sources": dict(sources.most_common()),
        "actions": dict(Counter(r.action for r in records if r.action).most_common()),
        "elapsed_s": round(elapsed_s, 3),
    }


def print_summary(
    summary: dict[str, Any], records: Sequence[Record], out: TextIO, *, where: str
) -> None:
    """The table: category counts, sources and cache hits, sorting, failures."""
    p = summary
    print(
        f"{p['photos']} photos, {p['classified']} classified, {p['failed']} failed "
        f"in {p['elapsed_s']:.1f}s ({where})",
        file=out,
    )

    def table(title: str, counts: dict[str, int]) -> None:
        if not counts:
            return
        width = max(len(title), *(len(k) for k in counts))
        print(f"\n  {title:<{width}}  photos", file=out)
        for key, n in counts.items():
            print(f"  {key:<{width}}  {n:>6}", file=out)

    table("category", p["categories"])
    table("source", p["sources"])
    asked = p["classified"] - p["resumed"]
    if asked and where != "local model":
        share = p["cache_hits"] / asked
        print(f"\n  cache hits: {p['cache_hits']} of {asked} ({share:.0%})", file=out)
    table("sorting", p["actions"])
    failed = [r for r in records if not r.ok]
    if failed:
        print(f"\n  failures ({len(failed)})", file=out)
        for r in failed:
            print(f"  {r.path}: {r.error_code or 'error'}: {r.error}", file=out)


def _resume(
    files: Sequence[Path], state: State, keys: list[tuple[str, int, int] | None]
) -> list[Record | None]:
    """What an earlier run finished, per file: by (path, size, mtime), else by hash.

    Fills *keys* with each file's (path, size, mtime) for the journal. Runs in a
    worker thread: it may read every file.
    """
    out: list[Record | None] = []
    for index, path in enumerate(files):
        try:
            keys[index] = key = State.file_key(path)
            h = (state.by_file.get(key) or hash_file(path)[0]) if len(state) else None
        except OSError:
            h = None
        row = state.by_hash.get(h) if h is not None else None
        if row is None:
            out.append(None)
            continue
        record = Record(path=str(path), image_hash=h, resumed=True)
        for name in _RESULT_FIELDS:
            setattr(record, name, row.get(name))
        out.append(record)
    return out


# --- running -------------------------------------------------------------------------------------


class PhotoClassifier(Protocol):
    """What local mode needs: :class:`xintu.vision.LocalClassifier` (or a test's fake)."""

    def classify(self, data: bytes) -> Classification: ...


@dataclass(slots=True)
class _Run:
    options: Options
    files: list[Path]
    records: list[Record | None]
    keys: list[tuple[str, int, int] | None]
    state: State
    sorter: Sorter | None
    progress: Progress
    out: TextIO

    @trio.lowlevel.enable_ki_protection
    def finish(self, index: int, record: Record) -> None:
        """Journal, sort and count one photo (Ctrl-C waits until this is done)."""
        if not record.resumed:
            self.state.append(record, self.keys[index])
        if record.ok and self.sorter is not None and record.category is not None:
            try:
                dest, action = self.sorter.place(self.files[index], record.category)
            except OSError as exc:
                record.action = "not sorted"
                record.error = f"sorting failed: {exc}"
                record.error_code = "sort_failed"
            else:
                record.destination, record.action = str(dest), action
                if self.options.dry_run:
                    self.progress.clear()
                    print(f"would {self.options.mode} {record.path} -> {dest}", file=self.out)
        self.records[index] = record
        self.progress.advance(record.category or "failed")


def _record_from_item(path: Path, item: BatchItem) -> Record:
    record = Record(path=str(path), image_hash=item.image_hash)
    if item.result is not None:
        r = item.result
        record.category, record.confidence, record.source = r.category, r.confidence, r.source
        record.from_cache, record.description = r.from_cache, r.description
        record.provider, record.model = r.provider, r.model
    elif item.error is not None:
        record.error, record.error_code = item.error.message, item.error.error_code
    return record


async def _remote(options: Options, files: list[Path], done: Callable[[int, Record], None]) -> None:
    assert options.server is not None
    async with AsyncClient(options.server, api_key=options.api_key) as client:
        await client.classify_many(
            files,
            concurrency=options.concurrency,
            on_result=lambda item: done(item.index, _record_from_item(files[item.index], item)),
        )


async def _local(
    config: Config,
    options: Options,
    files: list[Path],
    done: Callable[[int, Record], None],
    classifier: PhotoClassifier | None,
) -> None:
    from ..errors import XintuError

    def load() -> PhotoClassifier:
        from ..vision import StandaloneModel, build_local_model

        return StandaloneModel(build_local_model(config))

    if classifier is None:
        classifier = await trio.to_thread.run_sync(load)
    limiter = trio.CapacityLimiter(options.concurrency)
    model = classifier

    def classify(path: Path) -> Record:
        record = Record(path=str(path))
        try:
            data = path.read_bytes()
            record.image_hash = hashlib.sha256(data).hexdigest()
            c = model.classify(data)
        except OSError as exc:
            record.error, record.error_code = f"{exc.strerror or exc}", "file_unreadable"
        except XintuError as exc:
            record.error, record.error_code = exc.message, exc.error_code
        else:
            record.category, record.confidence = c.category.value, round(c.confidence, 4)
            record.source, record.from_cache = c.source.value, False
            record.description, record.provider, record.model = c.description, c.provider, c.model
        return record

    async def one(index: int) -> None:
        record = await trio.to_thread.run_sync(classify, files[index], limiter=limiter)
        done(index, record)

    async with trio.open_nursery() as nursery:
        for index in range(len(files)):
            nursery.start_soon(one, index)


async def _main(
    config: Config,
    options: Options,
    out: TextIO,
    err: TextIO,
    classifier: PhotoClassifier | None,
) -> int:
    t0 = time.monotonic()
    exclude = options.sort_into
    try:
        files = await trio.to_thread.run_sync(lambda: collect(options.paths, exclude=exclude))
    except FileNotFoundError as exc:
        print(f"xintu classify: {exc.filename}: no such file or folder", file=err)
        return 2
    where = options.server or "local model"
    if options.server is not None:
        async with AsyncClient(options.server, api_key=options.api_key) as probe:
            try:
                await probe.ready()
            except (TransportError, AuthenticationError) as exc:
                print(f"xintu classify: {options.server}: {exc.message}", file=err)
                return 1
            except XintuClientError:
                pass  # no /readyz (an older server): the photos will tell

    state_path = options.state_path()
    state = State(state_path, fresh=options.fresh, writable=not options.dry_run)
    records: list[Record | None] = [None] * len(files)
    keys: list[tuple[str, int, int] | None] = [None] * len(files)
    sorter = (
        Sorter(options.sort_into, options.mode, dry_run=options.dry_run)
        if options.sort_into is not None
        else None
    )
    progress = Progress(len(files), err, clock=time.monotonic)
    run = _Run(options, files, records, keys, state, sorter, progress, out)

    resumed = await trio.to_thread.run_sync(_resume, files, state, keys)
    todo: list[int] = []
    for index, record in enumerate(resumed):
        if record is None:
            todo.append(index)
        else:
            run.finish(index, record)

    def done(position: int, record: Record) -> None:
        run.finish(todo[position], record)

    interrupted = False

    async def on_signal(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Ctrl-C or SIGTERM cancels the work; what has finished is journaled already.
        nonlocal interrupted
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                interrupted = True
                nursery.cancel_scope.cancel()
                return

    try:
        pending = [files[i] for i in todo]
        async with trio.open_nursery() as nursery:
            if threading.current_thread() is threading.main_thread():
                await nursery.start(on_signal)
            if pending and options.server is not None:
                await _remote(options, pending, done)
            elif pending:
                await _local(config, options, pending, done, classifier)
            nursery.cancel_scope.cancel()
    except KeyboardInterrupt:
        interrupted = True
    except BaseExceptionGroup as group:
        ki, rest = group.split(KeyboardInterrupt)
        if rest is not None:
            raise rest from None
        interrupted = ki is not None
    finally:
        state.close()
        progress.clear()

    finished = [r for r in records if r is not None]
    if interrupted:
        print(
            f"xintu classify: interrupted after {len(finished)} of {len(files)} photos; "
            f"run the same command again to continue"
            + (f" (state: {state_path})" if state_path and not options.dry_run else ""),
            file=err,
        )
        return 130
    summary = summarise(finished, time.monotonic() - t0)
    if options.output is not None and not options.dry_run:
        write_output(options.output, finished, summary)
    print_summary(summary, finished, out, where=where)
    if options.dry_run:
        print("\ndry run: nothing was written, copied, moved or linked", file=out)
    return 1 if summary["failed"] else 0


def run(
    config: Config,
    options: Options,
    *,
    out: TextIO | None = None,
    classifier: PhotoClassifier | None = None,
) -> int:
    """Run ``xintu classify``; returns the exit code (130 when interrupted).

    *classifier* replaces the local model in local mode (tests).
    """
    # httpx logs every request at INFO: too chatty for a command line.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stdout = out if out is not None else sys.stdout
    try:
        return trio.run(_main, config, options, stdout, sys.stderr, classifier)
    except KeyboardInterrupt:
        print("xintu classify: interrupted", file=sys.stderr)
        return 130
