"""How fast rows are sent: the adaptive in-flight limit, the pool-wide pause, retries, and rate limits.

Zhipu caps the requests an account has in flight at a level the user is not told and that moves with
load, and it answers a request over the cap at once with HTTP 429, code 1302. `limits.concurrency` is
the user's ceiling; `AdaptiveLimit` finds the server's cap under it and sits on it.

Why not a latency gradient. TCP Vegas, Netflix's concurrency-limits (Vegas, Gradient2) and Envoy's
adaptive concurrency filter all serve a backend that *queues*: their only signal is latency rising
above its no-load value (Vegas: queue = limit * (1 - rtt_noload / rtt), grow below alpha, shrink above
beta; Gradient2: limit = limit * clamp(long_rtt / short_rtt, 0.5, 1) + a queue allowance, smoothed;
Envoy: the same gradient, with a periodic drop to a few requests to re-measure the minimum RTT). A
server that rejects instead of queueing does not move its latency, so those would never see the cap,
and their noise (lognormal latencies, long prompts) would move the limit for nothing; Gradient2 even
ignores drops. Plain AIMD (Netflix's AIMDLimit, TCP Reno: x0.9 or /2 on a drop, +1 per round) does see
the rejections but forgets what they say: halving 16 leaves 8 in flight, and growing back by one per
round probes the cap, and is refused, every round.

What a 1302 says. It is an explicit, immediate rejection, and it carries a number: the requests we had
in flight when we sent it (`sent_with`, itself included). The server counts at most what we count (a
request of ours may not have reached it yet, or its answer may be on its way back), so a request sent as
the n-th in flight and refused proves the cap is at most n - 1, where it is now: the limit drops to
n - 1 at once, no halving, and no cascade when several refusals of one burst arrive (the lowest n
wins). That n is kept as the *ceiling*. Below the ceiling the limit grows by one per round of answers
(1/limit per success, only while the limit is what holds requests back); the last step, which probes
the ceiling, takes PROBE_ROUNDS rounds, so a steady state costs one refused request per PROBE_ROUNDS
rounds (1/(8 x 16), under 1%, at a cap of 16). A request answered although sent at or above the
ceiling shows the cap rose (or another client of the account left): the ceiling is forgotten. The limit
starts at INITIAL_LIMIT (or the user's ceiling, if lower) and, until the first refusal, grows by one per
success (TCP's slow start: doubling per round). Each new request is sent when an answer frees its slot,
and a refusal comes back within a round trip, so slow start overshoots the cap by a request or two,
where starting at a ceiling of 64 against a cap of 16 would be refused 48 times at once. Latency plays
no part.

Retry-After delays only the request it came with: the row waits out its retry holding no slot, and the
other rows go on (batch/online/pool.py). The pool as a whole pauses only when the server says so for everyone:
a Retry-After on an answer whose code says the model is overloaded for every caller (`pool_pause`: the
provider's BusinessCodes.overloaded, Zhipu's 1305).
A 1302's Retry-After speaks of our own concurrency, which the limit above already corrects.

With `limits.shared`, a request holds a lease on one of the account's slots too (batch/shared/leases.py), taken
once it has its own slot: the adaptive limit finds the server's cap for this process, inside the ceiling all the
processes share.

Every timed part takes its clock and its sleep as arguments, so the tests drive them with a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiolimiter import AsyncLimiter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential_jitter,
)

from batch.online.failures import Failure
from batch.providers import ZHIPU_CODES, BusinessCodes

if TYPE_CHECKING:
    from batch.shared.leases import Leases

INITIAL_LIMIT = 8  # the default limits.concurrency: a job left at its default never waits for slow start
PROBE_ROUNDS = 8  # rounds of answers spent at the ceiling - 1 before it is probed again
MAX_RETRY_AFTER_S = 600.0

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]

RETRY_TRANSIENT = retry_if_exception(lambda exc: isinstance(exc, Failure) and exc.scope == "retry")

log = logging.getLogger("batch")


class AdaptiveLimit:
    """The most requests to have in flight: the server's cap as the refusals reveal it (see the module's doc)."""

    __slots__ = ("maximum", "value", "allowed", "ceiling", "refused_yet", "throttles")

    def __init__(self, maximum: int, initial: int = INITIAL_LIMIT) -> None:
        self.maximum = maximum
        self.value = float(min(maximum, initial))
        self.allowed = int(self.value)  # what acquire compares with, kept so the hot path does no arithmetic
        self.ceiling: int | None = None  # the fewest in flight a refused request was sent with
        self.refused_yet = False
        self.throttles = 0

    def succeeded(self, sent_with: int, in_flight: int) -> None:
        """A request sent as the `sent_with`-th in flight was answered; `in_flight` still counts it."""
        if self.ceiling is not None and sent_with >= self.ceiling:
            self.ceiling = None  # the server took what it refused before: its cap rose
        # Grow only a limit that is what holds requests back: an idle pool must not inflate it untested.
        if in_flight < self.allowed or self.value >= self.maximum:
            return
        if not self.refused_yet:
            step = 1.0
        elif self.ceiling is not None and self.allowed + 1 >= self.ceiling:
            step = 1 / (PROBE_ROUNDS * self.value)
        else:
            step = 1 / self.value
        self._set(min(float(self.maximum), self.value + step))

    def throttled(self, sent_with: int) -> None:
        """A request sent as the `sent_with`-th in flight was refused (429): the cap is below `sent_with`."""
        self.throttles += 1
        self.refused_yet = True
        if self.ceiling is None or sent_with < self.ceiling:
            self.ceiling = sent_with
        bound = max(1, sent_with - 1)
        if bound < self.value:
            self._set(float(bound))

    def _set(self, value: float) -> None:
        self.value = value
        self.allowed = int(value)


class Slots:
    """Requests in flight under an AdaptiveLimit, handed out in turn, and the pause the server can ask of all.

    `acquire` returns the number in flight with the new request (its `sent_with`); each acquire is ended
    by exactly one of `succeeded`, `throttled` or `release` (any other end, which says nothing of the cap).
    With `shared` leases, a slot is also a lease on one of the account's slots, taken after this process's own.
    """

    def __init__(self, maximum: int, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep,
                 shared: Leases | None = None) -> None:
        self.adaptive = AdaptiveLimit(maximum)
        self.shared = shared
        self.in_flight = 0
        self._clock = clock
        self._sleep = sleep
        self._waiting: deque[asyncio.Future[int]] = deque()
        self._paused_until = 0.0  # 0: not paused, so the hot path reads no clock
        self._resuming: asyncio.Task[None] | None = None

    @property
    def limit(self) -> float:
        return self.adaptive.value

    @property
    def throttles(self) -> int:
        return self.adaptive.throttles

    @property
    def paused(self) -> bool:
        return self._paused_until > 0

    async def acquire(self) -> int:
        sent_with = await self._acquire_own()
        if self.shared is not None:
            try:
                await self.shared.acquire()
            except BaseException:  # cancelled while it waited for the account's slot: it holds only its own
                self._release_own()
                raise
        return sent_with

    async def _acquire_own(self) -> int:
        if self.in_flight < self.adaptive.allowed and not self._waiting and not self._paused_until:
            self.in_flight += 1
            return self.in_flight
        turn: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release_own()  # handed a slot just as it was cancelled: pass it on
            raise

    def succeeded(self, sent_with: int) -> None:
        self.adaptive.succeeded(sent_with, self.in_flight)
        self.release()

    def throttled(self, sent_with: int, pause_s: float | None = None) -> None:
        before = self.adaptive.allowed
        self.adaptive.throttled(sent_with)
        log.debug("throttled (429) for a request sent as number %d in flight: concurrency limit %d -> %d%s",
                  sent_with, before, self.adaptive.allowed,
                  f"; the server is overloaded: every request pauses {pause_s:.2f} s" if pause_s else "")
        if pause_s:
            self.pause(pause_s)
        self.release()

    def release(self) -> None:
        if self.shared is not None:
            self.shared.release()
        self._release_own()

    def _release_own(self) -> None:
        self.in_flight -= 1
        if self._waiting:
            self._hand_out()

    def pause(self, seconds: float) -> None:
        """Send nothing for `seconds` (requests in flight go on)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)
        if self._resuming is None:
            self._resuming = asyncio.get_running_loop().create_task(self._resume())

    async def _resume(self) -> None:
        while (left := self._paused_until - self._clock()) > 0:
            await self._sleep(left)
        self._paused_until = 0.0
        self._resuming = None
        self._hand_out()

    def _hand_out(self) -> None:
        if self._paused_until:
            return
        while self._waiting and self.in_flight < self.adaptive.allowed:
            turn = self._waiting.popleft()
            if not turn.done():  # done: its waiter was cancelled
                self.in_flight += 1
                turn.set_result(self.in_flight)


def pool_pause(failure: Failure, codes: BusinessCodes = ZHIPU_CODES) -> float | None:
    """How long every request waits after `failure`: only the server's word for everyone (see the module's doc), by
    the provider's business `codes`."""
    if failure.code in codes.overloaded and failure.retry_after is not None:
        return min(failure.retry_after, MAX_RETRY_AFTER_S)
    return None


class Retries:
    """When a failed request is sent again: after the server's Retry-After if it sent one (capped at 600 s), else
    after an exponential backoff with jitter; never after `max_attempts` attempts or once the run is stopping."""

    def __init__(self, max_attempts: int, initial_backoff_s: float, max_backoff_s: float, stopping: asyncio.Event,
                 sleep: Sleep | None = None) -> None:
        self._stop = stop_after_attempt(max_attempts) | stop_when_event_set(stopping)  # type: ignore[arg-type]
        self._backoff = wait_exponential_jitter(multiplier=initial_backoff_s, max=max_backoff_s,
                                                jitter=initial_backoff_s)
        self._sleep = sleep or functools.partial(sleep_unless_set, stopping)

    def retrying(self, before_sleep: Callable[[RetryCallState], None] | None = None) -> AsyncRetrying:
        """A fresh retry loop: it keeps per-call state, so each row needs its own."""
        return AsyncRetrying(stop=self._stop, wait=self.wait, retry=RETRY_TRANSIENT, reraise=True,
                             sleep=self._sleep, before_sleep=before_sleep)

    def wait(self, state: RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome else None
        if isinstance(failure, Failure) and failure.retry_after is not None:
            return min(failure.retry_after, MAX_RETRY_AFTER_S)
        return self._backoff(state)


async def sleep_unless_set(event: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or until `event` is set. A row waiting its backoff holds no slot: a stopping run wakes it at
    once (it then sends nothing: the pool checks), rather than waiting out its grace period for it."""
    if not event.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)


def token_limiter(per_minute: float | None) -> AsyncLimiter | None:
    """Tokens per minute as a one-second bucket: a request's tokens must fit in it, a minute's burst must not."""
    if per_minute is None:
        return None
    per_second = per_minute / 60
    capacity = max(1.0, per_second)
    return AsyncLimiter(capacity, time_period=capacity / per_second)


def request_limiter(per_minute: float | None) -> AsyncLimiter | None:
    """One request per 1/rate seconds, no burst: a full bucket's burst at start trips servers that count per second."""
    return None if per_minute is None else AsyncLimiter(1, time_period=60 / per_minute)
