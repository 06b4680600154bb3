"""The Python API: run a job, or a DataFrame, from a script or a notebook, and read where it stands.

Every run goes through the command line's pipeline (batch.preflight, then batch.runner's Run): the same
checks, checkpoint, resume, limits, budget and summary. What differs is what a library owes its caller:

- no `sys.exit`: a run returns a `RunResult`, or raises a `BatchError` (a `RunStopped` when it ended early);
- no process-wide state: no signal handler unless `handle_signals=True` (and the ones before given back after),
  none of the command line's memory settings (batch.process), the program's logging shown at the level it set
  (batch.logs.run_log); other runs in the process have their own lock and batch.log;
- a KeyboardInterrupt stops a run gracefully, as the command line's Ctrl-C does, and the next call resumes;
- the sync forms work inside a running event loop (Jupyter): the run gets a loop of its own in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import math
import os
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import ValidationError

from batch.checkpoint.answered import SUBMITTED, should_send
from batch.checkpoint.final import reply_columns
from batch.checkpoint.guard import RunLock
from batch.commands.estimate import estimate as estimate_job
from batch.commands.shards import read_shards, sharded_estimate, sharded_status
from batch.commands.status import JobReading, id_batches, job_status, read_job
from batch.config import (
    JobSpec,
    OutputSpec,
    check_job,
    describe_validation_error,
    dump_job,
    is_mapping_text,
    load_job,
)
from batch.errors import (
    EXIT_BATCHES_LIVE,
    EXIT_BUDGET,
    EXIT_INTERRUPTED,
    EXIT_JOB_FATAL,
    EXIT_OK,
    EXIT_ROWS_FAILED,
    BatchError,
    CheckpointWriteError,
    ConfigError,
    LockedError,
    option,
    python_caller,
)
from batch.logs import keep_secret, redact, run_log
from batch.plan import OutputSettings
from batch.preflight import check_output_path, check_storage_reachable, job_shards, preflight, resolve, settings_of
from batch.records import OUTPUT_FIELDS, RECORD_FIELDS, RECORD_SCHEMA
from batch.replies.columns import JSON_PREFIX
from batch.runner import Run, RunOptions
from batch.storage.atomic import write_atomic
from batch.storage.locations import object_at
from batch.summary import format_summary
from batch.wording import counted

if TYPE_CHECKING:  # pandas is imported where a DataFrame is made: the command line keeps it out of its runs
    import pandas as pd

__all__ = [
    "ApiRefusedError", "BatchError", "BatchesLive", "BudgetExceededError", "CheckpointWriteError", "ConfigError",
    "Interrupted", "Job", "JobSpec", "LockedError", "RunInterrupted", "RunResult", "RunStopped", "arun", "arun_frame",
    "estimate", "read_results", "run", "run_frame", "status",
]

T = TypeVar("T")

Job = str | os.PathLike[str] | JobSpec | Mapping[str, Any]
"""A job: its YAML file; a `JobSpec` or a mapping of the job file's keys (relative paths are relative to the
working directory); or the output `.parquet` of a `run_frame` job, whose job file sits beside it."""

FRAME_JOB_SUFFIX = ".job.yaml"  # run_frame's job file: OUTPUT_STEM.job.yaml beside the output
FRAME_INPUT_SUFFIX = ".input.parquet"  # and the frame it was given, OUTPUT_STEM.input.parquet
SPEC_LABEL = Path("<job spec>")  # what errors name for a job given as Python values
# run_frame's keyword arguments that go into the job file's output section (path, kept columns: run_frame's own)
FRAME_OUTPUT_KEYS = [key for key in OutputSpec.model_fields if key not in ("path", "keep_columns", "parse_json")]
# pandas' nullable integer dtype of each Arrow integer type: an integer column with a null read as float64 rounds
NULLABLE_INTEGERS = {getattr(pa, f"{sign}int{bits}")(): f"{sign.upper()}Int{bits}" for sign in ("", "u")
                     for bits in (8, 16, 32, 64)}
NULLABLE_INTEGER_NAMES = frozenset(NULLABLE_INTEGERS.values())
CLASH_PREFIX = "batch_"  # run_frame: a result column named like a column of the frame
MODES = get_args(JobSpec.model_fields["mode"].annotation)  # RunOptions.mode: the job file's `mode` values
WAIT_S = 0.25  # a waiting caller wakes this often, so a KeyboardInterrupt is taken even where a wait is not cut short


@dataclass(frozen=True)
class RunResult:
    """What a run did and where its job stands: the command line's summary (`str(result)`) as fields.

    Counts of rows are the job's, over every run; tokens and cost are this run's. `summary` is the whole
    summary, as saved to summary.json in the checkpoint folder (secrets masked).
    """

    job: str
    exit_code: int  # the command line's: 0 ok (or a `limit` run with rows left), 1 complete with failed rows
    rows_total: int
    ok: int
    failed: int
    pending: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    currency: str
    stopped: str | None  # why the run ended early, if it did
    output: Path | None  # the final file, written once no row is pending
    summary: dict[str, Any] = field(repr=False, compare=False)

    @property
    def complete(self) -> bool:
        """Whether every row is answered or failed (a `limit` run may leave rows pending)."""
        return self.pending == 0

    def __str__(self) -> str:
        with python_caller():
            return format_summary(self.summary)

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> RunResult:
        summary = json.loads(redact(json.dumps(summary, ensure_ascii=False)))  # `stopped` may quote a server
        run, totals = summary["run"], summary["job_totals"]
        return cls(job=summary["job"], exit_code=int(summary["exit_code"]), rows_total=summary["rows_total"],
                   ok=totals["ok"], failed=totals["failed"], pending=totals["pending"],
                   prompt_tokens=run["prompt_tokens"], completion_tokens=run["completion_tokens"], cost=run["cost"],
                   currency=run["currency"], stopped=summary["stopped"],
                   output=Path(summary["output"]) if summary["output"] else None, summary=summary)


class RunStopped(BatchError):
    """The run ended before the job was complete: every answer received is in the checkpoint, and the rows not
    answered are pending; once the cause is dealt with, the same call resumes. `result` is the run's summary."""

    def __init__(self, result: RunResult, why: str | None = None) -> None:
        super().__init__(f"job {result.job}: stopped: {why or result.stopped} (ok {result.ok}, failed {result.failed}, "
                         f"pending {result.pending}); the next call resumes")
        self.result = result
        self.exit_code = result.exit_code


class ApiRefusedError(RunStopped):
    """The API refused the whole job (a bad key, arrears, an unknown model), or the endpoint answered nothing
    for retry.max_outage_s: the command line's exit 3."""


class BudgetExceededError(RunStopped):
    """The budget is reached; pending rows wait for a raised budget: the command line's exit 5."""


class BatchesLive(RunStopped):
    """mode="batch_api" without wait=True: the rows went to the provider's Batch API, whose batches are still being
    worked on (`result.summary["batches"]`); a later call collects what they answered: the command line's exit 6."""

    def __init__(self, result: RunResult) -> None:
        batches = len(result.summary.get("batches") or [])
        with python_caller():
            super().__init__(result, f"{counted(batches, 'Batch API batch')} still being worked on at the provider: "
                                     f"call again later to collect them, or with {option('wait')} to wait for them")


class Interrupted(KeyboardInterrupt):
    """A KeyboardInterrupt (or a signal, with handle_signals=True) stopped the run gracefully: requests in flight
    finished (or, at a second one, were cut off) and their rows are answered or pending; the next call resumes.

    A KeyboardInterrupt, so that a program stops as Ctrl-C asked. `result` is the run's summary, or None
    when the run was stopped before it began (nothing was written). `run` and `run_frame` raise it; the async
    functions raise `RunInterrupted`.
    """

    exit_code = EXIT_INTERRUPTED

    def __init__(self, result: RunResult | None) -> None:
        done = (f"ok {result.ok}, failed {result.failed}, pending {result.pending}; " if result is not None
                else "before it began; ")
        super().__init__(f"the run was interrupted ({done}the next call resumes)")
        self.result = result


# -- running a job ------------------------------------------------------------------------------------------------

class RunInterrupted(RunStopped):
    """`arun` or `arun_frame` stopped gracefully by SIGINT or SIGTERM (handle_signals=True): what `Interrupted` is to
    `run`, as an Exception, since asyncio carries a KeyboardInterrupt raised in a task out of its event loop, past
    every `except` of the program (its `asyncio.run` would end in a traceback). The command line's exit 130."""


def run(job: Job, *, api_key: str | None = None, retry_failed: bool = False, force: bool = False,
        limit: int | None = None, mode: str | None = None, wait: bool = False, progress: bool = True,
        progress_interval: float = 5.0,
        handle_signals: bool = False) -> RunResult:
    """Run (or resume) a job to its end, as `python -m batch run` does, and return its summary.

    Args:
        job: the job file, a `JobSpec` or mapping of its keys, or a `run_frame` output (see `Job`).
        api_key: the API key, instead of the job's environment variable or .env; masked everywhere like that one.
        retry_failed: send again the failed rows whose error may have gone away (`--retry-failed`).
        force: resume a checkpoint made with another model, params, prompt or input (`--force`).
        limit: send at most this many pending rows (`--limit`).
        mode: "online" or "batch_api": how the rows are sent this run (`--mode`; default: the job's `mode`).
        wait: with the Batch API, poll until the provider has answered every batch (`--wait`); without it, a run
            that leaves batches at the provider raises `BatchesLive`, and a later call collects them.
        progress: show progress: a bar on a terminal and in a notebook (a widget with ipywidgets installed, else
            text); where the output is a file or a pipe, the command line's progress log line every
            `progress_interval` seconds (`--progress-interval`). False: none.
        handle_signals: stop gracefully on SIGINT and SIGTERM as the command line does, with process-wide handlers
            (only from the main thread with no loop running; elsewhere Ctrl-C is taken as a KeyboardInterrupt).

    Returns the run's `RunResult` when the job is complete (`exit_code` 1: some rows failed) or `limit` rows
    were sent. Raises `ConfigError` (bad job, input or key: nothing sent), `LockedError` (another run of the job
    is alive), `ApiRefusedError`, `BudgetExceededError` or `BatchesLive` (the run stopped early),
    `CheckpointWriteError` (the checkpoint cannot be written), or `Interrupted` after a KeyboardInterrupt. Works
    inside a running event loop: the run then has a loop of its own in a worker thread.
    """
    return _run(job, _options(retry_failed, force, limit, mode, wait, progress, progress_interval, handle_signals),
                api_key)


async def arun(job: Job, *, api_key: str | None = None, retry_failed: bool = False, force: bool = False,
               limit: int | None = None, mode: str | None = None, wait: bool = False, progress: bool = True,
               progress_interval: float = 5.0,
               handle_signals: bool = False) -> RunResult:
    """`run` on the running event loop: the same arguments, result and errors.

    Cancelling the awaiting task stops the run gracefully (a second cancellation at once) before the
    CancelledError goes on; the next call resumes. handle_signals=True works where the loop runs in the
    main thread: a signal stops the run as Ctrl-C stops `run`, and raises `RunInterrupted` (an Exception, not the
    KeyboardInterrupt `Interrupted`: the call may be awaited in a task of its own).
    """
    return await _arun(job, _options(retry_failed, force, limit, mode, wait, progress, progress_interval,
                                     handle_signals), api_key)


def run_frame(frame: pd.DataFrame, *, template: str, model: str | Mapping[str, Any], output: str | os.PathLike[str],
              system: str | None = None, id_column: str | None = None, parse_json: bool = False,
              name: str | None = None, api_key: str | None = None, retry_failed: bool = False, force: bool = False,
              limit: int | None = None, mode: str | None = None, wait: bool = False, progress: bool = True,
              progress_interval: float = 5.0,
              handle_signals: bool = False, **settings: Any) -> pd.DataFrame:
    """Run `template` over every row of `frame`, and return the frame with the answers' columns beside it.

    The frame is written once to OUTPUT_STEM.input.parquet beside `output`, with the job file
    OUTPUT_STEM.job.yaml (the command line and `status`, `estimate`, `read_results` take it, or `output`): the
    same call again resumes, and sends nothing once the job is complete. A frame that changed is written again:
    rows whose prompt values changed are sent again, as when a job's input file is edited.

    Args:
        frame: the rows; its index identifies them (unique), unless `id_column` names a column that does: the ids
            are the labels as text, the blanks around them trimmed (see _row_ids).
        template: the user message, with `{column}` placeholders (the job file's prompt.template).
        model: the model's name (provider zhipu), or the job file's model section as a mapping
            (`{"provider": "openai", "name": ..., "base_url": ..., "params": {...}}`).
        output: the final Parquet file; its checkpoint folder OUTPUT_STEM.checkpoint goes beside it.
        system: a system message (prompt.system).
        parse_json: the reply is a JSON object: its keys become columns (output.parse_json).
        name: the job's name (default: the output's stem).
        settings: the job file's other sections as mappings (`limits`, `retry`, `pricing`, `budget`, `cache`,
            `batch_api`), and the keys of its output section other than its path (`json_schema`, a mapping or a
            .json file; `json_columns`, `schema_via`, `json_attempts`, `checkpoint_rows`, `checkpoint_seconds`).
        api_key, retry_failed, force, limit, mode, wait, progress, progress_interval, handle_signals: as for `run`.

    Returns `frame` (same index and columns) with the output's columns after it: `status`, `response`, tokens,
    cost, `error_class`, `error`, ... and the reply's keys (a name the frame already has gets the prefix
    "batch_"); a row still pending (after a `limit` run) has status "pending". `.attrs["batch_summary"]` is the
    run's summary (plain JSON values, as in summary.json: `to_parquet` keeps it); `RunResult.from_summary` makes
    it a `RunResult`. Raises as `run`.
    """
    options = _options(retry_failed, force, limit, mode, wait, progress, progress_interval, handle_signals)
    with _python_errors():
        job_file, ids, lock = _frame_job(frame, template, model, output, system, id_column, parse_json, name, settings)
    try:
        result = _run(job_file, options, api_key, lock)
        return _beside(frame, ids, read_results(job_file), result)
    finally:
        lock.release()


async def arun_frame(frame: pd.DataFrame, *, template: str, model: str | Mapping[str, Any],
                     output: str | os.PathLike[str], system: str | None = None, id_column: str | None = None,
                     parse_json: bool = False, name: str | None = None, api_key: str | None = None,
                     retry_failed: bool = False, force: bool = False, limit: int | None = None,
                     mode: str | None = None, wait: bool = False, progress: bool = True,
                     progress_interval: float = 5.0, handle_signals: bool = False,
                     **settings: Any) -> pd.DataFrame:
    """`run_frame` on the running event loop: the same arguments, result and errors (cancelling: as `arun`)."""
    options = _options(retry_failed, force, limit, mode, wait, progress, progress_interval, handle_signals)
    with _python_errors():  # to_thread takes this context along
        job_file, ids, lock = await asyncio.to_thread(_frame_job, frame, template, model, output, system,
                                                      id_column, parse_json, name, settings)
    try:
        result = await _arun(job_file, options, api_key, lock)
        return _beside(frame, ids, await asyncio.to_thread(read_results, job_file), result)
    finally:
        lock.release()


# -- reading a job ------------------------------------------------------------------------------------------------

def read_results(job: Job) -> pd.DataFrame:
    """The job's final table: every input row in input order, its id, its kept columns and its answer's columns.

    Before the job is complete (or while a run is alive), the answers so far, in the same columns: a row not
    answered yet, or whose prompt values changed since, has status "pending" and no answer. A job split into shards
    reads the output `batch merge` wrote once every shard has finished and it is merged from their records as they
    are now; before that, each row as its shard's checkpoint holds it. Sends nothing and writes nothing.
    """
    with _python_errors():
        spec = _spec_of(job)
        check_storage_reachable(spec)
        settings = settings_of(spec)
        parts = job_shards(spec)
        if parts is not None:  # split into shards: the merged output, or each row's state in its shard's checkpoint
            shards = read_shards(settings, parts)
            if not shards.merged_is_current:
                return _answers_so_far(settings.output, settings.schema, shards.readings, shards.input_order(settings))
        else:
            job_now = read_job(settings)
            if not job_now.final_is_current:
                return _answers_so_far(settings.output, settings.schema, [job_now])
        store, key = object_at(settings.locations.output)
        with store.open_read(key) as stream:
            return _frame_of(pq.read_table(stream))


def status(job: Job) -> dict[str, Any]:
    """Rows ok, failed and pending, tokens and cost so far, the last run, whether one is alive: `batch status
    --json`'s object. Sends nothing and writes nothing."""
    with _python_errors():
        spec = _spec_of(job)
        parts = job_shards(spec)
        return job_status(settings_of(spec)) if parts is None else sharded_status(settings_of(spec), parts)


def estimate(job: Job, retry_failed: bool = False) -> dict[str, Any]:
    """The rows, tokens and cost still to come: `batch estimate --json`'s object. Sends nothing and writes nothing."""
    with _python_errors():
        spec = _spec_of(job)
        settings, parts = resolve(spec), job_shards(spec)
        if parts is not None:
            return sharded_estimate(settings, parts, retry_failed)
        return estimate_job(settings, retry_failed)


def _run(job: Job, options: RunOptions, api_key: str | None, lock: RunLock | None = None) -> RunResult:
    """`run`, with the job's run lock if the caller holds it already (`run_frame`, from before it wrote the input)."""
    result, interrupted = _in_own_loop(lambda control: _execute(job, options, api_key, control, lock), options.signals)
    if interrupted and (result is None or result.exit_code != EXIT_INTERRUPTED):
        raise Interrupted(result)  # the run ended before the KeyboardInterrupt reached it: the program stops still
    return _outcome(result)


async def _arun(job: Job, options: RunOptions, api_key: str | None, lock: RunLock | None = None) -> RunResult:
    """`arun`, with the job's run lock as for `_run`."""
    control = _Interrupter()
    return _outcome(await _until_done(_execute(job, options, api_key, control, lock), control), RunInterrupted)


# -- the run's loop, and interrupting it -----------------------------------------------------------------------------

class _Interrupter:
    """How a KeyboardInterrupt in the caller's thread, or a cancelled task, stops a run on its loop."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.run: Run | None = None
        self.context: contextvars.Context | None = None  # the run's, where it is stopped from another thread
        self.asked = 0  # interrupts taken on the loop (or before it ran): a run not begun yet does not begin

    def interrupt(self, name: str) -> None:
        """From any thread: the first call stops the run gracefully, a second one at once."""
        if self.loop is None:
            self.asked += 1
            return
        try:
            self.loop.call_soon_threadsafe(self._on_loop, name, context=self.context)
        except RuntimeError:  # the loop has closed: the run is over
            pass

    def _on_loop(self, name: str) -> None:
        self.asked += 1
        if self.run is not None:
            self.run.interrupt(name)


async def _execute(job: Job, options: RunOptions, api_key: str | None, control: _Interrupter,
                   lock: RunLock | None) -> RunResult | None:
    """The command line's run: preflight, then Run (under `lock`, if given); None when interrupted before the run
    began."""
    control.loop = asyncio.get_running_loop()
    with _python_errors():
        if api_key:
            keep_secret(api_key)  # before the preflight, whose errors may quote the environment
        spec = _spec_of(job)
        # The preflight scans the input: off the loop.
        plan = await asyncio.to_thread(preflight, spec, options.force, api_key, options.mode)
        if control.asked:
            return None
        keep_secret(plan.api_key)
        with run_log(plan.locations.local_dir):
            run = control.run = Run(plan, options, lock)
            control.context = contextvars.copy_context()  # the run's: its log lines go to its batch.log
            return RunResult.from_summary(await run.execute())


def _in_own_loop(work: Callable[[_Interrupter], Coroutine[Any, Any, T]], signals: bool) -> tuple[T, bool]:
    """`work` on an event loop of its own, and whether a KeyboardInterrupt came meanwhile (it stopped the work).

    The loop runs in a worker thread, which works whether or not the caller's thread runs a loop, and keeps
    the KeyboardInterrupt in the caller's thread, where it cannot cut the run's own code short. With `signals`,
    in the main thread with no loop running, the loop runs here and the run's handlers take the signals.
    """
    control = _Interrupter()
    if signals and threading.current_thread() is threading.main_thread() and not _loop_running():
        return asyncio.run(work(control)), False
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def worker() -> None:
        try:
            outcome["value"] = asyncio.run(work(control))
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=worker, name="batch-run")
    thread.start()
    taken = passed_on = 0
    # An Event, not Thread.join: a join cut short by KeyboardInterrupt takes the thread for ended (bpo-45274).
    while not done.is_set():
        try:
            if passed_on < taken:
                passed_on += 1
                control.interrupt("KeyboardInterrupt")
            done.wait(WAIT_S)
        except KeyboardInterrupt:
            taken += 1
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"], taken > 0


async def _until_done(work: Coroutine[Any, Any, T], control: _Interrupter) -> T:
    """Await `work`; a cancellation of the awaiting task stops it as an interrupt does, and is raised once it ended."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            value = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            control.interrupt("cancellation")
    if cancelled:
        raise asyncio.CancelledError
    return value


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _options(retry_failed: bool, force: bool, limit: int | None, mode: str | None, wait: bool, progress: bool,
             progress_interval: float, handle_signals: bool) -> RunOptions:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ConfigError(f"limit must be a whole number, 0 or more, not {limit!r}")
    if mode not in (None, *MODES):
        raise ConfigError(f"mode is {' or '.join(map(repr, MODES))}, not {mode!r}")
    if (not isinstance(progress_interval, int | float) or isinstance(progress_interval, bool)
            or not 0 <= progress_interval < math.inf):
        raise ConfigError(f"progress_interval is seconds, 0 or more, not {progress_interval!r}")
    return RunOptions(retry_failed=retry_failed, force=force, limit=limit, progress=progress,
                      progress_interval_s=float(progress_interval), signals=handle_signals, mode=mode, wait=wait)


def _outcome(result: RunResult | None, interrupted: type[Interrupted | RunInterrupted] = Interrupted) -> RunResult:
    """The result of a run that went to its end; the exception for one that stopped early (`interrupted`: for one a
    signal stopped)."""
    if result is None:
        raise Interrupted(None)
    if result.exit_code in (EXIT_OK, EXIT_ROWS_FAILED):
        return result
    if result.exit_code == EXIT_INTERRUPTED:
        raise interrupted(result)
    stopped = {EXIT_JOB_FATAL: ApiRefusedError, EXIT_BUDGET: BudgetExceededError,
               EXIT_BATCHES_LIVE: BatchesLive}.get(result.exit_code, RunStopped)
    raise stopped(result)


@contextmanager
def _python_errors() -> Iterator[None]:
    """A BatchError's message as a Python caller reads it: the secrets masked, as the command line prints it, and
    run options named as keyword arguments (`force=True`, not `--force`)."""
    try:
        with python_caller():
            yield
    except BatchError as exc:
        exc.args = (redact(str(exc)),)
        raise


# -- jobs given as Python values, and run_frame's job ---------------------------------------------------------------

def _spec_of(job: Job) -> JobSpec:
    if isinstance(job, JobSpec):
        spec = job.model_copy(deep=True)
        if spec.job_path == Path("."):  # built in Python, not by load_job
            spec.job_path = SPEC_LABEL
        check_job(spec)
        return spec
    if isinstance(job, Mapping):
        return _spec_from(dict(job), SPEC_LABEL)
    if not isinstance(job, str | os.PathLike):
        raise ConfigError(f"a job is its job file's path, a JobSpec or a mapping of its keys, not "
                          f"{type(job).__name__}" + (" (for a DataFrame, call run_frame)"
                                                     if type(job).__name__ == "DataFrame" else ""))
    path = Path(job)
    if path.suffix.lower() == ".parquet":
        job_file = path.with_name(path.stem + FRAME_JOB_SUFFIX)
        if not job_file.is_file():
            raise ConfigError(f"{path}: no job file {job_file.name} beside it, which run_frame writes: "
                              "pass the job file of a job of your own")
        path = job_file
    return load_job(path)


def _spec_from(values: dict[str, Any], label: Path) -> JobSpec:
    try:
        spec = JobSpec.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, label, {})) from None
    spec.job_path = label
    check_job(spec)
    return spec


def _frame_job(frame: pd.DataFrame, template: str, model: str | Mapping[str, Any], output: str | os.PathLike[str],
               system: str | None, id_column: str | None, parse_json: bool, name: str | None,
               settings: dict[str, Any]) -> tuple[Path, list[str], RunLock]:
    """Write run_frame's input and job file beside `output` (each only when it changed); returns the job file, the
    frame's row ids, in order, and the job's run lock, taken before the files are written: a run of the job alive
    (in this process or another) is a LockedError, not a frame written under it. Everything is checked first."""
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        raise ConfigError(f"run_frame takes a pandas DataFrame, not {type(frame).__name__}")
    if not isinstance(output, str | os.PathLike):
        raise ConfigError(f"run_frame: output is the final Parquet file's path, not {type(output).__name__}")
    if not isinstance(model, str | Mapping):
        raise ConfigError(f"run_frame: model is the model's name or a mapping of the job file's model section, "
                          f"not {type(model).__name__}")
    if "://" in str(output):  # a URL: Path() would make s3://b/o.parquet a local folder "s3:" holding "b"
        raise ConfigError(f"run_frame: output {output} is a URL, and run_frame writes the frame and its job file "
                          "beside a local output: for a job on object storage, write its job file (input and "
                          "output URLs, output.local_dir) and call batch.run")
    out = Path(output).expanduser()
    job_file = out.with_name(out.stem + FRAME_JOB_SUFFIX)
    input_path = out.with_name(out.stem + FRAME_INPUT_SUFFIX)
    given = sorted(set(settings) & {"input", "prompt", "model", "output"})
    if given:
        raise ConfigError(f"run_frame: {', '.join(given)} is set by run_frame's own arguments "
                          "(frame, template, system, model, output, id_column, parse_json)")
    rows, id_out, ids = _frame_rows(frame, id_column)
    section = {"name": model} if isinstance(model, str) else dict(model)
    if isinstance(settings.get("cache"), Mapping) and "path" in settings["cache"]:  # relative to here, not the file
        settings = {**settings, "cache": {**settings["cache"], "path": str(Path(settings["cache"]["path"]).resolve())}}
    output_keys = {key: settings.pop(key) for key in FRAME_OUTPUT_KEYS if key in settings}
    if isinstance(output_keys.get("json_schema"), str) and is_mapping_text(output_keys["json_schema"]):
        raise ConfigError("run_frame: json_schema= is a schema written as text in a string, and a string is a .json "
                          "file's path: pass the schema as a mapping (json.loads(text)), or the path of a .json file")
    if isinstance(output_keys.get("json_schema"), str | os.PathLike):  # a file: relative to here, as cache.path
        output_keys["json_schema"] = str(Path(output_keys["json_schema"]).expanduser().resolve())
    keep = [c for c in rows.columns if c != id_out and c not in RECORD_FIELDS]
    values = {
        "name": name or out.stem,
        "input": {"path": input_path.name, "id_column": id_out},
        "prompt": {"template": template, **({"system": system} if system is not None else {})},
        "model": section,
        "output": {"path": out.name, "keep_columns": keep, **({"parse_json": True} if parse_json else {}),
                   **output_keys},
        **settings,
    }
    placed = {**values, "input": {**values["input"], "path": str(input_path)},
              "output": {**values["output"], "path": str(out)}}
    spec = _spec_from(placed, job_file)
    resolved = resolve(spec)
    builder = resolved.builder
    missing = [c for c in builder.columns if c not in rows.columns]
    if missing:
        raise ConfigError(f"run_frame: the template names column '{missing[0]}', which the frame does not have "
                          f"(columns: {', '.join(map(str, frame.columns))})")
    check_output_path(spec)
    try:
        text = dump_job(values)
    except yaml.YAMLError as exc:
        raise ConfigError(f"run_frame: a setting cannot be written to the job file: {exc}") from None
    data = _parquet_bytes(rows)
    lock = RunLock(resolved.locations.local_dir)
    try:
        lock.acquire()
        _write_if_changed(input_path, data)
        _write_if_changed(job_file, text.encode("utf-8"))
    except BaseException as exc:  # a KeyboardInterrupt midway too: the next call must find the job free
        lock.release()
        if isinstance(exc, OSError):
            raise ConfigError(f"{out.parent}: cannot write run_frame's input and job file: "
                              f"{exc.strerror or exc}") from None
        raise
    return job_file, ids, lock


def _frame_rows(frame: pd.DataFrame, id_column: str | None) -> tuple[pd.DataFrame, str, list[str]]:
    """The frame as run_frame's input, the name of its id column and the ids.

    The ids (the index's labels, or `id_column`'s values, as text: see _row_ids) go first, in a column named like
    the index (or `index`, or like id_column), with CLASH_PREFIX before it until the name is free of the frame's
    other columns and of the output's own (`status`, `cost`, ...): the final file has room for the ids and
    every answer column, and the frame returned keeps its index and columns as they were."""
    if any(not isinstance(c, str) for c in frame.columns):
        raise ConfigError("run_frame: the frame's column names must be text (Parquet's are); rename "
                          f"{next(c for c in frame.columns if not isinstance(c, str))!r}")
    if id_column is not None:
        if id_column not in frame.columns:
            raise ConfigError(f"run_frame: id_column '{id_column}' is not a column of the frame "
                              f"(columns: {', '.join(frame.columns)})")
        ids = _row_ids(frame[id_column], f"id_column '{id_column}'", "ids must be unique")
        rows, id_out = frame.drop(columns=id_column), id_column
    else:
        if frame.index.nlevels > 1:  # an id is one label; which join of the levels is up to the caller
            raise ConfigError(f"run_frame: the frame's index has {counted(frame.index.nlevels, 'level')} (a "
                              "MultiIndex), and a row's id is one label: pass id_column= (a column of unique ids), or "
                              "join the levels into one index first")
        ids = _row_ids(frame.index, "the frame's index", "and the index identifies the rows: reset_index(drop=True), "
                                                          "or pass id_column= (a column of unique ids)")
        named = frame.index.name
        rows, id_out = frame.reset_index(drop=True), named if isinstance(named, str) and named else "index"
    id_out = _free_name(id_out, {*rows.columns, *OUTPUT_FIELDS})
    rows.insert(0, id_out, ids)
    return rows, id_out, ids


def _free_name(name: str, taken: set[str]) -> str:
    """`name`, with CLASH_PREFIX before it as often as it takes to be none of `taken`."""
    while name in taken:
        name = CLASH_PREFIX + name
    return name


def _row_ids(labels: pd.Index | pd.Series, what: str, hint: str) -> list[str]:
    """Each row's id: its label as text, the blanks around it trimmed, as the reader trims every id. A missing or
    blank label, or two labels that are one id once trimmed ('k1 ' and 'k1'), is an error naming them: a row would
    be lost, or answered for another."""
    import pandas as pd

    values = pd.Series(labels, dtype=object).reset_index(drop=True)
    texts = values.astype(str).str.strip()
    blank = values.isna() | (texts == "")
    if blank.any():
        at = int(blank.idxmax())
        raise ConfigError(f"run_frame: {what} has no id at row {at + 1} ({values[at]!r}): every row needs one, "
                          f"{hint}")
    repeated = texts.duplicated()
    if repeated.any():
        first, second = values[texts == texts[int(repeated.idxmax())]].iloc[:2]
        twice = (f"'{first}' more than once" if str(first) == str(second) else
                 f"{first!r} and {second!r}, one id once the blanks around them are trimmed (as batch trims every id)")
        raise ConfigError(f"run_frame: {what} holds {twice}, {hint}")
    return texts.tolist()


def _parquet_bytes(rows: pd.DataFrame) -> bytes:
    try:
        table = pa.Table.from_pandas(rows, preserve_index=False)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise ConfigError(f"run_frame: the frame cannot be written as Parquet: {exc}") from None
    return sink.getvalue().to_pybytes()


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write `path` only when its bytes differ: an input left as it was keeps the final file current."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def _beside(frame: pd.DataFrame, ids: list[str], results: pd.DataFrame, result: RunResult) -> pd.DataFrame:
    """`frame` with the answers' columns of `results` (run_frame's final table, in the frame's row order).

    A column named like one of the frame's, or like an answer column named before it, gets CLASH_PREFIX (as often as
    it takes). The final file names a reply key that clashes with one of its columns JSON_PREFIX + key
    (batch.replies): a key named like a kept column of the frame is named here by the key, as the frame's other
    clashes are.
    """
    import pandas as pd

    id_out = results.columns[0]
    if results[id_out].astype(str).tolist() != ids:  # written from this frame, in its order: a defect otherwise
        raise RuntimeError("run_frame: the results' rows are not the frame's rows; please report this")
    kept = {c for c in frame.columns if c not in RECORD_FIELDS and c != id_out}  # the frame's own, in the output too
    answers = results[[c for c in results.columns if c not in kept and c != id_out]]
    taken = set(frame.columns)  # and each answer column's name once given: every column of the result has its own
    names = {}
    for column in answers.columns:
        key = column.removeprefix(JSON_PREFIX)
        names[column] = name = _free_name(key if key in kept else column, taken)
        taken.add(name)
    answers = answers.rename(columns=names)
    answers.index = frame.index
    joined = pd.concat([frame, answers], axis=1)
    joined.attrs["batch_summary"] = result.summary  # plain JSON values: pandas writes attrs into Parquet as JSON
    return joined


def _frame_of(table: pa.Table, nulls_to_come: bool = False) -> pd.DataFrame:
    """`table` as a DataFrame, as pandas reads it (pd.read_parquet) but for an integer column holding a null: that
    one is pandas' nullable integer (Int64, ...), not float64, which would round every integer beyond 2**53 (a reply
    key missing from some rows). `nulls_to_come`: every integer column stays nullable, for a caller that blanks rows
    (pending ones) and then calls `_whole_integers_as_numpy`."""
    import pandas as pd

    frame = table.to_pandas(types_mapper=lambda type_: pd.api.types.pandas_dtype(NULLABLE_INTEGERS[type_])
                            if type_ in NULLABLE_INTEGERS else None)
    if not nulls_to_come:
        _whole_integers_as_numpy(frame)
    return frame


def _whole_integers_as_numpy(frame: pd.DataFrame) -> None:
    """A nullable integer column with no null as numpy's integers, as pandas reads such a column."""
    for name in frame.columns:
        dtype = frame[name].dtype
        if str(dtype) in NULLABLE_INTEGER_NAMES and not frame[name].hasnans:
            frame[name] = frame[name].astype(dtype.numpy_dtype)


def _answers_so_far(output: OutputSettings, schema: dict[str, Any] | None, readings: list[JobReading],
                    order: np.ndarray | None = None) -> pd.DataFrame:
    """The final table's columns from the checkpoint as it is (a live run's log included): each row's last record,
    or "pending"; `schema`: output.json_schema as read. `readings`: the job's checkpoint, or each of its shards'
    (read_shards), whose rows, one shard after another, `order` puts in input order."""
    import pandas as pd

    id_out, keep = output.id_column, list(output.keep_columns)
    pieces, pending, batched, lasts = [], [], [], []
    for reading in readings:
        states = reading.states
        sends = np.array([should_send(states.name(code), False) for code in range(len(states.names) + 1)])
        in_batch = np.array([states.name(code) == SUBMITTED for code in range(len(states.names) + 1)])
        start = 0
        for batch, ids in reading.table.id_batches(keep):
            codes = states.last(start, ids)[0]
            pending.append(sends[codes])
            batched.append(in_batch[codes])
            pieces.append(pa.table({id_out: ids, **{c: batch.column(c) for c in keep if c != id_out}}))
            start += len(ids)
        checkpoint = reading.checkpoint
        lasts.extend(checkpoint.kept_records(states, id_batches(reading.table), ["id", *OUTPUT_FIELDS],
                                             checkpoint.has_records()))

    def in_order(values: Any) -> Any:  # a table or an array of the readings' rows, in input order
        return values if order is None else values.take(order)

    rows = (_frame_of(in_order(pa.concat_tables(pieces, promote_options="permissive"))) if pieces
            else pd.DataFrame(columns=[id_out, *keep]))
    waiting = pd.Series(in_order(np.concatenate(pending)) if pending else np.zeros(0, bool), index=rows.index)
    submitted = pd.Series(in_order(np.concatenate(batched)) if batched else np.zeros(0, bool), index=rows.index)
    waiting |= submitted  # no answer shown for a row sitting in a live Batch API batch either
    last = pa.concat_tables([*lasts, RECORD_SCHEMA.empty_table().select(["id", *OUTPUT_FIELDS])])
    answers = _frame_of(last, nulls_to_come=True).set_index("id").reindex(rows[id_out].tolist())
    answers.index = rows.index
    parts = [rows, answers]
    replies = reply_columns(output, schema, [last.select(["status", "response"])])
    if replies is not None:
        aligned = pa.Table.from_pandas(answers[["status", "response"]], preserve_index=False)
        columns = dict(replies.columns(aligned))  # none: a table of no columns has no rows either
        parts.append(_frame_of(pa.table(columns), nulls_to_come=True).set_axis(rows.index) if columns
                     else pd.DataFrame(index=rows.index))
    for part in parts[1:]:  # a pending row's answer blank: its integers null, never turned to float64
        for column in part.columns:
            part[column] = part[column].mask(waiting)
        _whole_integers_as_numpy(part)
    answers["status"] = answers["status"].mask(waiting, "pending").mask(submitted, "in_batch")
    return pd.concat(parts, axis=1)
