"""A rate limit towards Apple shared by every worker process: a token bucket kept in Redis.

The bucket (tokens and the instant they were counted) lives in one Redis hash and is updated by
one Lua script, so concurrent workers on any number of machines never take more than the rate
plus the burst. Redis's own clock (``TIME``) is used, so the workers' clocks do not matter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final, Protocol

import redis

__all__ = ["LocalTokenBucket", "RateLimit", "RedisTokenBucket", "Unlimited"]

DEFAULT_KEY: Final = "appattest:apple-rate"

# KEYS[1] the bucket; ARGV rate per second, burst. Returns 0 when a token was taken, or the
# microseconds until one will be there.
_TAKE: Final = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate / 1000000)
  at = now
end
local ttl = math.ceil(burst / rate) + 1
if tokens >= 1 then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(at))
  redis.call('EXPIRE', KEYS[1], ttl)
  return 0
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(at))
redis.call('EXPIRE', KEYS[1], ttl)
return math.ceil((1 - tokens) * 1000000 / rate)
"""


class RateLimit(Protocol):
    """Something that admits one call at a time towards Apple."""

    def take(self) -> float:
        """Take one token; return 0 when taken, or the seconds to wait before asking again."""
        ...  # pragma: no cover

    def wait(self) -> None:
        """Block until a token was taken."""
        ...  # pragma: no cover


class Unlimited:
    """No limit (tests of single outcomes, dry runs)."""

    def take(self) -> float:
        return 0.0

    def wait(self) -> None:
        return None


class RedisTokenBucket:
    """A token bucket of ``rate`` calls per second and ``burst`` calls at once, in Redis.

    Takes a Redis client, the rate, the burst and the hash's name. ``take()`` never blocks;
    ``wait()`` sleeps until it got a token. Raises ``ValueError`` for a rate or burst that is
    not positive; Redis errors propagate (the caller retries the batch later: without the
    limit, no call goes out).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        rate: float,
        burst: int,
        key: str = DEFAULT_KEY,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError("the rate and the burst must be positive")
        self._client = client
        self._rate = rate
        self._burst = burst
        self._key = key
        self._sleep = sleep
        self._script = client.register_script(_TAKE)

    def take(self) -> float:
        micros = int(self._script(keys=[self._key], args=[repr(self._rate), self._burst]))
        return micros / 1_000_000

    def wait(self) -> None:
        while (delay := self.take()) > 0:
            self._sleep(delay)


class LocalTokenBucket:
    """The same bucket in this process only, for a deployment without Redis (the embedded
    broker on one machine): the threads of one worker share it. Thread-safe."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError("the rate and the burst must be positive")
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return 0.0
            return (1 - self._tokens) / self._rate

    def wait(self) -> None:
        while (delay := self.take()) > 0:
            self._sleep(delay)
