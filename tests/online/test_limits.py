"""The adaptive limit, the slots, the pool-wide pause and the retry policy, driven by a fake clock: nothing sleeps."""

from __future__ import annotations

import asyncio
import heapq
import random

import pytest

from batch.online.failures import Failure, classify_status
from batch.online.limits import (
    INITIAL_LIMIT,
    PROBE_ROUNDS,
    AdaptiveLimit,
    Retries,
    Slots,
    pool_pause,
    sleep_unless_set,
)


class FakeClock:
    """A clock that moves only when something sleeps on it: the tests never wait."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # let others run, as a real sleep would


# -- the limit ----------------------------------------------------------------------------------------
def test_slow_start_grows_by_one_per_answer_until_the_first_refusal():
    limit = AdaptiveLimit(64)
    assert limit.allowed == INITIAL_LIMIT
    for _ in range(INITIAL_LIMIT):  # one round of answers, each while the limit held requests back
        limit.succeeded(limit.allowed, limit.allowed)
    assert limit.allowed == 2 * INITIAL_LIMIT


def test_a_refusal_sets_the_limit_just_under_the_in_flight_count_it_was_sent_with():
    limit = AdaptiveLimit(64)
    limit.succeeded(8, 8)  # 9
    for _ in range(11):
        limit.succeeded(limit.allowed, limit.allowed)
    assert limit.allowed == 20
    # A burst sent as the 17th to 20th in flight: all refused, by a server whose cap is 16.
    for sent_with in (17, 18, 19, 20):
        limit.throttled(sent_with)
    assert (limit.allowed, limit.ceiling, limit.throttles) == (16, 17, 4)  # no halving, no cascade
    limit.throttled(12)  # the cap fell (another client of the account): straight down to it
    assert (limit.allowed, limit.ceiling) == (11, 12)
    limit.throttled(1)
    assert limit.allowed == 1  # never below one


def test_the_ceiling_is_probed_only_every_probe_rounds_rounds():
    limit = AdaptiveLimit(64, initial=20)
    limit.throttled(17)
    answers = 0
    while limit.allowed == 16:
        limit.succeeded(16, 16)
        answers += 1
    assert limit.allowed == 17
    assert answers == pytest.approx(PROBE_ROUNDS * 16, rel=0.05)  # PROBE_ROUNDS rounds of 16 answers


def test_below_the_ceiling_the_limit_grows_one_per_round():
    limit = AdaptiveLimit(64, initial=40)
    limit.throttled(31)  # ceiling 31, limit 30
    limit.throttled(11)  # a transient fall: ceiling 11, limit 10
    limit.succeeded(11, 3)  # a request sent at the ceiling was answered: it is forgotten
    assert limit.ceiling is None
    answers = 0
    while limit.allowed < 12:
        limit.succeeded(limit.allowed, limit.allowed)
        answers += 1
    assert answers == pytest.approx(10 + 11, abs=1)  # one round of 10, one of 11


def test_an_answer_sent_at_the_ceiling_shows_the_cap_rose():
    limit = AdaptiveLimit(64, initial=20)
    limit.throttled(17)
    limit.succeeded(17, 3)  # a request sent as the 17th in flight was answered
    assert limit.ceiling is None
    assert limit.allowed == 16  # nothing learnt about growth from an idle moment


def test_an_idle_pool_does_not_grow_its_limit_and_the_maximum_caps_it():
    limit = AdaptiveLimit(10)
    for _ in range(100):
        limit.succeeded(3, 3)  # 3 in flight under a limit of 8: the limit holds nothing back
    assert limit.allowed == 8
    for _ in range(100):
        limit.succeeded(limit.allowed, limit.allowed)
    assert limit.value == 10.0
    assert AdaptiveLimit(3).allowed == 3  # a ceiling under the initial limit


@pytest.mark.parametrize("maximum", [32, 64])
def test_against_a_server_with_a_cap_of_16_the_limit_sits_on_the_cap_with_few_refusals(maximum):
    """Events in fake time: a server that admits 16 in flight, lognormal latencies (median 0.3 s), a 429 at once."""
    cap, rows = 16, 5000
    rng = random.Random(7)
    limit = AdaptiveLimit(maximum)
    completions: list[tuple[float, int, int]] = []  # (when, sequence, sent_with)
    now, sent, answered, pending, busy = 0.0, 0, 0, rows, 0.0
    while answered < rows:
        while pending and len(completions) < limit.allowed:
            sent_with = len(completions) + 1
            sent += 1
            if len(completions) >= cap:
                limit.throttled(sent_with)  # refused at once; the row waits its retry holding no slot
                continue
            pending -= 1
            heapq.heappush(completions, (now + rng.lognormvariate(-1.204, 0.5), sent, sent_with))
        done, _, sent_with = heapq.heappop(completions)
        busy += (done - now) * (len(completions) + 1)
        now = done
        limit.succeeded(sent_with, len(completions) + 1)
        answered += 1
    assert limit.allowed == cap
    assert limit.throttles / sent <= 0.02
    assert busy / now >= 0.97 * cap  # the mean in flight over the run: the server's cap, all but used


# -- the slots ----------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_slots_are_handed_out_in_turn_with_the_in_flight_count_they_were_sent_with():
    slots = Slots(2)
    first, second = await slots.acquire(), await slots.acquire()
    assert (first, second) == (1, 2)
    third = asyncio.ensure_future(slots.acquire())
    fourth = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    assert not third.done()
    slots.release()
    assert await third == 2 and not fourth.done()
    slots.succeeded(2)
    assert await fourth == 2


@pytest.mark.asyncio
async def test_a_cancelled_waiter_leaves_no_slot_behind():
    slots = Slots(1)
    await slots.acquire()
    waiting = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    waiting.cancel()
    slots.release()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert slots.in_flight == 0
    assert await slots.acquire() == 1


@pytest.mark.asyncio
async def test_a_throttle_pauses_nobody_unless_the_server_says_so_for_everyone():
    clock = FakeClock()
    slots = Slots(4, clock=clock, sleep=clock.sleep)
    slots.throttled(await slots.acquire(), pool_pause(rate_limited(1302, retry_after=5)))
    assert await slots.acquire() == 1 and clock.now == 0  # a 1302's Retry-After is that request's alone
    slots.throttled(1, pool_pause(rate_limited(1305, retry_after=3)))  # the model is overloaded for everyone
    assert slots.paused
    assert await slots.acquire() == 1
    assert clock.now == 3.0 and clock.slept == [3.0]
    assert not slots.paused


@pytest.mark.asyncio
async def test_a_pause_asked_again_during_a_pause_extends_it():
    clock = FakeClock()
    slots = Slots(4, clock=clock, sleep=clock.sleep)
    slots.pause(2)
    waiting = asyncio.ensure_future(slots.acquire())
    slots.pause(5)
    assert await waiting == 1
    assert clock.now == 5.0


def rate_limited(code: int, retry_after: float | None) -> Failure:
    return classify_status(429, code, "slow down", retry_after)


def test_only_an_overloaded_answer_with_retry_after_pauses_the_pool():
    assert pool_pause(rate_limited(1305, 3)) == 3
    assert pool_pause(rate_limited(1305, 9999)) == 600  # capped, as a row's own wait is
    assert pool_pause(rate_limited(1305, None)) is None
    assert pool_pause(rate_limited(1302, 3)) is None
    assert pool_pause(rate_limited(1303, 3)) is None


# -- retries ------------------------------------------------------------------------------------------
async def attempts_until_done(retries: Retries, failures: list[Failure]) -> int:
    """Attempts made when each attempt raises the next failure, and the one after them succeeds."""
    made = 0
    async for attempt in retries.retrying():
        with attempt:
            made += 1
            if failures:
                raise failures.pop(0)
    return made


def server_error(retry_after: float | None = None) -> Failure:
    return classify_status(500, 1200, "busy", retry_after)


@pytest.mark.asyncio
async def test_retry_after_replaces_the_backoff_longer_or_shorter():
    clock = FakeClock()
    retries = Retries(5, 20, 60, asyncio.Event(), sleep=clock.sleep)
    made = await attempts_until_done(retries, [rate_limited(1302, 0.5), server_error(retry_after=45),
                                               rate_limited(1302, 10_000)])
    assert made == 4
    assert clock.slept == [0.5, 45, 600]


@pytest.mark.asyncio
async def test_without_retry_after_the_backoff_grows_with_jitter_up_to_its_maximum():
    clock = FakeClock()
    retries = Retries(5, 1, 3, asyncio.Event(), sleep=clock.sleep)
    assert await attempts_until_done(retries, [server_error() for _ in range(4)]) == 5
    first, second, *rest = clock.slept
    assert 1 <= first <= 2 and 2 <= second <= 3 and rest == [3, 3]


@pytest.mark.asyncio
async def test_retries_stop_after_max_attempts_and_when_the_run_stops():
    clock = FakeClock()
    with pytest.raises(Failure):
        await attempts_until_done(Retries(3, 1, 1, asyncio.Event(), sleep=clock.sleep),
                                  [server_error() for _ in range(5)])
    assert len(clock.slept) == 2  # 3 attempts, 2 waits
    stopping = asyncio.Event()
    stopping.set()
    clock.slept.clear()
    with pytest.raises(Failure):
        await attempts_until_done(Retries(30, 1, 1, stopping, sleep=clock.sleep), [server_error()])
    assert clock.slept == []  # stopping: no wait, no second attempt


@pytest.mark.asyncio
async def test_a_backoff_wait_ends_when_the_run_stops():
    stopping = asyncio.Event()
    waiting = asyncio.ensure_future(sleep_unless_set(stopping, 3600))
    await asyncio.sleep(0)
    assert not waiting.done()
    stopping.set()
    await asyncio.wait_for(waiting, 5)  # a guard: it returns at the next turn of the loop, not after an hour
    await asyncio.wait_for(sleep_unless_set(stopping, 3600), 5)  # already stopping: no wait at all
