"""Models for the local pool's worker processes (tests/test_local_procs.py).

A worker process builds its model from a module-level builder that it imports by
name, so these live in a module of their own that the processes can import (the
pool hands them the tests' ``sys.path``).

:class:`ProcFakeModel` classifies like :class:`tests.fakes.FakeModel` (by the bytes'
hash; ``b"bad..."`` is a bad image), and obeys a few commands in the bytes:

- ``b"pid"``: the description is the process id;
- ``b"hold:PATH"``: writes the process id into PATH, then waits (at most
  :data:`HOLD_S`) for PATH to disappear, so that a test can kill it mid-photo;
- ``b"boom"``: raises a plain ``RuntimeError`` (not a Xintu error).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xintu import Classification, Config, Source
from xintu.errors import BadImage, ModelError

from .fakes import fake_category

HOLD_S = 30.0


@dataclass(frozen=True)
class FakeStatistics:
    """What one process's model counted; adds up like ``LocalStatistics``."""

    prepared: int
    pids: frozenset[int]

    def __add__(self, other: FakeStatistics) -> FakeStatistics:
        return FakeStatistics(self.prepared + other.prepared, self.pids | other.pids)


class ProcFakeModel:
    model_name = "proc-fake-model"

    def __init__(self) -> None:
        self.prepared = 0

    def statistics(self) -> FakeStatistics:
        return FakeStatistics(self.prepared, frozenset({os.getpid()}))

    def prepare(self, data: bytes) -> bytes:
        self.prepared += 1
        if data.startswith(b"bad"):
            raise BadImage("not an image")
        if data == b"boom":
            raise RuntimeError("boom")
        if data.startswith(b"hold:"):
            path = Path(data[5:].decode())
            path.write_text(str(os.getpid()))
            deadline = time.monotonic() + HOLD_S
            while path.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return data

    def infer(self, batch: Sequence[bytes]) -> list[Classification]:
        return [
            Classification(
                category=fake_category(data),
                confidence=0.5,
                source=Source.LOCAL,
                model=self.model_name,
                description=str(os.getpid()) if data == b"pid" else "fake",
                local_inference_result={"rule": "fake"},
            )
            for data in batch
        ]


def build_fake(config: Config) -> ProcFakeModel:
    return ProcFakeModel()


def build_broken(config: Config) -> ProcFakeModel:
    raise ModelError(f"no model in {config.data_dir}")
