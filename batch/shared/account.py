"""One process's handle on the limits its account shares (`limits.shared`): opened by the run, closed at its end.

Only a job with limits.shared imports the Redis client (a third of a second): the imports are in `shared_limits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiolimiter import AsyncLimiter

    from batch.plan import Limits
    from batch.shared.connection import Link
    from batch.shared.leases import Leases
    from batch.shared.rates import SharedRate
    from batch.shared.spend import SharedSpend


class SharedLimits:
    """The link to Redis and what runs over it: the in-flight leases (batch/shared/leases.py), the rates
    (batch/shared/rates.py), the budget (batch/shared/spend.py); every lease and hold renewed every third of the
    TTL, until the run ends."""

    def __init__(self, link: Link, url: str, prefix: str, token: str, leases: Leases) -> None:
        self.link = link
        self.url = url
        self.prefix = prefix
        self.token = token
        self.leases = leases
        self.budget: SharedSpend | None = None
        self._keeping: asyncio.Task[None] | None = None
        # Set by close: the renewals end at it even when their task's cancel was lost (Python 3.11's wait_for, which
        # a Redis call may be in, drops a cancel that comes as its call completes: the task would renew forever).
        self._closing = asyncio.Event()

    def rate(self, name: str, per_minute: float, static_share: Callable[[int], AsyncLimiter]) -> SharedRate:
        """The account's `name` (requests, tokens) per minute; `static_share(N)` is this process's limiter while
        Redis is away, N processes sharing it."""
        from batch.shared.rates import SharedRate

        return SharedRate(self.link, self.url, self.prefix, name, per_minute, lambda: self.leases.sharing,
                          static_share)

    def spend(self, job: str, checkpoint: str) -> SharedSpend:
        """The budget of the job whose output is `job`, as this process (writing `checkpoint`) holds and spends it."""
        from batch.shared.spend import SharedSpend

        digest = hashlib.sha256(job.encode()).hexdigest()[:24]
        self.budget = SharedSpend(self.link, f"batch:job:{digest}", checkpoint, self.token,
                                  self.leases.ttl_ms / 1000, lambda: self.leases.sharing)
        return self.budget

    def start(self) -> None:
        self._keeping = asyncio.get_running_loop().create_task(self._keep())

    async def _keep(self) -> None:
        """Renew the leases and the holds every third of their TTL, and count the processes sharing the account."""
        from batch.shared.connection import REDIS_ERRORS

        while not self._closing.is_set():
            if not self.link.down:
                try:
                    await self.leases.renew()
                    if self.budget is not None:
                        await self.budget.renew()
                except REDIS_ERRORS as exc:
                    self.link.lost(exc, "each process keeps to its static share")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.leases.ttl_ms / 3000)

    async def close(self) -> None:
        if self._keeping is not None:
            self._closing.set()
            self._keeping.cancel()
            await asyncio.gather(self._keeping, return_exceptions=True)
        try:
            if self.budget is not None:
                await self.budget.close()
            await self.leases.close()
        finally:
            await self.link.close()


@asynccontextmanager
async def shared_limits(limits: Limits, base_url: str, api_key: str, model: str,
                        shards: int = 1) -> AsyncIterator[SharedLimits | None]:
    """The account's shared limits for one run, or None when the job keeps its limits to itself."""
    if limits.shared is None:
        yield None
        return
    from batch.shared.connection import Link, account_key, keep_password_secret, open_client, process_token
    from batch.shared.leases import Leases

    keep_password_secret(limits.shared)
    link = Link(open_client(limits.shared), limits.shared)
    prefix, token = account_key(base_url, api_key, model), process_token()
    shared = SharedLimits(link, limits.shared, prefix, token,
                          Leases(link, prefix, token, limits.concurrency, limits.shared_lease_s, shards))
    shared.start()
    try:
        yield shared
    finally:
        await shared.close()
