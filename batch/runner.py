"""A whole run: rows from the reader, answered (batch/online/answerer.py, or batch/batch_api/answerer.py), into
the checkpoint, then the final output."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch.batch_api.ledger import describe, ledger_at
from batch.checkpoint.answered import RowStates, with_paid_in_all
from batch.checkpoint.final import (
    LastRecords,
    is_current,
    made_from,
    output_footer,
    output_settings,
    reply_columns,
    write_final,
)
from batch.checkpoint.finished import mark_finished, read_finished
from batch.checkpoint.guard import RunLock, check_fingerprint, end_run, mark_running
from batch.checkpoint.layout import LayoutTaken, claim_layout, layout_of_run, other_layout_refused
from batch.checkpoint.writer import checkpoint_at
from batch.errors import (
    EXIT_BAD_INPUT,
    EXIT_BATCHES_LIVE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_ROWS_FAILED,
    BatchError,
    CheckpointWriteError,
    ConfigError,
    InputChangedError,
    LockedError,
    OutputWriteError,
    os_reason,
)
from batch.executor import Answerer, Pending, Stop
from batch.input.prompts import RowPromptError
from batch.input.reader import Skipped
from batch.interrupts import taken_early
from batch.money.budget import Budget, Hold
from batch.money.cache import AnswerCache, open_error
from batch.online.answerer import OnlineAnswerer, cache_write_error
from batch.online.pool import Pool, make_client
from batch.plan import Plan
from batch.pricing import Pricer, batch_pricer
from batch.process import give_back_freed_memory
from batch.records import CARRIED_FIELDS, Record, carry, failed_record
from batch.shard import Shard
from batch.shared.account import SharedLimits, shared_limits
from batch.storage.lease import Lease, LeaseHeld, LeaseLost, holder_prefix
from batch.storage.locations import is_url
from batch.summary import Progress, RunStats, build_summary, save_summary
from batch.wording import counted

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("batch")

TICK_S = 0.25
GRACE_S = 10.0  # how long in-flight requests may finish after Ctrl-C / SIGTERM


@dataclass
class RunOptions:
    retry_failed: bool = False
    force: bool = False  # resume even though the fingerprint changed
    limit: int | None = None  # send at most this many pending rows (try a job cheaply)
    progress_interval_s: float = 5.0
    tty: bool | None = None  # a progress bar (True), log lines (False), or a bar where watched (None: summary.watched)
    progress: bool = True  # False: neither bar nor progress lines
    signals: bool = True  # SIGINT and SIGTERM stop the run gracefully (the command line); the Python API asks
    mode: str | None = None  # online or batch_api; None: the job file's
    wait: bool = False  # batch_api: poll until no batch is left at the provider


@dataclass(frozen=True)
class TakenSignal:
    """A signal a run takes, and what handled it before: given back as it was when the run ends."""

    sig: int
    handler: Any  # signal.getsignal's: the program's function, SIG_DFL, SIG_IGN, or None (set outside Python)
    loop_handle: asyncio.Handle | None  # the running loop's own handler (loop.add_signal_handler), if it had one


def _renewed(lease: Lease) -> LeaseLost | None:
    """One renewal of the lease: None when it is still ours (or the store failed it: said, and the lease stays ours
    until its ttl runs out, the next renewal trying again), the LeaseLost when another holds it now."""
    try:
        lease.renew()
    except LeaseLost as exc:
        return exc
    except OSError as exc:
        log.warning("could not renew the checkpoint's lease (tried again in %.0f s): %s", lease.renew_every, exc)
    return None


def _loop_signal_handlers(loop: asyncio.AbstractEventLoop) -> dict[int, asyncio.Handle]:
    """The loop's signal handlers by signal. asyncio offers no way to read them but this attribute of its Unix
    loops; a loop without it (another implementation) is taken as having none."""
    handlers = getattr(loop, "_signal_handlers", None)
    return handlers if isinstance(handlers, dict) else {}


class Run:
    """One run of a job that passed its preflight (batch/preflight.py), which made every check that needs no lock.

    The run owns the lifecycle (lock, checkpoint, resume state, signals, final file, summary); the answers
    come from an Answerer (batch/executor.py), the online pool here.
    """

    def __init__(self, plan: Plan, options: RunOptions, lock: RunLock | None = None) -> None:
        """`lock`: the job's run lock when the caller holds it already; the run takes it otherwise."""
        self.plan = plan
        self.options = options
        self.builder = plan.builder
        self.table = plan.table
        self.folder = plan.locations.checkpoint_dir
        self.checkpoint = checkpoint_at(plan.locations, plan.output.checkpoint_rows, plan.output.checkpoint_seconds)
        self.stop = Stop()
        self.answerer: Answerer | None = None
        self.mode = options.mode or plan.mode
        self.batch_api_used = False
        self.ledger = ledger_at(plan.locations)
        self.lock = lock or RunLock(plan.locations.local_dir)
        self.shared: SharedLimits | None = None  # limits.shared, while the run holds it open
        self.budget: Budget | None = None  # the job's budget, one for the run's every phase (_budget)
        # The checkpoint's lease was taken over by another run (this one is a zombie): it keeps the answers in
        # flight (paid for) in parts of its own epoch, and writes nothing else: no final file, marker, merge or note.
        self.lease_lost = False
        self.lost_because = ""  # the take-over, as LeaseLost says it
        self.lease: Lease | None = None  # a checkpoint on a URL: its lease, while the run holds it
        self._signals: list[TakenSignal] = []  # what each signal the run took had before it

    async def execute(self) -> dict[str, Any]:
        if self.plan.merged_shards is not None:
            return self._merged_already(self.plan.merged_shards)
        total = self.plan.rows
        try:
            self.lock.acquire()
        except OSError as exc:
            raise ConfigError(
                f"{self.plan.locations.local_dir}: cannot write the checkpoint folder: {exc.strerror}") from None
        try:
            lease = self.lease = self._take_lease()
        except BaseException:
            self.lock.release()
            raise
        renewing = asyncio.create_task(self._renew(lease)) if lease is not None else None
        try:
            self._claim_layout()
            check_fingerprint(self.folder, self.plan.fingerprint, self.plan.locations.job_file, self.options.force)
            return await self._execute(total)
        finally:
            if renewing is not None:
                renewing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewing
            if lease is not None:
                with contextlib.suppress(OSError):  # unreleased, it expires within its ttl
                    lease.release()
            self.lock.release()

    def _claim_layout(self) -> None:
        """The job's checkpoint answers its rows in this run's layout from now on (checkpoint/layout.py), or this run
        stops having sent and written nothing: a run of another layout claimed it since the preflight looked."""
        shard = self.plan.shard
        root = self.folder.parent if shard else self.folder  # a shard's folder is shard=K-of-N in the job's
        count = shard.count if shard else None
        try:
            claim_layout(root, count)
        except LayoutTaken as taken:
            raise ConfigError(other_layout_refused(root, [taken.claimed], layout_of_run(shard, count), count)) from None
        except OSError as exc:
            raise CheckpointWriteError(f"{root}: cannot claim the checkpoint's layout: {os_reason(exc)}") from None

    def _merged_already(self, count: int) -> dict[str, Any]:
        """The summary of a run of the whole job that its `count` shards answered, all finished and merged
        (preflight.check_layout): nothing sent, nothing written, the counts their _SUCCESS markers hold."""
        markers = [read_finished(self.folder / Shard(index, count).folder) or {} for index in range(count)]
        totals = {name: sum(int(marker.get(name) or 0) for marker in markers) for name in ("ok", "failed")}
        stats = RunStats(self.plan.rows)
        stats.skipped = totals["ok"] + totals["failed"]
        summary = build_summary(self.plan.name, self.plan.model, stats, {**totals, "pending": 0, "not_in_input": 0},
                                None, self.plan.locations.output, EXIT_ROWS_FAILED if totals["failed"] else EXIT_OK)
        return {**summary, "mode": self.mode, "batches": [], "merged_shards": count}

    def _take_lease(self) -> Lease | None:
        """A checkpoint on a URL has no local lock that other hosts see: its lease (batch/storage/lease.py) makes
        its run the only one, wherever the others run (exit 4 while another holds it)."""
        if not is_url(self.folder):
            return None
        # A holder is named by its host and local folder: one named like this run, whose local lock this run holds
        # now, has ended (killed -9 on this host), so its lease is taken over without waiting out its ttl.
        here = holder_prefix(self.plan.locations.local_dir)
        lease = Lease(self.plan.locations.checkpoint_store(), f"{here}{os.getpid()}:{secrets.token_hex(4)}",
                      self.plan.output.checkpoint_lease_s)
        try:
            lease.acquire(gone=lambda holder: holder.startswith(here), above=self.checkpoint.last_epoch())
        except LeaseHeld as exc:
            raise LockedError(f"{self.folder}: another run of this job holds the checkpoint's lease, {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{self.folder}: cannot take the checkpoint's lease: {exc.strerror or exc}") from None
        log.info("holding the checkpoint's lease %s (epoch %d)", self.folder, lease.epoch)
        self.checkpoint.epoch = lease.epoch  # in its parts' names and its records: a zombie's never meet ours
        return lease

    async def _renew(self, lease: Lease) -> None:
        """Renew the lease every ttl/3; a lease taken over stops the run (another holds the checkpoint now). A
        store that fails a renewal is tried again at the next one: the lease stays ours until its ttl runs out."""
        while True:
            await asyncio.sleep(lease.renew_every)
            lost = await asyncio.to_thread(_renewed, lease)
            if lost is not None:
                self._lost(lost)
                return

    def _lost(self, exc: LeaseLost) -> None:
        self.lease_lost, self.lost_because = True, str(exc)
        self.stop.now(str(exc), EXIT_LOCKED)

    def _still_held(self) -> bool:
        """Before what only the checkpoint's holder may write (the final file, the shard's marker, a merge of its
        parts): the lease renewed once more, so a holder taken over while it could not tell (paused, cut off)
        learns it now. A store that does not answer leaves it as it was: those writes fail the same way."""
        if self.lease is None or self.lease_lost:
            return not self.lease_lost
        try:
            self.lease.renew()
        except LeaseLost as exc:
            self._lost(exc)
        except OSError:
            pass
        return not self.lease_lost

    def _holds_lease_now(self) -> bool:
        """Before a Batch API step that commits or pays (a file claimed, recorded, uploaded, made a batch): the
        lease renewed now, not only once it looks expired (as `_may_send` does for a row), so the step has the
        whole ttl before another run may take the checkpoint over. False once taken over (the run stops with exit
        4), or while a store that does not answer leaves the lease run out."""
        return self._still_held() and (self.lease is None or not self.lease.expired())

    def _may_send(self) -> bool:
        """False once the checkpoint was taken over: a lease that ran out unrenewed (the process paused, or cut off
        from the store) is renewed first, so a holder taken over meanwhile sends nothing more (the new holder
        sends the rest), beyond what it had in flight."""
        return self.lease is None or not self.lease.expired() or self._still_held()

    async def _execute(self, total: int) -> dict[str, Any]:
        try:
            self.checkpoint.open()
            # Read again now that the run holds the checkpoint: another run may have taken steps since __init__.
            self.ledger = ledger_at(self.plan.locations)
            self.ledger.clean_up()
            mark_running(self.folder)
        except OSError as exc:
            raise ConfigError(
                f"{self.folder}: cannot write the checkpoint: {exc.strerror or exc}") from None
        try:
            summary = await self._execute_marked(total)
        except BatchError as exc:
            if not self._still_held():  # taken over (its parts merged away under a final file being written)
                raise LockedError(self.lost_because) from None
            end_run(self.folder, str(exc), exc.exit_code)
            raise
        if not self.lease_lost:  # the note is the new holder's now
            end_run(self.folder)
        return summary

    async def _execute_marked(self, total: int) -> dict[str, Any]:
        live_batches = bool(self.ledger.live())  # their answers, merged by this run, are judged on today's prompts
        if self.table.row_hashes is None and (live_batches or self.checkpoint.has_records()):
            self.table.scan(keep_hashes=True)  # another run wrote records between our scan and our lock
        done = self.checkpoint.row_states(total, self.table.row_hashes, self.table.row_prompts,
                                          keep_prompts=live_batches)
        self.table.row_hashes = self.table.row_prompts = None
        # Rows in a live Batch API batch are not sent again, whatever the mode.
        held = self.ledger.hold(done, self._id_batches)
        self.ledger.count_batch_requests(done)
        if held and self.mode == "online":
            log.info("%s in live Batch API batches: collected from there, not sent online", counted(held, "row"))
        stats = RunStats(total)
        progress = Progress(stats, self.options.progress_interval_s, self.options.tty, self.options.progress)
        self._install_signal_handlers()
        try:
            shards = self.plan.shard.count if self.plan.shard is not None else 1  # an outage's static share: 1/N
            async with make_client(self.plan) as client, shared_limits(
                    self.plan.limits, self.plan.base_url, self.plan.api_key, self.plan.model, shards) as shared:
                self.shared = shared
                pool = Pool(client, self.plan, self.stop.event, shared)
                try:
                    if self.mode == "batch_api" or self.ledger.live():
                        await self._answer_batch_api(done, stats, progress)
                    if self.mode == "online" and not self.stop.asked:
                        await self._answer_online(pool, done, stats, progress)
                finally:
                    stats.throttled, stats.concurrency_limit = pool.slots.throttles, pool.slots.limit
                    stats.attempts += pool.requests_sent
        finally:
            self._remove_signal_handlers()
            progress.close()
            self.checkpoint.close(merge=False)
        with self._lease_renewed_meanwhile():
            # The merge before the final file: the file's footer names the parts it was made from, and a merge
            # after it left it stale at once (export refused it until another run). A merge keeps every record at
            # its place in write order, so the row states read at the start still point at them.
            if not self.lease_lost and self._still_held():  # taken over: the parts are the new holder's to merge
                try:
                    self.checkpoint.merge()
                except (OSError, BatchError) as exc:  # every record is kept as it was; the next run merges them
                    log.warning("could not merge the checkpoint's parts in %s: %s", self.folder,
                                getattr(exc, "strerror", None) or exc)
                give_back_freed_memory()  # the merge's buffers, before the final file's
            summary = self._finish(stats, done)
        give_back_freed_memory()
        return summary

    @contextlib.contextmanager
    def _lease_renewed_meanwhile(self) -> Iterator[None]:
        """The lease renewed on a thread of its own while the run works without its event loop (the merge, the final
        file: minutes on a large job, past the ttl), so that a healthy run keeps it; a take-over found then stops
        the run as one found by the loop's renewals does (exit 4, nothing more written)."""
        lease = self.lease
        if lease is None or self.lease_lost:
            yield
            return
        done, lost = threading.Event(), []

        def renew() -> None:
            while not done.wait(lease.renew_every):
                if (taken := _renewed(lease)) is not None:
                    lost.append(taken)
                    return

        renewing = threading.Thread(target=renew, name="batch-lease", daemon=True)
        renewing.start()
        try:
            yield
        finally:
            done.set()
            renewing.join()
            if lost:
                self._lost(lost[0])

    async def _answer_online(self, pool: Pool, done: RowStates, stats: RunStats, progress: Progress) -> None:
        """The rows to send, answered by the online pool, with the answer cache and the budget."""
        cache_path = self.plan.locations.cache
        try:
            # The checkpoint's own cache is this run's alone: locked for it, with no shared-memory
            # file, whose mmap kills the process (SIGBUS) once the folder cannot be written.
            cache = AnswerCache(cache_path, exclusive=not self.plan.locations.cache_shared)
        except (sqlite3.Error, OSError) as exc:  # the preflight checked it; it may have changed since
            raise open_error(cache_path, exc) from None
        budget = self._budget(done, self.plan.pricer, shared=self.shared) if self.plan.budget else None
        answerer = self.answerer = OnlineAnswerer(pool, cache, cache_path, budget, self.stop,
                                                  self.plan.limits.concurrency)
        try:
            await self._answer(answerer, done, stats, progress)
        finally:
            try:
                cache.close()
            except sqlite3.Error as exc:
                if self.stop.write_error is None:
                    raise cache_write_error(cache_path, exc) from None

    async def _answer_batch_api(self, done: RowStates, stats: RunStats, progress: Progress) -> None:
        """The job's live batches taken on (collected when finished) and, in batch_api mode, the rows to send put
        into new ones (batch/batch_api/answerer.py; imported here: the openai SDK's import is paid only by this
        mode)."""
        from batch.batch_api.answerer import BatchAnswerer

        pricer = batch_pricer(self.plan.pricer)
        budget = self._budget(done, pricer, shared=self.shared) if self.plan.budget else None
        answerer = BatchAnswerer(self.plan, self.ledger, done, pricer, budget, self.stop,
                                 submit=self.mode == "batch_api", wait=self.options.wait,
                                 more_rows=lambda record: self._rows_to_send(done, stats, record),
                                 show_bar=progress.bar is not None, holds_lease=self._holds_lease_now)
        self.answerer = answerer
        self.batch_api_used = True
        try:
            await self._answer(answerer, done, stats, progress)
        finally:
            stats.attempts += answerer.lines_submitted

    async def _answer(self, answerer: Answerer, done: RowStates, stats: RunStats, progress: Progress) -> None:
        """The rows this run sends, through `answerer`, each answer recorded; the checkpoint ticks meanwhile."""
        record = self._recorder(done, stats)
        ticker = asyncio.create_task(self._tick(progress))
        try:
            await answerer.answer(self._rows_to_send(done, stats, record), record)
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)

    async def _rows_to_send(self, done: RowStates, stats: RunStats,
                            record: Callable[[Record], None]) -> AsyncIterator[Pending]:
        """The rows this run sends, in input order, with their messages: the pending ones (and the failed ones
        worth retrying with --retry-failed), at most --limit of them. A row whose prompt cannot be built fails
        here, without a request."""
        rows_left = self.options.limit
        retry_failed = self.options.retry_failed
        start = done.first_to_send(retry_failed)
        try:
            for row in self.table.rows(lambda seq, ids: done.to_send(seq, ids, retry_failed), start):
                if self.stop.asked or rows_left == 0:
                    return
                if not self._may_send():
                    return
                if isinstance(row, Skipped):
                    stats.skipped += row.count
                    continue
                if rows_left is not None:
                    rows_left -= 1
                try:
                    messages = self.builder.messages(row.values)
                except RowPromptError as exc:
                    try:
                        record(failed_record(row, "bad_prompt", str(exc), 0, self.plan.model))
                    except CheckpointWriteError as error:
                        self._halt(error)
                        raise
                    continue
                yield Pending(row, messages)
        except InputChangedError as exc:  # the rows read before the change are sent; the next run reads it anew
            self.stop.now(str(exc), EXIT_BAD_INPUT)

    def _recorder(self, done: RowStates, stats: RunStats) -> Callable[[Record], None]:
        """What keeps a row's record: the run's counts, the checkpoint (raises CheckpointWriteError when it
        cannot be written) and the resume state.

        A row's record holds everything sent and paid for the row, in every run and mode: the answerer's record
        counts its own online requests (none for a Batch API answer or the cache's), to which come here the
        Batch API requests sent for the row since its last record (RowStates.batch_requests) and what that last
        record holds (CARRIED_FIELDS: it sums all before it)."""
        carried = self._carried(done)

        def record(result: Record) -> None:
            stats.add(result)  # this run's spending, before what earlier runs paid for the row is added
            seq = result["seq"]
            result["attempts"] += done.batch_requests_since_record(seq)
            carry(result, carried.pop(seq, None))
            if result["status"] != "ok":
                log.debug("row %s failed after %s: %s: %s", result["id"], counted(result["attempts"], "attempt"),
                          result["error_class"], result["error"])
            self.checkpoint.append(result)
            self._may_send()  # an answer after a pause: the task that got it takes no other row once taken over
            done.add_one(seq, "ok" if result["status"] == "ok" else result["error_class"], result["prompt_hash"],
                         self.checkpoint.epoch)
            # Only the Batch API sends a row twice in a run (an answer to an edited prompt, sent again with --wait):
            # that row's next record carries this one.
            if self.mode == "batch_api" and done.sends_again(seq, self.options.retry_failed):
                carried[seq] = {name: result[name] for name in CARRIED_FIELDS}  # type: ignore[literal-required]

        return record

    async def _tick(self, progress: Progress) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.checkpoint.tick()
            except CheckpointWriteError as exc:
                self._halt(exc)
                return
            progress.refresh()

    def _budget(self, done: RowStates, pricer: Pricer | None, shared: SharedLimits | None = None) -> Budget:
        """The job's budget, reserving at `pricer` (the Batch API's, or the online price); held in Redis beside every
        other process's of the job with `shared` (limits.shared; the Batch API holds one growing hold per file).

        One for the run: made at its first phase from what the checkpoint paid, holding the worst case of every live
        Batch API batch (the provider's to answer, whatever this run's mode: told as spent with `shared`), then
        carried into the next phase (an online run's, after it took on the live batches) with what the one before
        spent and what it still holds."""
        if self.budget is None:
            spent = self.checkpoint.spent(done, self._id_batches)
            assert self.plan.budget is not None and self.plan.max_tokens is not None  # the preflight's checks
            locations = self.plan.locations
            spend = shared.spend(str(locations.output.resolve()), str(locations.checkpoint_dir.resolve())) \
                if shared is not None else None
            self.budget = Budget(self.plan.budget, self.plan.max_tokens, pricer, spent.budget_cost,
                                 spent.budget_tokens, spend)
            for entry in self.ledger.live():  # sent: held whether it fits or not
                self.budget.hold_live(Hold(entry.hold_cost, entry.hold_tokens))
        self.budget.pricer = pricer
        return self.budget

    def _carried(self, done: RowStates) -> dict[int, dict[str, Any]]:
        """What the last record of each row this run may record again holds (a retried failure, an edited prompt,
        a row in a live batch), by row: its CARRIED_FIELDS, the sum over all its answers and requests before. So
        a row's cost, tokens and attempts are the sum over all its answers, and the job's spending the sum over
        its rows."""
        positions = done.resent_records(self.options.retry_failed, self._id_batches)
        if not len(positions):
            return {}
        paid = with_paid_in_all(self.checkpoint.row_groups().take(positions[:, 1], list(CARRIED_FIELDS)),
                                *done.paid_at(positions[:, 1]))
        return {int(seq): before for seq, before in zip(positions[:, 0], paid.to_pylist())
                if any(before.values())}

    def _halt(self, error: CheckpointWriteError) -> None:
        """A checkpoint write failed: stop at once. Requests in flight are dropped (their rows stay
        pending) rather than paid for with nowhere to keep the answer; no new one is sent."""
        self.stop.halt(error)
        self._cancel_answerer()

    def _finish(self, stats: RunStats, done: RowStates) -> dict[str, Any]:
        counts = done.counts(self._id_batches)
        totals = {"ok": counts.ok, "failed": counts.failed, "pending": stats.rows_total - counts.ok - counts.failed,
                  "not_in_input": counts.not_in_input}
        if self.batch_api_used:  # rows read more than once, and held rows not done: counted from the states
            stats.skipped = max(0, counts.ok + counts.failed - stats.ok - stats.failed)
        output = None
        # Taken over, this run writes neither: the new holder does, from every part, this run's included.
        done_here = totals["pending"] == 0 and self._still_held()
        if done_here and self.plan.shard is not None:
            # A shard writes no final file: `batch merge` writes the job's one output from every shard's records.
            self._mark_shard_finished(totals, stats)
        elif done_here:
            output = self.plan.locations.output
            # The input too: rows deleted from it leave the answers as they were, and the output must lose them.
            footer = output_footer(self._output_settings, made_from(self.checkpoint, self.plan.locations.input))
            if not is_current(output, footer):
                try:
                    self._write_output(output, done, footer)
                except InputChangedError as exc:  # its rows would sit beside answers to the rows read before
                    self.stop.note(str(exc), EXIT_BAD_INPUT)
                    output = None
        exit_code = self.stop.exit_code
        live = [describe(entry) for entry in self.ledger.live()]
        if exit_code is None:
            if self.stop.reason is not None:
                exit_code = EXIT_INTERRUPTED
            elif live:  # "run again later, or use --wait": cron's next run collects them
                exit_code = EXIT_BATCHES_LIVE
            else:  # 1 says "complete, some rows failed": a job with rows left (--limit) is not complete
                exit_code = EXIT_ROWS_FAILED if totals["failed"] and not totals["pending"] else EXIT_OK
        summary = build_summary(self.plan.name, self.plan.model, stats, totals, self.stop.reason, output,
                                exit_code)
        summary["mode"] = self.mode
        if self.plan.shard is not None:
            summary["shard"] = {"index": self.plan.shard.index, "count": self.plan.shard.count}
        summary["batches"] = live
        summary["wait"] = self.options.wait  # the words for live batches: "or use --wait" only to a run without it
        try:
            if not self.lease_lost:
                save_summary(summary, self.folder / "summary.json")
        except OSError as exc:  # the run is over and every answer is kept: only this copy of the summary is lost
            log.warning("could not save the summary in %s: %s", self.folder, exc.strerror or exc)
        return summary

    def _mark_shard_finished(self, totals: dict[str, int], stats: RunStats) -> None:
        """The shard's _SUCCESS marker, holding its counts (as a job with nothing pending writes its final file)."""
        if self.stop.write_error is not None:  # what was answered may not all be kept
            return
        try:
            mark_finished(self.folder, {"shard": self.plan.shard.folder,  # type: ignore[union-attr]
                                                     "rows": stats.rows_total, "ok": totals["ok"],
                                                     "failed": totals["failed"]})
        except OSError as exc:
            self.stop.note(f"{self.folder}: cannot mark the shard finished: {os_reason(exc)} (every "
                           "answer is kept: a rerun marks it and sends nothing)", EXIT_INTERNAL)

    @property
    def _output_settings(self) -> str:
        return output_settings(self.plan.output, self.plan.schema)

    def _write_output(self, output: Path, done: RowStates, footer: dict[bytes, bytes]) -> None:
        out = self.plan.output
        last = self.checkpoint.kept_records(done, self._id_batches, ["status", "response"]) \
            if out.parse_json else []
        replies = reply_columns(out, self.plan.schema, last)
        groups = self.checkpoint.row_groups() if done.record_count else None
        keep = list(out.keep_columns)
        try:
            write_final(output, self.table.id_batches(keep), out.id_column, keep, LastRecords(groups, done), replies,
                        footer=footer)
        except OSError as exc:
            raise OutputWriteError(f"{output}: cannot write the output: {os_reason(exc)} (every answer is safe in "
                                   f"{self.folder}: once it can be written, a rerun writes it and sends "
                                   "nothing)") from None

    def _id_batches(self) -> Iterator[pa.Array]:
        return (ids for _, ids in self.table.id_batches([]))

    # -- signals: the first asks for a graceful stop, a second one stops at once -----------------
    def _install_signal_handlers(self) -> None:
        if not self.options.signals:
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            before = TakenSignal(sig, signal.getsignal(sig), _loop_signal_handlers(loop).get(sig))
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                self._signals.append(before)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests run jobs in threads): no handlers
        early = taken_early()  # before ours were in, its KeyboardInterrupt dropped on its way (batch.interrupts)
        if early is not None and self._signals:
            self.interrupt(early)

    def _remove_signal_handlers(self) -> None:
        """Give each signal back to the handler it had before the run: the program's or its loop's own."""
        loop = asyncio.get_running_loop()
        handlers, forgotten = _loop_signal_handlers(loop), False
        for taken in self._signals:
            if taken.loop_handle is not None:
                # The very Handle the loop had: the signal's C-level handler and wakeup fd are the loop's already.
                handlers[taken.sig] = taken.loop_handle
            elif taken.handler is None:  # set outside Python, which cannot be put back: Python's default then
                loop.remove_signal_handler(taken.sig)
            else:
                # The program's handler first, then the loop forgets ours: loop.remove_signal_handler puts Python's
                # default in place before the program's could go back, and a SIGTERM in between killed the process.
                signal.signal(taken.sig, taken.handler)
                if handlers.pop(taken.sig, None) is not None:
                    forgotten = True
                else:  # a loop whose table batch cannot read: its own removal, the window with it
                    loop.remove_signal_handler(taken.sig)
                    signal.signal(taken.sig, taken.handler)
        if forgotten and not handlers:  # as loop.remove_signal_handler does once the loop handles no signal: its
            signal.set_wakeup_fd(-1)  # wakeup fd closes with the loop, and a signal written to it would go astray
        self._signals.clear()

    def _on_signal(self, sig: int) -> None:
        self.interrupt(signal.Signals(sig).name)

    def interrupt(self, name: str) -> None:
        """Stop as Ctrl-C does, called on the run's loop: the first call takes no more rows and gives requests in
        flight GRACE_S to finish; a second one stops at once (the rows it cuts off stay pending)."""
        if self.stop.asked:
            log.warning("%s again: stopping now; in-flight requests will be sent again on resume", name)
            self._cancel_answerer()
            return
        self.stop.reason = f"interrupted by {name}"
        self.stop.exit_code = self.stop.exit_code or EXIT_INTERRUPTED
        log.warning("%s: taking no more rows; waiting up to %.0f s for requests in flight", name, GRACE_S)
        self.stop.event.set()
        asyncio.get_running_loop().call_later(GRACE_S, self._cancel_answerer)

    def _cancel_answerer(self) -> None:
        if self.answerer is not None:
            self.answerer.cancel()


async def run_job(plan: Plan, options: RunOptions | None = None) -> dict[str, Any]:
    """Run a job: `plan` is `batch.preflight.preflight(job_path)` (with force=options.force)."""
    return await Run(plan, options or RunOptions()).execute()
