"""Per-API-key rate limits: one token bucket per key, held in this process.

A key may spend up to ``burst`` tokens at once, and its bucket refills at ``rate`` tokens per
second. An ordinary request costs one token; a batch costs one per job it carries, so a
caller cannot get around the limit by batching.

The buckets live in the producer process. With several producer processes behind a load
balancer, each one enforces the configured limit on its own, so a key's effective limit is
the configured one times the number of processes; configure each process with its share (or
enforce a global limit in front of them). The number of buckets is bounded by the number of
configured API keys: only requests that presented a valid key are ever charged.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable
from typing import Final

DEFAULT_RATE_PER_SECOND: Final = 1000.0
DEFAULT_BURST: Final = 2000


class RateLimiter:
    """Token buckets keyed by an API key's identity (its stored hash, never the key).

    Takes the refill ``rate`` in tokens per second, the bucket size ``burst`` and a monotonic
    ``clock`` in seconds. Raises ``ValueError`` when the rate is not a positive finite number or
    the burst is below 1: a limiter that cannot admit anything, or admits everything, is a
    configuration mistake, not a policy. Safe to use from several threads.
    """

    def __init__(
        self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"the rate must be a positive number of requests per second: {rate}")
        if burst < 1:
            raise ValueError(f"the burst must be at least 1: {burst}")
        self.rate = float(rate)
        self.burst = int(burst)
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (tokens, instant of the last update); a missing key has a full bucket.
        self._buckets: dict[Hashable, tuple[float, float]] = {}

    @classmethod
    def from_settings(cls, settings: object) -> RateLimiter:
        """The limiter the settings describe: ``rate_limit_per_second`` and
        ``rate_limit_burst``, each defaulting when absent or unset."""
        rate = getattr(settings, "rate_limit_per_second", None)
        burst = getattr(settings, "rate_limit_burst", None)
        return cls(
            rate=DEFAULT_RATE_PER_SECOND if rate is None else float(rate),
            burst=DEFAULT_BURST if burst is None else int(burst),
        )

    def acquire(self, key: Hashable, cost: int = 1) -> float:
        """Take ``cost`` tokens from ``key``'s bucket.

        Returns 0.0 when they were taken, or else the seconds to wait before the same request
        would be admitted (and takes nothing). A request costing more than ``burst`` (a batch
        larger than the bucket) is admitted when the bucket is full and leaves it in debt, so
        it is neither refused forever nor a way around the average rate.
        """
        return self._decide(key, cost, take=True)

    def wait_time(self, key: Hashable, cost: int = 1) -> float:
        """Like ``acquire``, but takes nothing: 0.0 when ``cost`` tokens would be admitted now."""
        return self._decide(key, cost, take=False)

    def _decide(self, key: Hashable, cost: int, *, take: bool) -> float:
        if cost < 0:
            raise ValueError(f"a request cannot cost {cost} tokens")
        with self._lock:
            now = self._clock()
            tokens, updated = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - updated) * self.rate)
            needed = min(cost, self.burst)
            if tokens + 1e-9 < needed:
                self._buckets[key] = (tokens, now)
                return (needed - tokens) / self.rate
            self._buckets[key] = (tokens - cost if take else tokens, now)
            return 0.0


def retry_after_seconds(wait: float) -> int:
    """The ``Retry-After`` value for a wait: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait))


class WaitBudget:
    """How many job ids each API key may be waiting on (``?wait``) at once, in this process.

    A waiting request costs the producer a read of each of its ids every poll tick for as long
    as it waits, which its one charge to the rate limit does not cover; this bounds what one
    key's waits can add to every tick, so that a key flooding waits cannot slow down the
    others. ``limit`` is the budget per key; a request for more ids than that is admitted
    when the key has no other wait in progress (so that a full status batch is always
    possible). Keys with nothing held take no memory. Safe to use from several threads.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the wait budget must be at least 1: {limit}")
        self.limit = int(limit)
        self._lock = threading.Lock()
        self._held: dict[Hashable, int] = {}
        self._total = 0

    @property
    def total(self) -> int:
        """How many ids all keys together are waiting on now."""
        return self._total

    def take(self, key: Hashable, count: int) -> bool:
        """Hold ``count`` ids for ``key``; False (holding nothing) when over its budget."""
        if count < 1:
            raise ValueError(f"a wait holds at least one id, not {count}")
        with self._lock:
            held = self._held.get(key, 0)
            if held and held + count > self.limit:
                return False
            self._held[key] = held + count
            self._total += count
            return True

    def release(self, key: Hashable, count: int) -> None:
        """Give back ``count`` ids that ``take`` held for ``key``."""
        with self._lock:
            held = self._held.get(key, 0)
            self._total -= min(held, count)
            remaining = held - count
            if remaining > 0:
                self._held[key] = remaining
            else:
                self._held.pop(key, None)

    def held(self, key: Hashable) -> int:
        """How many ids ``key`` is waiting on now."""
        with self._lock:
            return self._held.get(key, 0)
