"""Rate limiting: a token bucket per client identity (``[ratelimit]``)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import trio

__all__ = ["Clock", "RateLimiter"]

Clock = Callable[[], float]


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
