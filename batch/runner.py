"""A whole run: rows from the reader, through the pool, into the checkpoint, then the final output."""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch.answered import RowStates
from batch.breaker import Unreachable
from batch.budget import Budget
from batch.cache import AnswerCache, request_key, reused
from batch.errors import (
    EXIT_BUDGET,
    EXIT_INTERRUPTED,
    EXIT_JOB_FATAL,
    EXIT_OK,
    EXIT_ROWS_FAILED,
    BatchError,
    CheckpointWriteError,
    ConfigError,
)
from batch.final import Records, write_final
from batch.guard import RunLock, check_fingerprint, end_run, mark_running
from batch.pool import PAID_FIELDS, JobFatal, Pool, Stopped, add_paid_before, failed_record, make_client
from batch.preflight import Plan
from batch.process import give_back_freed_memory, let_pandas_in
from batch.prompts import RowPromptError, estimate_tokens, prompt_token_bound
from batch.reader import Row, Skipped
from batch.replies import parse_reply, reply_columns
from batch.summary import Progress, RunStats, build_summary, save_summary
from batch.writer import RESULT_FIELDS, Checkpoint

log = logging.getLogger("batch")

TICK_S = 0.25
GRACE_S = 10.0  # how long in-flight requests may finish after Ctrl-C / SIGTERM


@dataclass
class RunOptions:
    retry_failed: bool = False
    force: bool = False  # resume even though the fingerprint changed
    limit: int | None = None  # send at most this many pending rows (try a job cheaply)
    progress_interval_s: float = 5.0
    tty: bool | None = None


class Run:
    """One run of a job that passed its preflight (batch/preflight.py), which made every check that needs no lock."""

    def __init__(self, plan: Plan, options: RunOptions) -> None:
        self.plan = plan
        self.spec = spec = plan.spec
        self.options = options
        self.builder = plan.builder
        self.table = plan.table
        self.checkpoint = Checkpoint(spec.checkpoint_dir, spec.output.checkpoint_rows, spec.output.checkpoint_seconds)
        self.stopping = asyncio.Event()
        self.stopped: str | None = None
        self.exit_code: int | None = None
        self.write_error: CheckpointWriteError | None = None  # a checkpoint write failed: the run stops at once
        self._workers: list[asyncio.Task[None]] = []

    async def execute(self) -> dict[str, Any]:
        total = self.plan.rows
        lock = RunLock(self.spec.checkpoint_dir)
        try:
            lock.acquire()
        except OSError as exc:
            raise ConfigError(
                f"{self.spec.checkpoint_dir}: cannot write the checkpoint folder: {exc.strerror}") from None
        try:
            check_fingerprint(self.spec, self.options.force)
            return await self._execute(total)
        finally:
            lock.release()

    async def _execute(self, total: int) -> dict[str, Any]:
        try:
            self.checkpoint.open()
            mark_running(self.spec.checkpoint_dir)
        except OSError as exc:
            raise ConfigError(
                f"{self.spec.checkpoint_dir}: cannot write the checkpoint: {exc.strerror or exc}") from None
        try:
            summary = await self._execute_marked(total)
        except BatchError as exc:
            end_run(self.spec.checkpoint_dir, str(exc), exc.exit_code)
            raise
        end_run(self.spec.checkpoint_dir)
        return summary

    async def _execute_marked(self, total: int) -> dict[str, Any]:
        if self.table.row_hashes is None and self.checkpoint.has_records():
            self.table.scan(keep_hashes=True)  # another run wrote records between our scan and our lock
        done = self.checkpoint.row_states(total, self.table.row_hashes, self.table.row_prompts)
        self.table.row_hashes = self.table.row_prompts = None
        stats = RunStats(total)
        progress = Progress(stats, self.options.progress_interval_s, self.options.tty)
        self._install_signal_handlers()
        try:
            async with make_client(self.plan) as client:
                pool = Pool(client, self.plan, self.stopping)
                budget = self._budget(done) if self.spec.budget else None
                cache_path = self.spec.cache.path if self.spec.cache else self.spec.checkpoint_dir / "answers.sqlite"
                try:
                    # The checkpoint's own cache is this run's alone: locked for it, with no shared-memory
                    # file, whose mmap kills the process (SIGBUS) once the folder cannot be written.
                    cache = AnswerCache(cache_path, exclusive=self.spec.cache is None)
                except (sqlite3.Error, OSError) as exc:
                    raise ConfigError(f"{cache_path}: cannot open the answer cache: {exc} (if it is damaged, "
                                      "delete it: it only keeps identical requests from being paid twice)") from None
                try:
                    await self._process(pool, budget, cache, cache_path, done, stats, progress)
                finally:
                    try:
                        cache.close()
                    except sqlite3.Error as exc:
                        if self.write_error is None:
                            raise _cache_write_error(cache_path, exc) from None
                    stats.throttled, stats.concurrency_limit = pool.slots.throttles, pool.slots.limit
                    stats.attempts = pool.requests_sent
        finally:
            self._remove_signal_handlers()
            progress.close()
            self.checkpoint.close(merge=False)
        summary = self._finish(stats, done)
        # After the final file, not before: the merge's buffers would otherwise sit under the final file's.
        give_back_freed_memory()
        try:
            self.checkpoint.merge()
        except (OSError, BatchError) as exc:  # every record read is in the output; the next run merges them
            log.warning("could not merge the checkpoint's parts in %s: %s", self.spec.checkpoint_dir,
                        getattr(exc, "strerror", None) or exc)
        return summary

    def _budget(self, done: RowStates) -> Budget:
        cost, tokens = self.checkpoint.spent(done)
        assert self.spec.budget is not None and self.plan.max_tokens is not None  # the preflight's checks
        return Budget(self.spec.budget, self.plan.max_tokens, self.plan.pricer, cost, tokens)

    async def _process(self, pool: Pool, budget: Budget | None, cache: AnswerCache, cache_path: Path,
                       done: RowStates, stats: RunStats, progress: Progress) -> None:
        concurrency = self.spec.limits.concurrency
        queue: asyncio.Queue[tuple[Row, list[dict[str, Any]]] | None] = asyncio.Queue(maxsize=2 * concurrency)
        paid_before = self._paid_before(done)

        def record(result: dict[str, Any]) -> None:
            if result["status"] != "ok":
                log.debug("row %s failed after %d attempts: %s: %s", result["id"], result["attempts"],
                          result["error_class"], result["error"])
            stats.add(result)  # this run's spending, before what earlier runs paid for the row is added
            add_paid_before(result, paid_before.pop(result["seq"], None))
            try:
                self.checkpoint.append(result)
            except CheckpointWriteError as exc:
                self._halt(exc)
                raise
            done.add_one(result["seq"], "ok" if result["status"] == "ok" else result["error_class"])

        feed_errors: list[Exception] = []

        async def feed() -> None:
            try:
                await feed_rows()
            except Exception as exc:  # a read error mid-file: stop, and let the workers see the end
                feed_errors.append(exc)
                self.stopping.set()
            for _ in range(concurrency):
                await queue.put(None)

        async def feed_rows() -> None:
            rows_left = self.options.limit
            retry_failed = self.options.retry_failed
            start = done.first_to_send(retry_failed)
            for row in self.table.rows(lambda seq, ids: done.to_send(seq, ids, retry_failed), start):
                if self.stopping.is_set() or rows_left == 0:
                    break
                if isinstance(row, Skipped):
                    stats.skipped += row.count
                    continue
                if rows_left is not None:
                    rows_left -= 1
                try:
                    messages = self.builder.messages(row.values)
                except RowPromptError as exc:
                    record(failed_record(row, "bad_prompt", str(exc), 0, self.spec.model.name))
                    continue
                await queue.put((row, messages))

        async def work() -> None:
            while not self.stopping.is_set() and (item := await queue.get()) is not None:
                row, messages = item
                body = pool.request_body(messages)
                key = request_key(pool.client.url, body)
                kept = self._usable(await cache.answer_of(key))
                if kept is not None:
                    record(reused(kept, row.id, row.seq, row.prompt_hash))
                    continue
                hold = None
                if budget is not None:
                    # Once reached, rows the cache can answer (above, free) still are; the others stay pending.
                    hold = None if budget.reached else await budget.reserve(prompt_token_bound(messages))
                    if hold is None:
                        self._budget_reached(budget.describe())
                        continue
                result = None
                sending = cache.sending(key)
                try:
                    result = await pool.answer(row, body, estimate_tokens(messages))
                    if hold is not None:
                        budget.settle(hold, result)  # type: ignore[union-attr]
                        hold = None
                    record(result)
                except Stopped:
                    break
                except JobFatal as fatal:
                    self._stop(f"the API refused the job: {fatal.failure}", EXIT_JOB_FATAL)
                except Unreachable as outage:  # every row not answered stays pending, none is failed
                    self._stop(str(outage), EXIT_JOB_FATAL)
                finally:
                    try:
                        cache.sent(key, sending, result)
                    except sqlite3.Error as exc:
                        self._halt(_cache_write_error(cache_path, exc))
                        raise self.write_error from None  # type: ignore[misc]
                    if hold is not None:
                        budget.settle(hold, None)  # type: ignore[union-attr]

        async def tick() -> None:
            while True:
                await asyncio.sleep(TICK_S)
                try:
                    self.checkpoint.tick()
                except CheckpointWriteError as exc:
                    self._halt(exc)
                    return
                progress.refresh()

        feeder = asyncio.create_task(feed())
        ticker = asyncio.create_task(tick())
        self._workers = [asyncio.create_task(work()) for _ in range(concurrency)]
        try:
            outcomes = await asyncio.gather(*self._workers, return_exceptions=True)
            if self.write_error is not None:
                raise self.write_error
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    raise outcome
            if feed_errors:
                raise feed_errors[0]
        finally:  # the feeder may be blocked on a full queue that no worker will drain
            feeder.cancel()
            ticker.cancel()
            await asyncio.gather(feeder, ticker, return_exceptions=True)

    def _usable(self, kept: dict[str, Any] | None) -> dict[str, Any] | None:
        """A cached answer, if it passes the checks a fresh one would: a parse_json job sends again for prose."""
        if kept is not None and self.spec.output.parse_json:
            try:
                parse_reply(kept["response"])
            except ValueError:
                return None
        return kept

    def _paid_before(self, done: RowStates) -> dict[int, dict[str, Any]]:
        """What earlier runs paid for each row this run sends again (a retried failure, an edited prompt), by row:
        a row's cost and tokens are the sum over all its answers, and the job's spending the sum over its rows."""
        positions = done.resent_records(self.options.retry_failed)
        if not len(positions):
            return {}
        paid = self.checkpoint.row_groups().take(positions[:, 1], list(PAID_FIELDS))
        return {int(seq): spent for seq, spent in zip(positions[:, 0], paid.to_pylist())
                if any(spent.values())}

    def _budget_reached(self, reason: str) -> None:
        """Send nothing more; rows the cache answers are still answered, and the run ends with exit 5."""
        if self.stopped is None:
            self.stopped, self.exit_code = reason, EXIT_BUDGET
            log.error("stopping: %s", reason)

    def _stop(self, reason: str, exit_code: int) -> None:
        """Take no more rows; the first reason given is the one reported."""
        if self.stopped is None:
            self.stopped = reason
            self.exit_code = exit_code
            log.error("stopping: %s", reason)
        self.stopping.set()

    def _halt(self, error: CheckpointWriteError) -> None:
        """A checkpoint write failed: stop at once. Requests in flight are dropped (their rows stay
        pending) rather than paid for with nowhere to keep the answer; no new one is sent."""
        if self.write_error is None:
            self.write_error = error
        self.stopping.set()
        self._cancel_workers()

    def _finish(self, stats: RunStats, done: RowStates) -> dict[str, Any]:
        counts = done.counts(lambda: (ids for _, ids in self.table.id_batches([])))
        totals = {"ok": counts.ok, "failed": counts.failed, "pending": stats.rows_total - counts.ok - counts.failed,
                  "not_in_input": counts.not_in_input}
        output = None
        if totals["pending"] == 0:
            output = self.spec.output.path
            # The input too: rows deleted from it leave the answers as they were, and the output must lose them.
            if self.checkpoint.newer_than(output, self.spec.input.path):
                groups = self.checkpoint.row_groups() if done.records else None
                self._write_output(output, Records(groups, done))
        if self.exit_code is None:
            if self.stopped is not None:
                self.exit_code = EXIT_INTERRUPTED
            else:  # 1 says "complete, some rows failed": a job with rows left (--limit) is not complete
                self.exit_code = EXIT_ROWS_FAILED if totals["failed"] and not totals["pending"] else EXIT_OK
        summary = build_summary(self.spec.name, self.spec.model.name, stats, totals, self.stopped, output,
                                self.exit_code)
        try:
            save_summary(summary, self.spec.checkpoint_dir / "summary.json")
        except OSError as exc:  # the run is over and every answer is kept: only this copy of the summary is lost
            log.warning("could not save the summary in %s: %s", self.spec.checkpoint_dir, exc.strerror or exc)
        return summary

    def _write_output(self, output: Path, records: Records) -> None:
        out = self.spec.output
        extra = None
        if out.parse_json:
            let_pandas_in()  # the replies' columns are built with pandas
            taken = {self.spec.id_column_out, *out.keep_columns, *RESULT_FIELDS}
            extra = reply_columns(self.checkpoint.results(["id", "status", "response"]), out.json_columns, taken)
        try:
            write_final(output, self.table.id_batches(out.keep_columns), self.spec.id_column_out,
                        out.keep_columns, records, extra)
        except OSError as exc:
            raise ConfigError(f"{output}: cannot write the output: {exc.strerror or exc} "
                              f"(every answer is safe in {self.spec.checkpoint_dir}; rerun to retry)") from None

    # -- signals: the first asks for a graceful stop, a second one stops at once -----------------
    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        self._signals: list[int] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                self._signals.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests run jobs in threads): no handlers

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.stopping.is_set():
            log.warning("%s again: stopping now; in-flight requests will be sent again on resume", name)
            self._cancel_workers()
            return
        self.stopped = f"interrupted by {name}"
        self.exit_code = self.exit_code or EXIT_INTERRUPTED
        log.warning("%s: taking no more rows; waiting up to %.0f s for requests in flight", name, GRACE_S)
        self.stopping.set()
        asyncio.get_running_loop().call_later(GRACE_S, self._cancel_workers)

    def _cancel_workers(self) -> None:
        for task in self._workers:
            if task is not asyncio.current_task():
                task.cancel()


def _cache_write_error(path: Path, exc: sqlite3.Error) -> CheckpointWriteError:
    return CheckpointWriteError(f"{path}: cannot save to the answer cache: {exc}; the run stopped and sends no "
                                "more requests (answers written before are kept: run the job again once it can be "
                                "written)")


async def run_job(plan: Plan, options: RunOptions | None = None) -> dict[str, Any]:
    """Run a job: `plan` is `batch.preflight.preflight(job_path)` (with force=options.force)."""
    return await Run(plan, options or RunOptions()).execute()
