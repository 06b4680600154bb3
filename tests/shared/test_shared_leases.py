"""limits.shared's in-flight leases (batch/shared/leases.py) against a real redis-server, time driven by a fake
clock where the script takes one (its `now`)."""

from __future__ import annotations

import asyncio

import pytest
from helpers import until

from batch.shared.account import SharedLimits
from batch.shared.connection import Link, open_client
from batch.shared.leases import Leases

PREFIX = "batch:test"


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


def leases(url: str, token: str, limit: int, clock: Clock, ttl_s: float = 3.0) -> Leases:
    return Leases(Link(open_client(url), url), PREFIX, token, limit, ttl_s, clock_ms=clock, poll_s=0.005)


@pytest.mark.asyncio
async def test_a_process_that_stops_renewing_gives_its_slots_back_after_the_ttl(redis_server):
    clock = Clock()
    first, second = leases(redis_server.url, "a", 2, clock), leases(redis_server.url, "b", 2, clock)
    await first.acquire()
    await first.acquire()
    waiting = asyncio.create_task(second.acquire())
    await asyncio.sleep(0.05)
    assert not waiting.done(), "a third slot was leased under a limit of 2"
    clock.ms += 2_900  # not yet expired: the first process may still be sending
    await asyncio.sleep(0.05)
    assert not waiting.done()
    clock.ms += 200  # past the TTL, never renewed (a process killed -9)
    await asyncio.wait_for(waiting, 5)
    assert len(second.held) == 1
    for each in (first, second):
        await each.link.close()


@pytest.mark.asyncio
async def test_renewal_keeps_a_lease_past_its_ttl_and_gives_a_restarted_redis_back_what_is_held(redis_server):
    clock = Clock()
    first, second = leases(redis_server.url, "a", 2, clock), leases(redis_server.url, "b", 2, clock)
    await first.acquire()
    await first.acquire()
    clock.ms += 2_000
    await first.renew()
    clock.ms += 2_000  # 4 s after the leases were taken, 2 s after their renewal: still held
    waiting = asyncio.create_task(second.acquire())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    waiting.cancel()
    redis_server.client().flushall()  # what a restart of a Redis that keeps nothing on disk leaves
    await first.renew()
    waiting = asyncio.create_task(second.acquire())
    await asyncio.sleep(0.05)
    assert not waiting.done(), "the restarted Redis let a slot be leased past the limit"
    first.release()
    await asyncio.wait_for(waiting, 5)
    for each in (first, second):
        await each.link.close()


@pytest.mark.asyncio
async def test_a_process_waiting_gets_its_turn_from_one_that_holds_more_than_its_share(redis_server):
    clock = Clock()
    busy, newcomer = leases(redis_server.url, "busy", 4, clock), leases(redis_server.url, "new", 4, clock)
    for _ in range(4):
        await busy.acquire()
    waiting = asyncio.create_task(newcomer.acquire())
    await asyncio.sleep(0.05)
    busy.release()
    again = asyncio.create_task(busy.acquire())  # the busy process asks for the slot it just gave back
    await asyncio.wait_for(waiting, 5)
    assert not again.done(), "the busy process took back its slot while another one waited"
    busy.release()
    await asyncio.wait_for(again, 5)
    for each in (busy, newcomer):
        await each.link.close()


@pytest.mark.asyncio
async def test_in_an_outage_a_process_keeps_to_its_share_counting_what_it_has_in_flight(redis_server):
    clock = Clock()
    own = leases(redis_server.url, "a", 8, clock)
    own.peers = 2  # two processes share the account: a share of 4
    for _ in range(3):
        await own.acquire()
    redis_server.stop()
    await own.acquire()  # the call fails: the link is down, and this one is the fourth of the share
    assert own.link.down and len(own.held) == 4
    fifth = asyncio.create_task(own.acquire())
    await asyncio.sleep(0.05)
    assert not fifth.done(), "past its share while Redis was away"
    own.release()
    await asyncio.wait_for(fifth, 5)
    redis_server.start()
    await until(lambda: not own.link.down, "the link back up")
    assert redis_server.client().zcard(f"{PREFIX}:leases") == 4, "the leases held were not given back to Redis"
    await own.link.close()


class CancelLosingLeases(Leases):
    """Leases whose renewal loses a cancel that comes while it waits, as Python 3.11's asyncio.wait_for (which a
    Redis call may be in) does when the call completes at the same moment."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.renewing = asyncio.Event()

    async def renew(self) -> None:
        self.renewing.set()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass  # the cancel is lost: the renewal goes on
        await super().renew()


@pytest.mark.asyncio
async def test_a_run_ends_its_renewals_even_when_their_cancel_is_lost(redis_server):
    url = redis_server.url
    lost = CancelLosingLeases(Link(open_client(url), url), PREFIX, "a", 2, 0.3)
    shared = SharedLimits(lost.link, url, PREFIX, "a", lost)
    shared.start()
    await lost.renewing.wait()
    await asyncio.wait_for(shared.close(), 5)  # a renewal loop that never ends would hold the run open forever
