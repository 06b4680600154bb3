"""One row's request: through the limits (batch/online/limits.py), the call, retries; its answer or failure as a record
(batch.records).

Ours are the only retries (the client has none): Zhipu's 1113 (arrears) arrives as HTTP 429 and
must stop the job, not be retried. See batch/online/client.py for why the call is aiohttp, not the SDK.
A request holds a slot only while it is in flight: a row waiting for its retry holds none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tenacity import RetryCallState

from batch.checkpoint.answered import INTERRUPTED
from batch.input.reader import Row
from batch.online.breaker import OUTAGE_CLASSES, Breaker
from batch.online.client import ChatClient
from batch.online.failures import Failure, classify
from batch.online.limits import Retries, Slots, pool_pause, request_limiter, token_limiter
from batch.records import PAID_FIELDS, Record, add_paid_before, answer_record, failed_record, paid_for
from batch.wording import counted

if TYPE_CHECKING:
    from batch.plan import Plan, Settings
    from batch.shared.account import SharedLimits

log = logging.getLogger("batch")


class Stopped(Exception):
    """The run is stopping: this row stays pending (not failed) and a resume will send it."""


class Parked(Exception):
    """The endpoint is down: this attempt does not count against the row, which waits for the outage to end."""


@dataclasses.dataclass
class Asked:
    """One ask of a row (Pool.answer): the requests sent for it, and what the answers to them judged failures cost
    (PAID_FIELDS). Kept by the caller, so what was paid outlives a cancel that cuts the ask off at once (a second
    Ctrl-C): `cut` is then the row's record of it (None: nothing was paid)."""

    sent: int = 0
    spent: dict[str, Any] = dataclasses.field(default_factory=lambda: dict.fromkeys(PAID_FIELDS))
    cut: Record | None = None


class JobFatal(Exception):
    """The API refused the job as a whole; carries the failure that said so."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(str(failure))
        self.failure = failure


def make_client(plan: Plan) -> ChatClient:
    limits = plan.limits
    return ChatClient(plan.base_url, plan.api_key, limits.timeout_s, limits.concurrency, limits.max_response_bytes,
                      limits.idle_timeout_s, plan.provider.codes, plan.proxy)


class Pool:
    def __init__(self, client: ChatClient, settings: Settings, stopping: asyncio.Event,
                 shared: SharedLimits | None = None) -> None:
        """`shared`: the account's limits shared with other processes (limits.shared), or None."""
        self.client = client
        self.model = settings.model
        self.pricer = settings.pricer
        if self.pricer is None:
            log.warning("no known price for model %s: its cost is recorded as unknown (null); "
                        "set pricing: {input: ..., output: ...} in the job to count it", self.model)
        self.body_params = settings.body_params
        self.max_tokens = settings.max_tokens or 0
        self.json_output = settings.json_output
        self.codes = settings.provider.codes
        self.stream = settings.stream
        n = self.body_params.get("n")
        self.choices = n if type(n) is int and n > 0 else 1  # a stream is whole with this many (the request's n)
        limits = settings.limits
        self.requests = request_limiter(limits.requests_per_minute)
        self.tokens = token_limiter(limits.tokens_per_minute)
        # limits.shared: the account's rates too, asked after this process's own pacing (batch/shared/rates.py).
        self.shared_requests = self.shared_tokens = None
        if shared is not None and limits.requests_per_minute is not None:
            rpm = limits.requests_per_minute
            self.shared_requests = shared.rate("requests", rpm, lambda processes: request_limiter(rpm / processes))
        if shared is not None and limits.tokens_per_minute is not None:
            tpm = limits.tokens_per_minute
            self.shared_tokens = shared.rate("tokens", tpm, lambda processes: token_limiter(tpm / processes))
        self.stopping = stopping
        self.slots = Slots(limits.concurrency, shared=shared.leases if shared is not None else None)
        self.requests_sent = 0  # counted as each is sent: a row stopped by a job-fatal answer has no record
        retry = settings.retry
        self.breaker = Breaker(time.monotonic, retry.max_outage_s, retry.initial_backoff_s or 1.0, retry.max_backoff_s)
        self._breaker_moved = asyncio.Event()
        self.retries = Retries(retry.max_attempts, retry.initial_backoff_s, retry.max_backoff_s, stopping)

    def request_body(self, messages: list[dict[str, Any]]) -> bytes:
        """The request as sent, serialized once: the answer cache keys on these same bytes.

        Sorted keys, so the same request written with its params in another order is the same key.
        """
        body = {"model": self.model, "messages": messages, **self.body_params}
        return json.dumps(body, ensure_ascii=False, sort_keys=True, default=str).encode()

    async def answer(self, row: Row, body: bytes, estimated_tokens: int,
                     on_paid: Callable[[dict[str, Any]], bool] | None = None, asked: Asked | None = None) -> Record:
        """The result record for a row; raises JobFatal when the job must stop, Unreachable when the API stays down.

        An answer that came but was judged a failure (cut short, an odd field) was paid for: its usage is added to
        the row's record, ok or failed, as the usage of every answer to the row is, and given to `on_paid` (the
        budget counts it at once), which says whether the row may still be asked again. `asked`: the caller's count
        of this ask, which holds the record of what was paid when a cancel cuts it off."""
        asked = asked if asked is not None else Asked()
        try:
            try:
                # Most rows succeed at once: tenacity's per-call state (~30 us, about 4% of a request's
                # client CPU) is built only for a row whose first attempt failed.
                return await self._attempt(row, body, estimated_tokens, 1, asked, on_paid)
            except Failure as failure:
                first: Failure | None = failure
            except Parked:
                first = None
            record = await self._retry(row, body, estimated_tokens, first, asked, on_paid)
        except asyncio.CancelledError:  # stopped at once: the request in flight is dropped, what came before was paid
            asked.cut = self._interrupted(row, asked)
            if asked.cut is not None:
                add_paid_before(asked.cut, asked.spent)
            raise
        add_paid_before(record, asked.spent)
        return record

    async def _retry(self, row: Row, body: bytes, estimated_tokens: int, first: Failure | None,
                     asked: Asked, on_paid: Callable[[dict[str, Any]], bool] | None) -> Record:
        attempts = 1
        while True:
            # One AsyncRetrying per row: it keeps per-call state, so it is not shared between tasks.
            # A row parked by an outage starts its retries afresh once the endpoint answers again.
            retrying = self.retries.retrying(before_sleep=lambda state: log_retry(row, state))
            try:
                async for attempt in retrying:
                    with attempt:
                        if first is not None:  # attempt 1, made above: tenacity judges its failure and waits
                            made, first = first, None
                            raise made
                        attempts += 1
                        return await self._attempt(row, body, estimated_tokens, attempts, asked, on_paid)
            except Parked:
                continue
            except Stopped:  # raised before its request was sent
                return self._cut_short(row, asked)
            except Failure as failure:
                if failure.scope == "job":
                    raise JobFatal(failure) from None
                if failure.scope == "retry" and self.stopping.is_set():
                    return self._cut_short(row, asked)
                if failure.error_class in OUTAGE_CLASSES and self.breaker.gave_up():
                    self._outage_began()
                    continue  # its retries ran out because the endpoint is down, not because of the row
                return failed_record(row, failure.error_class, failure.message, attempts, self.model)

    def _cut_short(self, row: Row, asked: Asked) -> Record:
        """A row whose retries the run's stop cut short: not failed, its retries not used up (Stopped: pending),
        unless answers were paid for (_interrupted)."""
        record = self._interrupted(row, asked)
        if record is None:
            raise Stopped()
        return record

    def _interrupted(self, row: Row, asked: Asked) -> Record | None:
        """The record of a row whose ask the run's stop cut short (its retries, or, at once, its request in flight),
        when answers came and were judged failures: they were paid for, so it keeps the requests sent and leaves the
        row pending (INTERRUPTED), and the next run's record carries them. None when nothing was paid."""
        if all(asked.spent[name] is None for name in PAID_FIELDS):
            return None
        return failed_record(row, INTERRUPTED, "the run stopped before this row was answered (its answers so far "
                             "were paid for and judged failures)", asked.sent, self.model)

    async def _attempt(self, row: Row, body: bytes, estimated_tokens: int, attempts: int,
                       asked: Asked, on_paid: Callable[[dict[str, Any]], bool] | None) -> Record:
        """One request; its record, or the Failure it is (the usage of an answer that came with it added to
        `asked.spent` and given to `on_paid`: a retry it has no room for makes the failure the row's)."""
        if self.tokens is not None:
            tokens = min(estimated_tokens + self.max_tokens, self.tokens.max_rate)
            await self.tokens.acquire(tokens)
            if self.shared_tokens is not None:
                await self.shared_tokens.acquire(round(tokens))
        if self.requests is not None:
            await self.requests.acquire()
            if self.shared_requests is not None:
                await self.shared_requests.acquire()
        if self.stopping.is_set():
            raise Stopped()  # woke from a backoff after the run began to stop: send nothing more
        probe = self.breaker.open and await self._wait_for_probe_turn(row)
        sent_with = await self.slots.acquire()
        while self.breaker.open and not probe:  # it opened while this row waited for its slot: send nothing yet
            self.slots.release()
            probe = await self._wait_for_probe_turn(row)
            sent_with = await self.slots.acquire()
        if self.stopping.is_set():  # the run began to stop while this row waited for its slot
            self.slots.release()
            raise Stopped()
        started = time.perf_counter()
        self.requests_sent += 1
        asked.sent += 1
        first_token_at = None
        try:
            if self.stream:
                data, first_token_at = await self.client.stream(body, self.choices)
            else:
                data = await self.client.complete(body)
        except asyncio.CancelledError:
            self.slots.release()
            if probe:  # cut off (a second Ctrl-C) without a verdict: the next waiter probes
                self.breaker.probe_abandoned()
                self._breaker_changed()
            raise
        except Exception as exc:  # the client raises Failures; anything else is classified too, none escapes raw
            failure = classify(exc)
            if failure.error_class == "rate_limited":
                self.slots.throttled(sent_with, pool_pause(failure, self.codes))
            else:
                self.slots.release()
            if failure.usage is not None:  # an answer came, whatever its verdict: paid for, and the endpoint is up
                paid = paid_for(failure.usage, self.pricer)
                add_paid_before(asked.spent, paid)  # type: ignore[arg-type]
                self._answered()
                if on_paid is not None and not on_paid(paid) and failure.scope == "retry":
                    failure = dataclasses.replace(failure, scope="row", message=f"{failure.message} (not sent "
                                                  "again: budget has no room for another answer)")
            elif failure.error_class in OUTAGE_CLASSES:
                self._failed_at_endpoint(row, failure, probe)
            else:
                self._answered()
            raise failure from None
        self.slots.succeeded(sent_with)
        self._answered()
        ttft = None if first_token_at is None else first_token_at - started
        record = answer_record(row, data, time.perf_counter() - started, attempts, self.pricer, self.model, ttft)
        if self.json_output is not None:
            self.json_output.judge(record, self.max_tokens)
        return record

    # -- outages: see batch/online/breaker.py --------------------------------------------------------
    def _answered(self) -> None:
        outage_s = self.breaker.answered()
        if outage_s is not None:
            log.warning("the endpoint answers again after %.1f s without an answer: carrying on", outage_s)
            self._breaker_changed()

    def _failed_at_endpoint(self, row: Row, failure: Failure, probe: bool) -> None:
        """An attempt failed at the connection or server level; raises Parked when that is an outage, not the row."""
        was_open = self.breaker.open
        if not self.breaker.failed(row.seq, str(failure), probe):
            return
        if not was_open:
            self._outage_began()
        elif probe:
            log.info("probe failed (%s); the next one in %.2f s", failure, self.breaker.next_probe_in)
            self._breaker_changed()
        raise Parked()

    def _outage_began(self) -> None:
        b = self.breaker
        log.warning("the endpoint is not answering (%s failed, nothing answered for %.1f s; last: %s): "
                    "no row is sent or retried; probing with one request at a time for up to %g s",
                    counted(b.failures, "attempt"), b.quiet_s, b.last_error, b.max_outage_s)
        self._breaker_changed()

    def _breaker_changed(self) -> None:
        """Wake every row waiting in an outage: the probe's verdict is in, or the outage is over."""
        self._breaker_moved.set()
        self._breaker_moved = asyncio.Event()

    async def _wait_for_probe_turn(self, row: Row) -> bool:
        """While the breaker is open: wait; True when this attempt is the probe, False when the outage is over."""
        while self.breaker.open:
            if self.stopping.is_set():
                raise Stopped()
            wait_s = self.breaker.admit()  # raises Unreachable when the outage outlasts max_outage_s
            if wait_s is None:
                log.debug("probing the endpoint with row %s", row.id)
                return True
            moved, stopping = (asyncio.ensure_future(event.wait()) for event in (self._breaker_moved, self.stopping))
            try:
                await asyncio.wait((moved, stopping), timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                moved.cancel()
                stopping.cancel()
        return False


def log_retry(row: Row, state: RetryCallState) -> None:
    failure = state.outcome.exception() if state.outcome else None
    wait_s = state.next_action.sleep if state.next_action else 0.0
    log.debug("row %s: attempt %d failed (%s); retrying in %.2f s", row.id, state.attempt_number, failure, wait_s)
