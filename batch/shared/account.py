"""One process's handle on the limits its account shares (`limits.shared`): opened by the run, closed at its end.

Only a job with limits.shared imports the Redis client (a third of a second): the imports are in `shared_limits`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batch.plan import Limits
    from batch.shared.connection import Link
    from batch.shared.leases import Leases


class SharedLimits:
    """The link to Redis and what runs over it: the in-flight leases (batch/shared/leases.py)."""

    def __init__(self, link: Link, leases: Leases) -> None:
        self.link = link
        self.leases = leases
        self._keeping: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._keeping = asyncio.get_running_loop().create_task(self.leases.keep())

    async def close(self) -> None:
        if self._keeping is not None:
            self._keeping.cancel()
            await asyncio.gather(self._keeping, return_exceptions=True)
        try:
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
    shared = SharedLimits(link, Leases(link, prefix, token, limits.concurrency, limits.shared_lease_s, shards))
    shared.start()
    try:
        yield shared
    finally:
        await shared.close()
