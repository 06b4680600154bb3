"""In-flight slots shared by every process of an account: each request in flight holds a lease in Redis.

Why a script of our own: no well-kept library offers in-flight leases that survive a Redis restart (otovo's
redis-rate-limiters, measured, leaked slots and died with ConnectionError). Ours is a sorted set of lease ids scored
by their expiry, and one Lua script (atomic in Redis) drops the expired ones, counts the rest and adds the new lease
only under the limit. A process renews its leases every third of their TTL, so one killed without a word (kill -9,
a lost host) gives its slots back within the TTL; a renewal adds back a lease Redis no longer has (a restarted Redis
lost them all), so the set counts what is really in flight.

Fair turns: a process refused a slot marks itself waiting for a moment; while another process waits, one that holds
its share of the limit (limit / processes waiting, rounded up) is refused too, so a busy process cannot keep every
slot it frees for its own rows.

An outage (batch/shared/connection.py's Link): a process keeps to its static share, limit / N, N the most processes
seen sharing the account (or the shard count, if more), counting the requests it already has in flight. So the
processes together never have more than twice the limit in flight (the leases they held when Redis went away, plus
their shares), and only until those requests end; back on the link, a process gives Redis its leases before it asks
for a new one. A restart that no call of a process saw (between its calls) lets the others run past the limit until
that process's next renewal, a third of the TTL at most, and never past twice the limit.

Time is the server's (Redis's TIME) unless a clock is given (the tests'): hosts' clocks need not agree.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable

from batch.shared.connection import LUA_NOW, REDIS_ERRORS, Link
from batch.wording import counted

log = logging.getLogger("batch")

POLL_S = 0.01  # how often a process refused a slot asks again (another process's release is not announced)
WAITING_MS = 250  # how long a refused process counts as waiting: longer than its polls, short after it stops

# KEYS: leases, waiting processes. ARGV: now ms (negative: Redis's clock), limit, TTL ms, the new lease's id, the
# process's token, the leases it holds, how long it counts as waiting if refused (ms). 1: the lease is taken.
ACQUIRE = LUA_NOW + """
local limit, ttl, held = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local others = redis.call('ZCARD', KEYS[2])
if redis.call('ZSCORE', KEYS[2], ARGV[5]) then others = others - 1 end
if redis.call('ZCARD', KEYS[1]) >= limit or (others > 0 and held >= math.ceil(limit / (others + 1))) then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ttl)
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

# KEYS: leases, processes. ARGV: now ms, TTL ms, the process's token, the ids of the leases it holds. Each lease's
# expiry moves a TTL on (a lease Redis lost is added back); returns the processes sharing the account now.
RENEW = LUA_NOW + """
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('PEXPIRE', KEYS[2], ttl)
for i = 4, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
if #ARGV >= 4 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return redis.call('ZCARD', KEYS[2])
"""


class Leases:
    """This process's in-flight slots under the account's shared `limit` (see the module's doc).

    `acquire` waits for a slot; `release` gives one back (its Redis call made in the background, so the pool's
    release stays synchronous). `renew` moves the leases' expiry on (batch/shared/account.py calls it every third of
    the TTL); `close` gives back what is still held.
    """

    def __init__(self, link: Link, prefix: str, token: str, limit: int, ttl_s: float, shards: int = 1,
                 clock_ms: Callable[[], int] | None = None, poll_s: float = POLL_S,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.link = link
        self.keys = (f"{prefix}:leases", f"{prefix}:waiting", f"{prefix}:processes")
        self.token = token
        self.limit = limit
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.shards = max(1, shards)
        self.peers = 1  # the processes sharing the account at the last renewal
        self.held: set[str] = set()  # the leases counted in Redis (in an outage: the requests admitted)
        self._clock_ms = clock_ms
        self._poll_s = poll_s
        self._sleep = sleep
        self._ids = itertools.count()
        self._turn = asyncio.Lock()  # one waiter at a time asks Redis, in the order they came
        self._freed = asyncio.Event()
        self._to_release: list[str] = []
        self._releasing: asyncio.Task[None] | None = None
        self._acquire = link.client.register_script(ACQUIRE)
        self._renew = link.client.register_script(RENEW)
        link.on_back.append(self.renew)

    @property
    def sharing(self) -> int:
        """The processes sharing the account, as last seen (at least the shard count): a static share is 1/this."""
        return max(self.shards, self.peers)

    @property
    def share(self) -> int:
        """The in-flight requests this process keeps to while Redis is away."""
        return max(1, self.limit // self.sharing)

    def _now(self) -> int:
        return -1 if self._clock_ms is None else self._clock_ms()

    def _fallback(self) -> str:
        return (f"this process keeps to {self.share} of {counted(self.limit, 'request')} in flight "
                f"(its share among {counted(self.sharing, 'process')})")

    async def acquire(self) -> None:
        async with self._turn:
            while True:
                freed, moved = self._freed, self.link.moved
                if self.link.down:
                    if len(self.held) < self.share:
                        self.held.add(f"{self.token}:{next(self._ids)}")
                        return
                else:
                    lease = f"{self.token}:{next(self._ids)}"
                    try:
                        taken = await self._acquire(keys=self.keys[:2], args=[
                            self._now(), self.limit, self.ttl_ms, lease, self.token, len(self.held), WAITING_MS])
                    except REDIS_ERRORS as exc:
                        self.link.lost(exc, self._fallback())
                        continue
                    if taken:
                        self.held.add(lease)
                        return
                await _first(freed.wait(), moved.wait(), timeout_s=self._poll_s)

    def release(self) -> None:
        lease = self.held.pop()
        if self.link.down:  # Redis lost it or will let it expire: nothing to tell it
            self._wake()
            return
        self._to_release.append(lease)
        if self._releasing is None:
            self._releasing = asyncio.get_running_loop().create_task(self._release_queued())

    async def _release_queued(self) -> None:
        """The leases released since the last call, given back in one call (more come while it is on its way)."""
        try:
            while self._to_release:
                leases, self._to_release = self._to_release, []
                if self.link.down:
                    continue
                try:
                    await self.link.client.zrem(self.keys[0], *leases)
                except REDIS_ERRORS as exc:  # they expire within the TTL, unrenewed
                    self.link.lost(exc, self._fallback())
                self._wake()
        finally:
            self._releasing = None

    def _wake(self) -> None:
        self._freed.set()
        self._freed = asyncio.Event()

    async def renew(self) -> None:
        """Move every held lease's expiry a TTL on (adding back any Redis lost) and count the processes sharing."""
        peers = await self._renew(keys=[self.keys[0], self.keys[2]],
                                  args=[self._now(), self.ttl_ms, self.token, *self.held])
        self.peers = int(peers)

    async def close(self) -> None:
        """Give back every lease still held (a run that ends leaves none behind; one killed leaves them to expire)."""
        if self._releasing is not None:
            await asyncio.gather(self._releasing, return_exceptions=True)
        leases = [*self.held, *self._to_release]
        self.held.clear()
        if leases and not self.link.down:
            try:
                await self.link.client.zrem(self.keys[0], *leases)
                await self.link.client.zrem(self.keys[2], self.token)
            except REDIS_ERRORS:
                pass  # they expire within the TTL


async def _first(*waits: Awaitable[object], timeout_s: float) -> None:
    """Until the first of `waits` is done, or `timeout_s`."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
