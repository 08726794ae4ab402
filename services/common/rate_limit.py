"""Per-caller rate limits: one token bucket per caller that has a limit.

A bucket holds up to ``burst`` tokens and gains ``per_second`` of them every second; each call
takes one. A caller that has used its burst gets its calls back at the steady rate, and is told
how long until the next token instead of being queued: a caller over its limit waiting in the
server would hold a worker thread that other callers need. Time comes from a monotonic clock
(injectable, so tests need not sleep): wall-clock jumps must neither refill nor drain a bucket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from services.common.callers import RateLimitSpec

Clock = Callable[[], float]


class TokenBucket:
    """A thread-safe token bucket."""

    __slots__ = ("_burst", "_clock", "_lock", "_per_second", "_tokens", "_updated")

    def __init__(self, per_second: float, burst: int, clock: Clock = time.monotonic) -> None:
        if per_second <= 0 or burst < 1:
            raise ValueError("a bucket needs a positive rate and a burst of at least 1")
        self._per_second = per_second
        self._burst = float(burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._updated = clock()

    def take(self) -> float:
        """Take a token: 0.0 when one was there, else the seconds until one will be (none taken)."""
        with self._lock:
            now = self._clock()
            elapsed = max(now - self._updated, 0.0)
            self._tokens = min(self._burst, self._tokens + elapsed * self._per_second)
            self._updated = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self._per_second


class CallerRateLimits:
    """The buckets of every caller that has a rate limit; callers without one are not limited."""

    def __init__(self, limits: Mapping[str, RateLimitSpec], clock: Clock = time.monotonic) -> None:
        self._buckets = {
            name: TokenBucket(limit.per_second, limit.burst, clock)
            for name, limit in limits.items()
        }

    def __bool__(self) -> bool:
        return bool(self._buckets)

    def take(self, caller: str) -> float:
        """Take one of ``caller``'s tokens: 0.0 when the call may go ahead, else seconds to wait."""
        bucket = self._buckets.get(caller)
        return 0.0 if bucket is None else bucket.take()
