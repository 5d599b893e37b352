"""Open-loop classify load mixing known photos (hits) with new ones (misses)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .._context import Bench
from .._services import Service

__all__ = ["TAG_HIT", "TAG_MISS", "mixed_load"]

TAG_HIT = 0
TAG_MISS = 1


def mixed_load(
    bench: Bench,
    svc: Service,
    offsets: npt.NDArray[np.float64],
    *,
    hit_share: float,
    known: list[bytes],
    salt: str,
) -> tuple[list[bytes], npt.NDArray[np.int64], npt.NDArray[np.int16]]:
    """Payloads, choice and tags: each arrival a hit with probability *hit_share*.

    A hit uploads one of the *known* (already classified) photos again; a miss
    uploads a photo never seen before, each its own.
    """
    rng = np.random.default_rng(bench.settings.seed + len(offsets))
    is_hit = rng.random(len(offsets)) < hit_share
    n_miss = int(np.count_nonzero(~is_hit))
    fresh = bench.photos(n_miss, salt)
    payloads = bench.classify_payloads(svc, known) + bench.classify_payloads(svc, fresh)
    choice = np.empty(len(offsets), dtype=np.int64)
    choice[is_hit] = rng.integers(0, len(known), int(is_hit.sum()))
    choice[~is_hit] = len(known) + np.arange(n_miss)
    tags = np.where(is_hit, TAG_HIT, TAG_MISS).astype(np.int16)
    return payloads, choice, tags
