"""The Batch API answerer: the rows go to the provider in files, and come back in its output files.

A run (batch/runner.py) hands its pending rows over as for the online pool. Here they are written,
a line per row, into request files of at most `batch_api.max_requests_per_file` lines and
`max_bytes_per_file` bytes, each recorded in the ledger (batch/batch_api/ledger.py) before it is uploaded; then
each is uploaded, and a batch made of it. Every run first takes on the job's live batches: one left
half way by a kill goes on from its last recorded step, a finished one is downloaded and merged into
the checkpoint by custom_id (never by line order), through the same `record` as online answers.

Control plane only: the openai SDK does the files and batches calls (multipart uploads, pagination,
typed objects), with its own retries off so that tenacity is the one retry layer and the provider's business
codes (Zhipu's 1113 arrives as a 429) decide what is retried. How lines and batches are written differs by
provider: its BatchDialect (batch.providers). This module is imported only by a run that needs
it, so online runs do not pay the SDK's import.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import openai
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from tqdm.auto import tqdm

from batch.batch_api.ledger import (
    TERMINAL,
    BatchFile,
    Ledger,
    RowsWriter,
    custom_id,
    describe,
    format_batch,
    job_tag,
    keep_spooled,
)
from batch.checkpoint.answered import RowStates
from batch.errors import EXIT_BUDGET, EXIT_JOB_FATAL, CheckpointWriteError, JobFatalError
from batch.executor import Pending, Stop
from batch.input.prompts import prompt_token_bound
from batch.input.reader import Row
from batch.money.budget import Budget, Hold
from batch.online.client import accepted
from batch.online.failures import Failure, classify_status, retry_after_seconds
from batch.plan import Plan
from batch.pricing import Pricer
from batch.providers import BusinessCodes, batch_dialect_for
from batch.records import Record, answer_record, failed_record
from batch.wording import counted

log = logging.getLogger("batch")

T = TypeVar("T")
FIRST_POLL_S = 1.0
DOWNLOAD_CHUNK = 1 << 16
# A lost batch (its id not recorded) is looked for among batches made from an hour before its file was built.
LOOKUP_MARGIN_S = 3600


class ControlPlaneError(JobFatalError):
    """A files/batches call failed for good: the job stops (exit 3); what is recorded is taken on by the next run
    (or by `batch cancel` again)."""

    failure: Failure | None = None  # the last failure, when it was a Failure (a refusal, or retries used up)


class WaitForFiles(Exception):
    """An upload refused while the job's own batches keep files at the provider (its file cap): tried again once
    they are merged and their files deleted."""


class TakenOver(Exception):
    """The checkpoint's lease was taken over (this run is a zombie): it records, uploads and creates nothing more. The
    run was stopped with exit 4 by the check that found it (the runner's `holds_lease`)."""


class Gone(Exception):
    """The provider no longer knows an id the ledger holds: a 404, asked twice (a server that lost its state, a new
    key, a file deleted by hand). What it held is taken as never answered, not as a reason to stop."""

    def __init__(self, what: str) -> None:
        super().__init__(f"the provider no longer knows {what}")
        self.what = what


def control_client(plan: Plan) -> openai.AsyncOpenAI:
    # Retries off: tenacity (below) is the only layer, and judges the provider's codes, which the SDK would retry
    # blindly.
    return openai.AsyncOpenAI(api_key=plan.api_key, base_url=plan.base_url, max_retries=0,
                              timeout=max(plan.limits.timeout_s, 60.0), http_client=_proxied(plan.proxy))


def _proxied(proxy: str | None) -> openai.DefaultAsyncHttpxClient:
    """The SDK's HTTP client, through the plan's proxy (batch/proxy.py: the one the online requests take), never one
    the SDK would read from the environment itself: a proxy given serves every URL, and without one, a mount of None
    (no proxy) for every scheme overrides whatever HTTP(S)_PROXY or ALL_PROXY say (the TLS settings the environment
    gives are kept)."""
    if proxy is not None:
        return openai.DefaultAsyncHttpxClient(proxy=proxy)
    return openai.DefaultAsyncHttpxClient(mounts={"http://": None, "https://": None, "all://": None})


def control_failure(exc: BaseException, codes: BusinessCodes) -> Failure:
    """An SDK error as a Failure, judged like an online answer: by the provider's business code first, the status
    second."""
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        error = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
        code = error.get("code", getattr(exc, "code", None))
        message = str(error.get("message") or exc.message)[:300]
        return classify_status(exc.status_code, _int_or_none(code), message, retry_after_seconds(exc.response.headers),
                               codes)
    if isinstance(exc, openai.APITimeoutError):
        return Failure("retry", "timeout", "no answer in time")
    if isinstance(exc, openai.APIConnectionError):
        return Failure("retry", "connection", f"connection error ({exc})"[:200])
    if isinstance(exc, Failure):
        return exc
    return Failure("retry", "bad_response", f"{type(exc).__name__}: {exc}"[:300])


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass
class Building:
    """A request file being written: its lines, and its rows with their custom_ids, to local spools (never held)."""

    number: int
    handle: Any
    path: Path
    rows: RowsWriter
    bytes: int = 0
    hold_cost: float = 0.0
    hold_tokens: int = 0


class BatchAnswerer:
    """Takes on the job's live batches, then (when `submit`) puts the rows handed over into new ones; with
    `wait`, polls until none is left, putting rows that came back without an answer into new batches."""

    def __init__(self, plan: Plan, ledger: Ledger, states: RowStates, pricer: Pricer | None, budget: Budget | None,
                 stop: Stop, submit: bool, wait: bool,
                 more_rows: Callable[[Callable[[Record], None]], AsyncIterator[Pending]],
                 show_bar: bool = False, holds_lease: Callable[[], bool] = lambda: True) -> None:
        self.plan = plan
        self.retry = plan.retry
        self.ledger = ledger
        self.states = states
        # A line's body is the online request's, less what asks for a stream (model.stream): a batch answers in files.
        streamed = ("stream", "stream_options") if plan.stream else ()
        self.body_params = {k: v for k, v in plan.body_params.items() if k not in streamed}
        self.pricer = pricer
        self.budget = budget
        self.stop = stop
        self.submit = submit
        self.wait = wait
        self.more_rows = more_rows
        self.show_bar = show_bar
        # Renews the checkpoint's lease now (a checkpoint on a URL); False once another run took it over.
        self.holds_lease = holds_lease
        self.settings = plan.batch_api
        self.dialect = batch_dialect_for(plan.provider, plan.base_url)
        self.endpoint = self.dialect.endpoint
        self.tag = job_tag(plan.fingerprint, plan.locations.checkpoint_dir)
        self.model = plan.model
        self.json_output = plan.json_output  # parse_json (and json_schema): how a reply is checked
        self.max_attempts = plan.retry.max_attempts
        self.submissions = ledger.submissions(len(states.codes))
        self.max_rows, self.max_bytes = self.settings.max_requests_per_file, self.settings.max_bytes_per_file
        for entry in ledger.files.values():  # files refused as too big: later ones are built smaller
            self._shrink(entry.outcome)
        # Files an earlier run recorded but not as uploaded: it may have been stopped after the upload.
        self.unsure_uploads = {entry.number for entry in ledger.live() if entry.file_id is None}
        self.lines_submitted = 0
        self.returned = 0  # rows that came back without an answer in this run (pending again)
        self.merges = 0  # batches merged (or found lost) in this run: each gives its budget hold back
        # The last submission stopped for room that live batches hold (budget, the provider's file cap): more rows
        # are put in batches as they end.
        self.cut_short = False
        self.bar: Any = None  # with --wait on a terminal: a tqdm bar of the lines answered across batches
        self._seen: dict[int, BatchFile] = {}  # the batches polled in this run
        self._anomalies: set[int] = set()  # files whose batch ended naming no file for its answers (warned once)
        self._waiting_uploads: set[int] = set()  # files whose upload waits for the job's batches to free files
        self._building: Building | None = None  # the request file being written, until the ledger records it
        self._task: asyncio.Task[None] | None = None
        self._api: openai.AsyncOpenAI | None = None

    # -- the Answerer ----------------------------------------------------------------------------
    async def answer(self, rows: AsyncIterator[Pending], record: Callable[[Record], None]) -> None:
        # In a task of its own, which cancel() stops (a second Ctrl-C) without cancelling the run around it:
        # every step taken is in the ledger, and the next run goes on from there.
        self._task = asyncio.create_task(self._answer(rows, record))
        await asyncio.gather(self._task, return_exceptions=True)
        if self.stop.write_error is not None:
            raise self.stop.write_error
        if not self._task.cancelled() and self._task.exception() is not None:
            raise self._task.exception()  # type: ignore[misc]

    async def _answer(self, rows: AsyncIterator[Pending], record: Callable[[Record], None]) -> None:
        try:
            async with control_client(self.plan) as api:
                self._api = api
                await self._work(rows, record)
        except TakenOver:
            pass  # stopped with exit 4 already; what it recorded is the new holder's to take on
        except ControlPlaneError as exc:
            self.stop.now(str(exc), EXIT_JOB_FATAL)

    def cancel(self) -> None:
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def _work(self, rows: AsyncIterator[Pending], record: Callable[[Record], None]) -> None:
        try:
            await self._work_on(rows, record)
        finally:
            if self.bar is not None:
                self.bar.close()

    async def _work_on(self, rows: AsyncIterator[Pending], record: Callable[[Record], None]) -> None:
        await self._collect(record)
        if self.submit and not self.stop.asked:
            await self._submit(rows, record)
        interval = min(FIRST_POLL_S, self.settings.poll_interval_s)
        if self.wait and self.show_bar and self.ledger.live():
            self.bar = tqdm(unit="line", dynamic_ncols=True, file=sys.stderr, desc="Batch API",
                            position=1)  # under the run's bar of rows
        while self.wait and self.ledger.live() and not self.stop.asked:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.event.wait(), interval)
            if self.stop.asked:
                break
            interval = min(interval * 2, self.settings.poll_interval_s)
            returned, merges = self.returned, self.merges
            await self._collect(record)
            freed = self.cut_short and self.merges > merges
            if self.submit and (self.returned > returned or freed) and not self.stop.asked:
                await self._submit(self.more_rows(record), record)

    # -- taking on live batches ------------------------------------------------------------------
    async def _collect(self, record: Callable[[Record], None]) -> None:
        """Each live batch one step on: uploaded, created, polled, and merged once finished. Every batch is polled
        before any is merged: a merge that stops the run (a result file short at every download) leaves each
        batch's state as the provider last told it, for the summary and `status`."""
        polled = []
        for entry in sorted(self.ledger.live(), key=lambda e: e.number):
            if self.stop.asked:
                return
            try:
                if await self._superseded(entry):
                    await self._drop(entry)
                    continue
                await self._send(entry)
                batch = await self._call("poll", lambda e=entry: self._client.batches.retrieve(e.batch_id),
                                         missing=f"batch {entry.batch_id}")
            except Gone as gone:
                await self._forget(entry, gone)
                continue
            except WaitForFiles:
                continue
            counts = _counts(batch)
            changed = batch.status != entry.status
            if changed:
                self.ledger.note("state", entry.number, status=batch.status, counts=counts)
            entry.counts = counts
            self._seen[entry.number] = entry
            polled.append((entry, batch, changed))
        for entry, batch, changed in polled:
            if self.stop.asked:
                return
            if batch.status in TERMINAL and not self._results_unnamed(entry, batch):
                await self._merge(entry, batch, record)
            log.log(logging.INFO if changed else logging.DEBUG, "%s", format_batch(describe(entry)))
        self._show_progress()
        for entry in self.ledger.files.values():  # merged, but killed before their files were deleted
            if entry.merged and not entry.cleaned and not self.stop.asked:
                await self._clean(entry, None)

    async def _send(self, entry: BatchFile) -> None:
        """Upload a recorded file and make its batch, each step recorded as soon as it returns."""
        if entry.file_id is None:
            await self._upload(entry)
        if entry.batch_id is None:
            found = await self._find_lost(entry)
            if found is None:
                found = await self._create_or_upload_again(entry)
            self.ledger.note("created", entry.number, batch_id=found)
            self.lines_submitted += entry.rows
            with contextlib.suppress(OSError):
                self.ledger.store.delete(self.ledger.requests_key(entry.number))

    async def _upload(self, entry: BatchFile) -> None:
        key = self.ledger.requests_key(entry.number)
        name = upload_name(entry)

        async def upload() -> str:
            self._lease_held()
            # Streamed by httpx's multipart writer, never read whole here.
            with self.ledger.store.open_read(key) as lines:
                made = await self._client.files.create(file=(name, lines, "application/jsonl"), purpose="batch")
            return made.id

        # An upload whose id a kill kept from the ledger is used, not left to count against the provider's cap.
        file_id = await self._find_upload(name) if entry.number in self.unsure_uploads else None
        try:
            file_id = file_id or await self._call("upload", upload)
        except ControlPlaneError as refused:
            # Refused for what the request is (a 4xx, not an outage) while the job's own batches keep files there:
            # the provider's file cap, most likely, which their merges free. Otherwise the refusal stops the run.
            if refused.failure is None or refused.failure.scope != "row" or not any(
                    other.batch_id is not None for other in self.ledger.live() if other is not entry):
                raise
            if entry.number not in self._waiting_uploads:
                self._waiting_uploads.add(entry.number)
                log.warning("file %d: the upload was refused (%s); waiting for the job's live batches to end and "
                            "free their files at the provider", entry.number, refused.failure)
            raise WaitForFiles() from None
        self._waiting_uploads.discard(entry.number)
        self.ledger.note("uploaded", entry.number, file_id=file_id)

    async def _create_or_upload_again(self, entry: BatchFile) -> str:
        """Make the file's batch; an upload the provider no longer knows (refused at create, then confirmed gone)
        is uploaded again from the request file, still here until its batch exists, and the batch made of that."""
        try:
            return await self._create(entry)
        except (ControlPlaneError, Gone) as refused:
            if isinstance(refused, ControlPlaneError) and not await self._upload_gone(entry):
                raise
        log.warning("file %d: the provider no longer knows its upload, file %s; uploading it again", entry.number,
                    entry.file_id)
        self.ledger.note("lost", entry.number, file_id=entry.file_id)
        self.unsure_uploads.discard(entry.number)
        await self._upload(entry)
        return await self._create(entry)

    async def _upload_gone(self, entry: BatchFile) -> bool:
        """Whether the provider confirms it no longer knows the file's upload (after a create refused it)."""
        try:
            await self._call("file lookup", lambda: self._client.files.retrieve(entry.file_id),
                             missing=f"file {entry.file_id}")
        except Gone:
            return True
        except ControlPlaneError:
            pass
        return False

    async def _forget(self, entry: BatchFile, gone: Gone) -> None:
        """A live batch the provider no longer knows: none of its rows was answered, all are pending again."""
        log.warning("file %d: %s; its rows are pending again (%s)", entry.number, gone, counted(entry.rows, "row"))
        returned = sum(self._give_back_row(seq) for seq in self._seqs(entry))
        self.ledger.note("merged", entry.number, status="lost", outcome={"returned": returned, "lost": gone.what})
        if self.budget is not None:
            self.budget.give_back(Hold(entry.hold_cost, entry.hold_tokens))
        self.merges += 1
        await self._remove(entry, [entry.file_id])

    async def _superseded(self, entry: BatchFile) -> bool:
        """Whether a file never made a batch has rows answered since it was built (not held for it): it was built by
        a run taken over before it made a batch of it (the lease is checked before each step, but a pause can fall
        between the check and the step), and the run that took over sent those rows itself. Made a batch now, they
        would be paid twice. A batch made of it after all (found by its metadata) is taken on as any other."""
        if entry.batch_id is not None or entry.seqs is None or self.states.all_held(entry.seqs[entry.seqs >= 0]):
            return False
        return await self._find_lost(entry) is None

    async def _drop(self, entry: BatchFile) -> None:
        """A file never made a batch that is not to be: dropped (its upload deleted), its rows still held pending."""
        returned = sum(self._give_back_row(seq) for seq in self._seqs(entry))
        log.warning("file %d: never made a batch, and some of its rows were answered since it was built (by the run "
                    "that took the checkpoint's lease over): dropped, nothing of it was sent; pending again: %s",
                    entry.number, counted(returned, "row"))
        self.ledger.note("merged", entry.number, status="dropped", outcome={"returned": returned})
        if self.budget is not None:
            self.budget.give_back(Hold(entry.hold_cost, entry.hold_tokens))
        self.merges += 1
        await self._remove(entry, [entry.file_id])

    def _lease_held(self) -> None:
        """Before each step that commits the job to a file or pays for it (a new file's number, a file recorded, an
        upload, a batch made): the lease renewed now, so a run paused past its lease and taken over meanwhile
        submits nothing more. What is left is the time between this renewal and the provider's answer: a takeover
        needs the lease unrenewed for its whole ttl, so only a pause of more than the ttl in that instant (online
        mode has the same between a row's check and its request) lets a zombie's call through."""
        if not self.holds_lease():
            raise TakenOver()

    def _give_back_row(self, seq: int) -> bool:
        """A row of a batch that came back without an answer for it: pending again (if this run holds it)."""
        if not self._held(seq):
            return False
        self.states.release(seq)
        self.returned += 1
        return True

    @staticmethod
    def _seqs(entry: BatchFile) -> list[int]:
        """Where the file's rows sit in the input now (Ledger.place; -1: no longer in it); none when nothing was
        placed (`cancel` holds no rows)."""
        return [] if entry.seqs is None else entry.seqs.tolist()

    async def _find_upload(self, name: str) -> str | None:
        """The id of an uploaded file named `name`, or None (also when the provider cannot list files)."""

        async def look() -> str | None:
            async for stored in self._client.files.list(purpose="batch"):
                if stored.filename == name:
                    log.info("%s: found it uploaded (before the last run was stopped)", name)
                    return stored.id
            return None

        try:
            return await self._call("list files", look)
        except ControlPlaneError as exc:
            log.warning("%s; uploading the file again", exc)
            return None

    async def _create(self, entry: BatchFile) -> str:
        """Make the file's batch. A create that failed in transit may have made it: looked for before trying again."""
        metadata = {"batch_job": entry.tag, "batch_file": str(entry.number)}
        # extra_body: the SDK knows no such field (OpenAI has none).
        extra = {"auto_delete_input_file": True} if self.dialect.auto_delete_input_file else None
        first = True

        async def create() -> Any:
            nonlocal first
            if not first:
                lost = await self._find_lost(entry)
                if lost is not None:
                    return lost
            first = False
            self._lease_held()  # the last step before a batch is paid for
            # The SDK types `endpoint` as OpenAI's /v1 paths; Zhipu's docs and SDK send /v4/chat/completions.
            made = await self._client.batches.create(
                input_file_id=entry.file_id, endpoint=self.endpoint, completion_window="24h",  # type: ignore[arg-type]
                metadata=metadata, extra_body=extra)
            return made.id

        return await self._call("create", create, missing=f"file {entry.file_id}")

    async def _find_lost(self, entry: BatchFile) -> str | None:
        """The batch made of this file whose id a kill kept from the ledger, found by its input file (a field every
        batch has, where a provider may not echo metadata) or its metadata; or None."""

        async def look() -> str | None:
            async for batch in self._client.batches.list(limit=100):  # newest first
                metadata = batch.metadata or {}
                ours = metadata.get("batch_job") == entry.tag and metadata.get("batch_file") == str(entry.number)
                if ours or (entry.file_id is not None and batch.input_file_id == entry.file_id):
                    log.info("file %d: found its batch %s (made before the last run was stopped)",
                             entry.number, batch.id)
                    return batch.id
                made = batch.created_at / 1000 if batch.created_at > 1e11 else batch.created_at  # Zhipu: ms
                if made < entry.built_at - LOOKUP_MARGIN_S:
                    return None
            return None

        return await self._call("list", look)

    # -- merging results --------------------------------------------------------------------------
    def _results_unnamed(self, entry: BatchFile, batch: Any) -> bool:
        """An ended batch that reports answered lines but names no file holding them: an anomaly of the
        provider's, reported (once a run) and looked at again at the next poll; its rows are not sent again."""
        missing = [f"{counted(entry.counts.get(name, 0), name + ' line')} but no {which} file"
                   for name, which, file_id in (("completed", "output", batch.output_file_id),
                                                ("failed", "error", batch.error_file_id))
                   if entry.counts.get(name, 0) and not file_id]
        if missing and entry.number not in self._anomalies:
            self._anomalies.add(entry.number)
            log.warning("file %d: batch %s is %s with %s: not merged yet (looked at again at the next poll; tell the "
                        "provider if it stays so)", entry.number, batch.id, batch.status, " and ".join(missing))
        return bool(missing)

    async def _merge(self, entry: BatchFile, batch: Any, record: Callable[[Record], None]) -> None:
        """A finished batch's output and error lines into the checkpoint, by custom_id; its rows without one
        are pending again."""
        keys: list[tuple[str, str]] = []
        lost: Gone | None = None  # a result file the provider no longer knows: its rows were not answered
        for which, file_id, reported in (("output", batch.output_file_id, "completed"),
                                         ("errors", batch.error_file_id, "failed")):
            if file_id:
                try:
                    keys.append((which, await self._download(entry, which, file_id, entry.counts.get(reported, 0))))
                except Gone as gone:
                    log.warning("file %d: %s; the rows it answered are pending again", entry.number, gone)
                    lost = gone
        rows = self.ledger.rows_of(entry.number)
        index = {cid: i for i, cid in enumerate(rows.column("custom_id").to_pylist())}
        seqs = self._seqs(entry)  # by id: the input may have changed since the file was built
        kept_aside: set[int] = set()  # rows no longer in the input whose answer is recorded (by id, seq -1)
        ids = rows.column("id").to_pylist()
        hashes = rows.column("prompt_hash").to_pylist()
        attempts = rows.column("submission").to_pylist()
        # Files built before the bound was kept count a row without usage at the file's worst case per row.
        bounds = rows.column("prompt_bound").to_pylist() if "prompt_bound" in rows.column_names else None
        outcome = {"ok": 0, "failed": 0, "returned": 0}
        for which, key in keys:
            with self.ledger.store.open_read(key) as raw, \
                    io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as lines:
                for number, line in enumerate(lines, 1):
                    parsed = _line(line)
                    if parsed is None:
                        if line.strip():
                            log.warning("file %d: line %d of batch %s's %s file is not JSON: skipped", entry.number,
                                        number, batch.id, which)
                        continue
                    at = index.get(parsed.get("custom_id"))
                    if at is None:
                        log.warning("file %d: line %d of batch %s's %s file answers no row of the file (custom_id "
                                    "%.70r): skipped", entry.number, number, batch.id, which, parsed.get("custom_id"))
                        continue
                    if seqs[at] < 0:  # deleted from the input: its answer was paid for, so kept by id
                        if at in kept_aside:
                            continue
                        kept_aside.add(at)
                    elif not self._held(seqs[at]):  # answered by a merge cut short, or a line given twice
                        continue
                    row = Row(seqs[at], ids[at], {}, hashes[at])
                    result = self._judge(parsed, row, attempts[at])
                    if result is None:
                        outcome["returned"] += 1
                        continue
                    if self.budget is not None:  # first: the record keeps what the budget counted for it
                        self.budget.count(self._worst_case(entry, bounds, at), result)
                    self._keep(record, result)
                    outcome["ok" if result["status"] == "ok" else "failed"] += 1
        why = {"expired": "batch_expired", "cancelled": None}.get(batch.status, "batch_failed")
        refusal = Refusal(batch) if batch.status == "failed" else None
        if refusal is not None:
            log.warning("file %d: batch %s failed (%s)", entry.number, batch.id, refusal.reasons)
            # A file that can never pass as it is: its rows go into files of half its lines, or bytes.
            if refusal.too_many_lines:
                outcome["max_rows"] = max(1, entry.rows // 2)
            if refusal.too_many_bytes:
                outcome["max_bytes"] = max(1, entry.bytes // 2)
            self._shrink(outcome)
        for at, seq in enumerate(seqs):  # no line for it: pending again (or failed once its submissions are used up)
            if not self._held(seq):
                continue
            row = Row(seq, ids[at], {}, hashes[at])
            line_refused = refusal.of_line(at + 1) if refusal is not None else None
            if line_refused is not None:  # its own line is at fault: sent again, it would be refused again
                self._keep(record, failed_record(row, "bad_request", f"batch {batch.id} refused its line: "
                                                 f"{line_refused}", attempts[at], self.model))
                outcome["failed"] += 1
            elif (why is not None and lost is None and attempts[at] >= self.max_attempts
                  and not (refusal is not None and refusal.too_big)):  # a split file's rows are sent again
                reason = f" ({refusal.reasons})" if refusal is not None else ""
                self._keep(record, failed_record(row, why, f"the batch ended {batch.status}{reason} without an "
                                                 "answer for it", attempts[at], self.model))
                outcome["failed"] += 1
            else:
                outcome["returned"] += self._give_back_row(seq)
        self.ledger.note("merged", entry.number, status=batch.status, outcome=outcome)
        if self.budget is not None:
            self.budget.give_back(Hold(entry.hold_cost, entry.hold_tokens))
        self.merges += 1
        await self._clean(entry, batch)

    def _shrink(self, outcome: dict[str, Any]) -> None:
        """Build files no bigger than a merged file's outcome allows (max_rows, max_bytes: half a file refused as
        too big)."""
        self.max_rows = min(self.max_rows, outcome.get("max_rows", self.max_rows))
        self.max_bytes = min(self.max_bytes, outcome.get("max_bytes", self.max_bytes))

    def _worst_case(self, entry: BatchFile, bounds: list[int] | None, at: int) -> Hold:
        """What the budget held for row `at` of the file: what an answer without usage counts as."""
        assert self.budget is not None
        if bounds is None:
            return Hold(entry.hold_cost / entry.rows, -(-entry.hold_tokens // entry.rows))
        return self.budget.worst_case(bounds[at])

    def _held(self, seq: int) -> bool:
        return 0 <= seq < len(self.states.codes) and self.states.is_held(seq)

    def _judge(self, line: dict[str, Any], row: Row, attempts: int) -> Record | None:
        """A result line as the row's record; None when the row goes back to pending (sent again by a next run)."""
        response = line.get("response") if isinstance(line.get("response"), dict) else {}
        status, body, error = response.get("status_code"), response.get("body"), line.get("error")
        try:
            # An error body in a 200 (a gateway's) is judged by its code, as online (client.parse_body).
            answered = isinstance(body, dict) and (body.get("choices") or not body.get("error"))
            if status == 200 and answered and not error:
                result = answer_record(row, accepted(body), 0.0, attempts, self.pricer, self.model)
                result["latency_s"] = None  # an output line says nothing of its own duration
                if self.json_output is not None:  # a bad_json row is not asked again here: --retry-failed does
                    self.json_output.judge(result, self.plan.max_tokens)
                return result
            raise _line_failure(status, body, error, self.plan.provider.codes)
        except Failure as failure:
            if failure.scope == "row" or (failure.scope == "retry" and attempts >= self.max_attempts):
                return failed_record(row, failure.error_class, failure.message, attempts, self.model)
            if failure.scope == "job":
                self.stop.now(f"the API refused the job: {failure}", EXIT_JOB_FATAL)
            self._give_back_row(row.seq)
            return None

    def _keep(self, record: Callable[[Record], None], result: Record) -> None:
        # Its batch requests are counted by the run with the row's others (RowStates.batch_requests): none of its own.
        result["attempts"] = 0
        try:
            record(result)
        except CheckpointWriteError as exc:
            self.stop.halt(exc)
            raise

    async def _download(self, entry: BatchFile, which: str, file_id: str, reported: int) -> str:
        """A result file, streamed to a local spool (never held whole), then kept in the checkpoint's store; downloaded
        again (as a transient failure) while it holds fewer lines than the batch reports (`reported`) or ends in a
        line cut short. Returns its key."""
        key = self.ledger.results_key(entry.number, which)
        tmp = self.ledger.spool(key)

        async def fetch() -> str:
            size, last_line_at, lines = 0, 0, 0
            async with self._client.files.with_streaming_response.content(file_id) as response:
                with open(tmp, "wb") as out:
                    async for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                        out.write(chunk)
                        lines += chunk.count(b"\n")
                        if (end := chunk.rfind(b"\n")) >= 0:
                            last_line_at = size + end + 1
                        size += len(chunk)
            with open(tmp, "rb") as written:  # a last line without its newline: whole only if it is JSON
                written.seek(last_line_at)
                tail = written.read()
            if tail.strip():
                if _line(tail.decode("utf-8", "replace")) is None:
                    raise Failure("retry", "short_download", f"the {which} file {file_id} ends in a line cut short")
                lines += 1
            if lines < reported:
                raise Failure("retry", "short_download", f"the {which} file {file_id} holds "
                              f"{counted(lines, 'line')} where the batch reports {reported}")
            keep_spooled(self.ledger.store, key, tmp)
            return key

        try:
            return await self._call("download", fetch, missing=f"the {which} file {file_id}")
        except OSError as exc:
            raise CheckpointWriteError(f"{self.ledger.store.where(key)}: cannot write a Batch API result file: "
                                       f"{exc.strerror or exc}") from None

    async def _clean(self, entry: BatchFile, batch: Any) -> None:
        """Delete the batch's files at the provider (Zhipu keeps at most 1,000) and here, once merged."""
        if batch is None and entry.batch_id is not None:
            with contextlib.suppress(Gone):  # then its files are gone with it, or are not the job's to find
                batch = await self._call("poll", lambda: self._client.batches.retrieve(entry.batch_id),
                                         missing=f"batch {entry.batch_id}")
        await self._remove(entry, [entry.file_id, getattr(batch, "output_file_id", None),
                                   getattr(batch, "error_file_id", None)])

    async def _remove(self, entry: BatchFile, remote: list[str | None]) -> None:
        """Delete these files at the provider, then the file's local copies, and record it cleaned."""
        for file_id in filter(None, remote):
            await self._call("delete", lambda f=file_id: self._delete(f))
        self.ledger.note("cleaned", entry.number)
        for key in [self.ledger.results_key(entry.number, which) for which in ("output", "errors")] + [
                self.ledger.requests_key(entry.number)]:
            with contextlib.suppress(OSError):
                self.ledger.store.delete(key)

    async def _delete(self, file_id: str) -> None:
        try:
            await self._client.files.delete(file_id)
        except openai.NotFoundError:
            pass  # gone already (Zhipu's auto_delete_input_file, or a delete before a kill)

    # -- new batches --------------------------------------------------------------------------------
    async def _submit(self, rows: AsyncIterator[Pending], record: Callable[[Record], None]) -> None:
        """The rows handed over, into request files, each recorded, uploaded and made a batch as it fills."""
        self._building = None
        try:
            await self._fill(rows, record)
        except TakenOver:
            if self._building is not None:  # never recorded: nothing of it is anywhere but here
                _discard(self._building)
            raise
        finally:
            self._building = None

    async def _fill(self, rows: AsyncIterator[Pending], record: Callable[[Record], None]) -> None:
        building: Building | None = None
        self.cut_short = False
        limit_rows, limit_bytes = self.max_rows, self.max_bytes
        async for pending in rows:
            if self.stop.asked:
                break
            if self._waiting_uploads:  # no new file while one waits for room at the provider
                self.cut_short = True
                break
            body = self._body(pending.messages)
            size = len(body) + 120 + len(self.endpoint)  # the line around the body, custom_id included
            if size > limit_bytes:
                limit = ("batch_api.max_bytes_per_file" if limit_bytes == self.settings.max_bytes_per_file
                         else "half a file the provider refused as too big")
                self._keep(record, failed_record(pending.row, "bad_request", f"its request of "
                                                 f"{counted(size, 'byte')} is over {limit} ({limit_bytes})", 0,
                                                 self.model))
                continue
            if building is not None and (len(building.rows) >= limit_rows or building.bytes + size > limit_bytes):
                await self._finish(building)
                building = self._building = None
            bound = prompt_token_bound(pending.messages)
            hold = None
            if building is None:
                self._lease_held()
            number = building.number if building is not None else self.ledger.claim_number()
            if self.budget is not None:
                hold = self.budget.worst_case(bound)
                if not await self.budget.take(hold, _file_name(number)):
                    # Live batches (and the file being built) hold their worst case: as they end, what they did
                    # not spend is free again. The budget is reached only when nothing holds any of it.
                    if self.ledger.live() or (building is not None and len(building.rows)):
                        self.cut_short = True
                    else:
                        self.stop.note(self.budget.describe(), EXIT_BUDGET)
                    break
            if building is None:
                building = self._building = self._start(number)
            self._add(building, pending, body, hold, bound)
        if building is not None:
            await self._finish(building)

    def _body(self, messages: list[dict[str, Any]]) -> bytes:
        """A line's request body, serialized as the online pool does (pool.request_body)."""
        body = {"model": self.model, "messages": messages, **self.body_params}
        return json.dumps(body, ensure_ascii=False, sort_keys=True, default=str).encode()

    def _start(self, number: int) -> Building:
        spool = self.ledger.spool(self.ledger.requests_key(number))
        return Building(number, open(spool, "wb"), spool, self.ledger.rows_writer(number))

    def _add(self, building: Building, pending: Pending, body: bytes, hold: Hold | None, bound: int) -> None:
        row = pending.row
        cid = custom_id(building.number, row.id)
        line = b'{"custom_id":"%s","method":"POST","url":"%s","body":%s}\n' % (cid.encode(), self.endpoint.encode(),
                                                                              body)
        building.handle.write(line)
        building.bytes += len(line)
        building.rows.add(row.seq, row.id, cid, row.prompt_hash, int(self.submissions[row.seq]) + 1, bound)
        if hold is not None:
            building.hold_cost += hold.cost
            building.hold_tokens += hold.tokens

    async def _finish(self, building: Building) -> None:
        """Record a built file (rows, then lines, then the ledger's line), hold its rows, and send it."""
        number = building.number
        key = self.ledger.requests_key(number)
        self._lease_held()  # taken over: the file is never recorded, so never taken on by anyone
        try:
            building.handle.close()
            keep_spooled(self.ledger.store, key, building.path)
            building.rows.close()  # both in the store, durable, before the ledger names the file
        except OSError as exc:
            raise CheckpointWriteError(f"{self.ledger.store.where(key)}: cannot write a Batch API request file: "
                                       f"{exc.strerror or exc}") from None
        self.ledger.note("file", number, tag=self.tag, rows=len(building.rows), bytes=building.bytes,
                         records_before=self.states.record_count, hold_cost=building.hold_cost,
                         hold_tokens=building.hold_tokens)
        self._building = None  # the ledger's now: taken on by whoever holds the checkpoint next
        if self.budget is not None:
            self.budget.submit(_file_name(number), Hold(building.hold_cost, building.hold_tokens))
        seqs = np.frombuffer(building.rows.seqs, np.int64)
        self.states.hold(seqs, self.states.record_count)
        self.submissions[seqs] += 1
        self.states.batch_requests[seqs] += 1
        entry = self.ledger.files[number]
        entry.seqs = seqs
        try:
            await self._send(entry)
        except WaitForFiles:
            return  # recorded, its rows held: its upload is tried again at each poll
        log.info("file %d: %s, %s, submitted as batch %s", number, counted(entry.rows, "row"),
                 counted(entry.bytes, "byte"), entry.batch_id)

    # -- calls ------------------------------------------------------------------------------------
    @property
    def _client(self) -> openai.AsyncOpenAI:
        assert self._api is not None
        return self._api

    async def _call(self, what: str, call: Callable[[], Awaitable[T]], missing: str | None = None) -> T:
        """A control-plane call, transient failures retried with backoff; ControlPlaneError when it fails for good.
        With `missing` (the id the call names), a 404 is asked again at once, and a second one raises Gone."""
        retry = self.retry
        retrying = AsyncRetrying(
            stop=stop_after_attempt(retry.max_attempts), reraise=True,
            wait=wait_exponential_jitter(multiplier=max(retry.initial_backoff_s, 0.01), max=retry.max_backoff_s,
                                         jitter=retry.initial_backoff_s),
            retry=retry_if_exception(lambda exc: isinstance(exc, Failure) and exc.scope == "retry"),
            before_sleep=lambda state: log.warning("Batch API %s failed (%s); trying again in %.1f s", what,
                                                   state.outcome.exception() if state.outcome else "?",
                                                   state.next_action.sleep if state.next_action else 0.0))
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        try:
                            return await call()
                        except openai.NotFoundError:
                            if missing is None:
                                raise
                        try:  # a proxy's misrouted 404 is not taken at its word: asked again
                            return await call()
                        except openai.NotFoundError:
                            raise Gone(missing) from None
                    except openai.APIError as exc:
                        raise control_failure(exc, self.plan.provider.codes) from None
        except Failure as failure:
            refused = ControlPlaneError(f"the Batch API {what} failed: {failure}")
            refused.failure = failure
            raise refused from None
        raise AssertionError("unreachable")

    def _show_progress(self) -> None:
        """Lines answered across the batches this run polled: on the bar, else as a log line per round of polls."""
        if not self._seen:
            return
        total = sum(entry.rows for entry in self._seen.values())
        answered = sum(answered_lines(entry) for entry in self._seen.values())
        live = sum(1 for entry in self._seen.values() if entry.live)
        if self.bar is not None:
            self.bar.total, self.bar.n = total, answered
            self.bar.set_postfix_str(f"live batches={live}")
            self.bar.refresh()
        else:
            log.info("Batch API: %d of %s answered, %s still at the provider", answered, counted(total, "line"),
                     counted(live, "batch"))

    def live_batches(self) -> list[dict[str, Any]]:
        now = time.time()
        return [describe(entry, now) for entry in self.ledger.live()]


def _discard(building: Building) -> None:
    """A request file given up before the ledger named it: its local spools deleted."""
    building.handle.close()
    building.rows.abandon()
    building.path.unlink(missing_ok=True)


def _file_name(number: int) -> str:
    """Request file `number` as the budget names its hold (one for all its rows)."""
    return f"file-{number}"


def answered_lines(entry: BatchFile) -> int:
    """Lines of the file answered: as merged (a row sent back to pending was not), else as the provider counts."""
    if entry.merged:
        return entry.outcome.get("ok", 0) + entry.outcome.get("failed", 0)
    return entry.counts.get("completed", 0) + entry.counts.get("failed", 0)


def upload_name(entry: BatchFile) -> str:
    return f"batch-{entry.tag}-{entry.number}.jsonl"


def _line(text: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _line_failure(status: Any, body: Any, error: Any, codes: BusinessCodes) -> Failure:
    """A result line that holds no answer: its error, judged as an online one would be."""
    if not isinstance(error, dict):
        error = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), dict) else {}
    code, message = error.get("code"), str(error.get("message") or "")[:300]
    if code == "batch_expired":
        return Failure("retry", "batch_expired", "the batch expired before this request was done")
    if code in ("batch_cancelled", "batch_canceled"):
        return Failure("retry", "batch_cancelled", "the batch was cancelled before this request was done")
    http = status if isinstance(status, int) and status != 200 else 200
    if http == 200 and _int_or_none(code) is None:
        return Failure("retry", "server_error", f"a result line without an answer ({code or 'no code'}: {message})")
    return classify_status(http, _int_or_none(code), message, codes=codes)


# errors.data codes of a file that can never pass as it is (too many lines, or bytes): it is split, not sent again
TOO_MANY_LINES = {"too_many_lines", "too_many_requests", "too_many_tasks"}
TOO_MANY_BYTES = {"too_many_bytes", "file_too_large", "file_size_exceeded"}


class Refusal:
    """Why the provider refused a file at validation (its `errors.data`): per line, and as a whole."""

    def __init__(self, batch: Any) -> None:
        errors = getattr(getattr(batch, "errors", None), "data", None) or []
        self.reasons = "; ".join(f"{e.code}: {e.message}" for e in errors[:3]) or "no reason given"
        self.too_many_lines = any(e.code in TOO_MANY_LINES for e in errors)
        self.too_many_bytes = any(e.code in TOO_MANY_BYTES for e in errors)
        self.too_big = self.too_many_lines or self.too_many_bytes
        self._by_line = {e.line: f"{e.code}: {e.message}" for e in errors if isinstance(e.line, int)}

    def of_line(self, line: int) -> str | None:
        return self._by_line.get(line)


def _counts(batch: Any) -> dict[str, int]:
    counts = getattr(batch, "request_counts", None)
    if counts is None:
        return {}
    return {name: int(getattr(counts, name, 0) or 0) for name in ("total", "completed", "failed")}


CANCELLABLE = ("validating", "in_progress")  # a batch in any other state is ending or has ended: not cancellable


@dataclass(frozen=True)
class CancelOutcome:
    """What `batch cancel` did to each of the job's live files (each one `describe`d as it is now)."""

    cancelled: list[dict[str, Any]]  # a cancel asked now
    ended: list[dict[str, Any]]  # ended or ending at the provider already (completed, failed, expired, finalizing,
    # or cancelling/cancelled by an earlier cancel): nothing was asked of it
    dropped: list[dict[str, Any]]  # built or uploaded, never made a batch: dropped here, its rows pending again
    lost: list[dict[str, Any]]  # the provider no longer knows its batch: its rows are pending again

    def __bool__(self) -> bool:
        return bool(self.cancelled or self.ended or self.dropped or self.lost)


async def cancel_batches(plan: Plan) -> CancelOutcome:
    """`batch cancel`: ask the provider to cancel the job's live batches that can still be cancelled (their
    partial results are merged by the next run), and say which had ended already; a file not yet made a batch is
    dropped, its rows pending again. The caller holds the run lock."""
    ledger = Ledger(plan.locations.local_dir, plan.locations.checkpoint_store())
    stop = Stop()
    answerer = BatchAnswerer(plan, ledger, RowStates(0, None), None, None, stop, False, False,
                             lambda _record: _no_rows())
    outcome = CancelOutcome([], [], [], [])
    async with control_client(plan) as api:
        answerer._api = api

        async def retrieve(entry: BatchFile) -> Any:
            return await answerer._call("poll", lambda: api.batches.retrieve(entry.batch_id),
                                        missing=f"batch {entry.batch_id}")

        for entry in ledger.live():
            if entry.batch_id is None:
                ledger.note("merged", entry.number, status="cancelled", outcome={"returned": entry.rows})
                await answerer._clean(entry, None)
                outcome.dropped.append(describe(entry))
                continue
            try:
                batch = await retrieve(entry)
                asked = batch.status in CANCELLABLE
                if asked:
                    try:
                        batch = await answerer._call("cancel", lambda e=entry: api.batches.cancel(e.batch_id),
                                                     missing=f"batch {entry.batch_id}")
                    except ControlPlaneError:
                        batch = await retrieve(entry)  # refused: it may have ended since the poll, else it fails
                        if batch.status in CANCELLABLE:
                            raise
                        asked = False
                if asked:
                    ledger.note("cancel", entry.number)
            except Gone as gone:  # nothing left to cancel: its rows are pending for the next run
                await answerer._forget(entry, gone)
                outcome.lost.append(describe(entry))
                continue
            if batch.status != entry.status:
                ledger.note("state", entry.number, status=batch.status, counts=_counts(batch))
            (outcome.cancelled if asked else outcome.ended).append(describe(ledger.files[entry.number]))
    return outcome


async def _no_rows() -> AsyncIterator[Pending]:
    return
    yield  # an async generator that yields nothing
