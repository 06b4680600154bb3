"""limits.shared's rates (batch/shared/rates.py) against a real redis-server: the account's windows, and the
process's static share while Redis is away."""

from __future__ import annotations

import pytest
from helpers import until

from batch.online.limits import request_limiter
from batch.shared.connection import Link, open_client
from batch.shared.rates import SharedRate


@pytest.mark.asyncio
async def test_a_rate_refused_in_redis_waits_and_while_redis_is_away_keeps_to_the_processes_share(redis_server):
    link = Link(open_client(redis_server.url), redis_server.url, probe_s=0.05)
    shares: list[int] = []

    def static_share(processes: int):
        shares.append(processes)
        return request_limiter(6000 / processes)

    waits: list[float] = []

    async def sleep(seconds: float) -> None:  # the time a refused hit waits, recorded instead of slept
        waits.append(seconds)
        await redis_server_window_passes()

    async def redis_server_window_passes() -> None:
        redis_server.client().flushdb()  # the windows emptied: what the time waited would have done

    rate = SharedRate(link, redis_server.url, "batch:test", "requests", 120, lambda: 3, static_share, sleep=sleep)
    await rate.acquire()
    await rate.acquire()  # the second's window holds 2 (120 a minute)
    assert waits == []
    await rate.acquire()  # refused: waits what one request is worth at the account's rate, then passes
    assert waits == [0.5]
    redis_server.stop()
    await rate.acquire()
    assert link.down and shares == [3]  # the limiter of the outage: 6000 / 3 a minute
    await rate.acquire()
    assert shares == [3]  # made once an outage
    redis_server.start()
    await until(lambda: not link.down, "the link back up")
    await rate.acquire()
    assert redis_server.client().keys("batch:test*"), "the hit was not counted in Redis once it answered"
    await link.close()
