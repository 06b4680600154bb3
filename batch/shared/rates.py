"""Requests and tokens per minute shared by every process of an account, through the `limits` library's Redis
storage (its sliding window counter: two counters a key, kept by Redis's own clock, atomic in its Lua scripts).

Each rate is two windows: the minute the job's limit speaks of, and a second holding a sixtieth of it (rounded up),
so the processes together spread their requests over the minute as one process does (batch/online/limits.py: a
whole minute's burst at its start trips servers that count per second). Each process still paces itself by its
own limiter in front of these.

Measured against a local redis-server, a hit costs about one round trip (0.1 to 0.2 ms on a loaded 2-core
machine; both windows of one rate: 0.34 ms), paid only by a job with limits.shared and a rate.

An outage (batch/shared/connection.py's Link): the process keeps to its static share of the rate, limit / N (N the
processes last seen sharing the account, or the shard count), by a limiter the pool makes as it makes its own
(`static_share(N)`), until Redis answers again.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable

from aiolimiter import AsyncLimiter
from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from batch.shared.connection import REDIS_ERRORS, Link

MAX_WAIT_S = 1.0  # the longest a refused hit waits before it asks again


class SharedRate:
    """One rate (`name`: requests or tokens) of the account, `per_minute`, shared; while Redis is away, the
    limiter `static_share(N)` for N processes `sharing()` it."""

    def __init__(self, link: Link, url: str, prefix: str, name: str, per_minute: float, sharing: Callable[[], int],
                 static_share: Callable[[int], AsyncLimiter],
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.link = link
        self.name = name
        self.per_minute = per_minute
        self.windows: tuple[RateLimitItem, ...] = (RateLimitItemPerSecond(max(1, math.ceil(per_minute / 60))),
                                                   RateLimitItemPerMinute(max(1, math.floor(per_minute))))
        self.most = self.windows[0].amount  # a hit larger than the second's window could never pass
        storage = RedisStorage(f"async+{url}", implementation="redispy",
                               connection_pool=link.client.connection_pool, key_prefix=prefix)
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self._sharing = sharing
        self._static_share = static_share
        self._sleep = sleep
        self._turn = asyncio.Lock()  # one waiter at a time asks Redis, in the order they came
        self._fallback: tuple[int, AsyncLimiter] | None = None  # the outage it is for, and the limiter

    async def acquire(self, amount: int = 1) -> None:
        amount = max(1, min(amount, self.most))
        async with self._turn:
            while True:
                if self.link.down:
                    fallback = self._outage_limiter()
                    await fallback.acquire(min(amount, fallback.max_rate))
                    return
                try:
                    if await self._hit(amount):
                        return
                except REDIS_ERRORS as exc:
                    self.link.lost(exc, f"this process keeps to its share of {self.name} per minute")
                    continue
                # What the windows take back in the time `amount` is worth at the account's rate.
                await self._sleep(min(MAX_WAIT_S, amount * 60 / self.per_minute))

    async def _hit(self, amount: int) -> bool:
        for window in self.windows:
            if not await self._limiter.hit(window, self.name, cost=amount):
                return False
        return True

    def _outage_limiter(self) -> AsyncLimiter:
        """The limiter of this outage: the process's static share, as many processes as shared it when it began."""
        if self._fallback is None or self._fallback[0] != self.link.outages:
            self._fallback = (self.link.outages, self._static_share(self._sharing()))
        return self._fallback[1]
