"""The online answerer: one request per row to the chat completions API, as fast as the limits allow.

Rows come from the run (batch/executor.py). Each is looked up in the answer cache first (free), then
reserved against the budget, then sent through the pool (limits, retries, the outage breaker). A
bounded queue between the rows and the row tasks keeps memory flat whatever the input's length.

There are ROWS_PER_SLOT row tasks per slot of limits.concurrency: the slots (batch/online/limits.py) alone
bound the requests in flight, and a row waiting out its retry's backoff holds a task but no slot, so
up to three slots' worth of rows can wait while the slots stay busy.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from batch.errors import EXIT_BATCHES_LIVE, EXIT_BUDGET, EXIT_JOB_FATAL, CheckpointWriteError
from batch.executor import Pending, Stop
from batch.input.prompts import estimate_tokens, prompt_token_bound
from batch.input.reader import Row
from batch.money.budget import Budget
from batch.money.cache import AnswerCache, request_key
from batch.online.breaker import Unreachable
from batch.online.pool import Asked, JobFatal, Pool, Stopped
from batch.records import Record, asked_again, cached_record

ROWS_PER_SLOT = 4


class OnlineAnswerer:
    def __init__(self, pool: Pool, cache: AnswerCache, cache_path: Path, budget: Budget | None, stop: Stop,
                 concurrency: int) -> None:
        self.pool = pool
        self.cache = cache
        self.cache_path = cache_path
        self.budget = budget
        self.stop = stop
        self.json_output = pool.json_output
        # A reply that is not the JSON asked for is asked again at once, up to json_attempts requests in all.
        self.asks = pool.json_output.attempts if pool.json_output is not None else 1
        # What the schema costs beside the messages (sent as response_format): counted like the prompt.
        self.unsent_tokens, self.unsent_bound = pool.json_output.unsent_tokens() if pool.json_output else (0, 0)
        self._task_count = ROWS_PER_SLOT * concurrency
        self._tasks: list[asyncio.Task[None]] = []

    async def answer(self, rows: AsyncIterator[Pending], record: Callable[[Record], None]) -> None:
        queue: asyncio.Queue[Pending | None] = asyncio.Queue(maxsize=2 * self._task_count)
        feed_errors: list[Exception] = []
        feeder = asyncio.create_task(self._feed(rows, queue, feed_errors))
        self._tasks = [asyncio.create_task(self._work(queue, record)) for _ in range(self._task_count)]
        try:
            outcomes = await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.stop.write_error is not None:
                raise self.stop.write_error
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    raise outcome
            if feed_errors:
                raise feed_errors[0]
        finally:  # the feeder may be blocked on a full queue that no task will drain
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    def cancel(self) -> None:
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def _feed(self, rows: AsyncIterator[Pending], queue: asyncio.Queue[Pending | None],
                    errors: list[Exception]) -> None:
        try:
            async for pending in rows:
                await queue.put(pending)
        except Exception as exc:  # a read error mid-file: stop, and let the tasks see the end
            errors.append(exc)
            self.stop.event.set()
        for _ in range(self._task_count):
            await queue.put(None)

    async def _work(self, queue: asyncio.Queue[Pending | None], record: Callable[[Record], None]) -> None:
        while not self.stop.asked and (pending := await queue.get()) is not None:
            if not await self._answer_one(pending, record):
                break

    async def _answer_one(self, pending: Pending, record: Callable[[Record], None]) -> bool:
        """Answer one row; False when this task should take no more rows."""
        row, messages = pending.row, pending.messages
        body = self.pool.request_body(messages)
        key = request_key(self.pool.client.url, body)
        kept = self._usable(await self.cache.answer_of(key))
        if kept is not None:
            self._keep(record, cached_record(kept, row))
            return True
        # Only the tokens-per-minute limiter reads the estimate: a job without one skips counting its characters.
        estimated = estimate_tokens(messages) + self.unsent_tokens if self.pool.tokens is not None else 0
        bound = prompt_token_bound(messages) + self.unsent_bound if self.budget is not None else 0
        answer = None  # the last answer, with its own cost (the cache keeps it)
        result = None  # the row's record: the last answer, with the cost of every answer before it
        sending = self.cache.sending(key)
        asked = Asked()  # the ask under way (a new one each time round): what it paid outlives a cancel
        try:
            for _ in range(self.asks):
                asked = Asked()
                answer = await self._ask(row, body, estimated, bound, asked)
                if answer is None:  # the budget is reached: a bad reply paid for before is kept as it is
                    break
                result = answer if result is None else asked_again(answer, result)
                if answer["error_class"] != "bad_json":
                    break
        except Stopped:
            if result is not None:  # a bad reply, paid for: kept, with its cost, rather than asked again
                self._keep(record, result)
            return False
        except asyncio.CancelledError:  # stopped at once: the request in flight is dropped; the answers before it were
            if asked.cut is not None:  # paid for (a bad reply, a billed failure of this ask) and are kept
                result = asked.cut if result is None else asked_again(asked.cut, result)
            if result is not None and self.stop.write_error is None:
                self._keep(record, result)
            raise
        except JobFatal as fatal:
            self.stop.now(f"the API refused the job: {fatal.failure}", EXIT_JOB_FATAL)
        except Unreachable as outage:  # every row not answered stays pending, none is failed
            self.stop.now(str(outage), EXIT_JOB_FATAL)
        finally:
            try:
                self.cache.sent(key, sending, answer)
            except sqlite3.Error as exc:
                self._halt(cache_write_error(self.cache_path, exc))
        if result is not None:
            self._keep(record, result)
        return True

    async def _ask(self, row: Row, body: bytes, estimated: int, bound: int, asked: Asked) -> Record | None:
        """One request for the row (and its retries), its worst case (`bound`: prompt tokens at most) held against
        the budget; None when the budget is reached. `asked`: its count (Pool.answer), which a cancel leaves the
        record of what was paid in."""
        budget, hold = self.budget, None
        if budget is not None:
            # Once reached, rows the cache can answer (above, free) still are; the others stay pending.
            hold = None if budget.reached else await budget.reserve(bound)
            if hold is None:
                self.stop.note(budget.describe(), EXIT_BATCHES_LIVE if budget.holds_live() else EXIT_BUDGET)
                return None
        answer = None
        counted = [0.0, 0]  # what budget.spend counted of answers judged failures, which the record then sums

        def on_paid(paid: dict[str, Any]) -> bool:
            """An answer judged a failure: spent now; True when the row's hold still fits, to ask again under it."""
            cost, tokens = budget.spend(hold, paid)  # type: ignore[union-attr, arg-type]
            counted[0] += cost
            counted[1] += tokens
            return budget.still_fits()  # type: ignore[union-attr]

        try:
            answer = await self.pool.answer(row, body, estimated, on_paid if hold is not None else None, asked)
        finally:
            if hold is not None:  # cut off by a cancel: what was paid (asked.cut) is counted as the record holds it
                budget.settle(hold, answer if answer is not None else asked.cut,  # type: ignore[union-attr]
                              (counted[0], counted[1]))
        return answer

    def _keep(self, record: Callable[[Record], None], result: Record) -> None:
        try:
            record(result)
        except CheckpointWriteError as exc:
            self._halt(exc)

    def _halt(self, error: CheckpointWriteError) -> None:
        """Stop at once: requests in flight are dropped (their rows stay pending) rather than paid for with
        nowhere to keep the answer; no new one is sent."""
        self.stop.halt(error)
        self.cancel()
        raise error

    def _usable(self, kept: dict[str, Any] | None) -> dict[str, Any] | None:
        """A cached answer, if it passes the checks a fresh one would: a parse_json job sends again for prose,
        a json_schema job for a reply that does not match."""
        if kept is not None and self.json_output is not None and self.json_output.problem(kept["response"]):
            return None
        return kept


def cache_write_error(path: Path, exc: sqlite3.Error) -> CheckpointWriteError:
    return CheckpointWriteError(f"{path}: cannot save to the answer cache: {exc}; the run stopped and sends no "
                                "more requests (answers written before are kept: run the job again once it can be "
                                "written)")
