"""`python -m batch run job.yaml`: the command line, exit codes, and one-line errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

from batch.commands.estimate import estimate, format_estimate
from batch.commands.export import export_output
from batch.commands.shards import (
    format_merge,
    format_sharded_estimate,
    format_sharded_status,
    merge_shards,
    sharded_estimate,
    sharded_status,
)
from batch.commands.status import format_status, job_status
from batch.config import load_job
from batch.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, BatchError, ConfigError
from batch.interrupts import taken_early
from batch.logs import LOG_NAME, redact, redact_everywhere, run_log, setup_logging, write_traceback
from batch.preflight import (
    ShardAsk,
    check_storage_reachable,
    job_shards,
    preflight,
    resolve,
    settings_of,
    shard_spec,
    validation_report,
)
from batch.process import command_line_process, readers_may_leave
from batch.runner import RunOptions, run_job
from batch.shard import MOST_SHARDS
from batch.summary import format_summary
from batch.wording import counted, job_named

log = logging.getLogger("batch")


# Every command's first argument. Paths in the job file are relative to it.
JOB_HELP = "the job file (YAML); paths in it are relative to its folder"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batch", description="Run an LLM job over a table, checkpointed to Parquet.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) a job")
    retry = commands.add_parser("retry-failed", help="the same as run --retry-failed")
    for command in (run, retry):
        command.add_argument("job", help=JOB_HELP)
        command.add_argument("--retry-failed", action="store_true", default=command is retry,
                             help="send again failed rows whose error may have gone away")
        command.add_argument("--force", action="store_true",
                             help="resume even if model, params, prompt or input changed since the checkpoint")
        command.add_argument("--limit", type=int, metavar="N", help="send at most N pending rows (try a job cheaply)")
        command.add_argument("--mode", choices=["online", "batch_api"],
                             help="send rows one request each (online) or through the provider's Batch API "
                                  "(default: the job file's mode)")
        command.add_argument("--wait", action="store_true",
                             help="batch_api: poll until every batch is done instead of exiting 6 while some run")
        command.add_argument("--progress-interval", type=_seconds, default=5.0, metavar="S",
                             help="seconds between progress lines when not on a terminal (default 5)")
        command.add_argument("--log-format", choices=["text", "json"], default="text",
                             help="json: one JSON object per log line, for log shippers")
        command.add_argument("-v", "--verbose", action="store_true",
                             help="also log every failed attempt and its retry, every row that fails, every probe "
                                  "of an endpoint that is down and every throttle (429) as a DEBUG line, and what "
                                  "other libraries log (WARNING and up), one line each")
    export = commands.add_parser("export", help="write the final table as CSV, JSONL or Parquet")
    export.add_argument("job", help=JOB_HELP)
    export.add_argument("--format", choices=["csv", "jsonl", "parquet"], required=True, help="the file's format")
    export.add_argument("--to", required=True, metavar="PATH",
                        help="the file to write: a local path, or a URL of a store batch writes to (s3://...)")
    status = commands.add_parser("status", help="rows done / failed / pending, tokens, cost, whether a run is alive "
                                                "(of each shard, for a job split into shards)")
    status.add_argument("job", help=JOB_HELP)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    estimate_cmd = commands.add_parser("estimate", help="rows, tokens and cost still to come; sends nothing")
    estimate_cmd.add_argument("job", help=JOB_HELP)
    estimate_cmd.add_argument("--retry-failed", action="store_true", help="count failed rows a retry would send")
    estimate_cmd.add_argument("--json", action="store_true", help="print the estimate as JSON")
    cancel = commands.add_parser("cancel", help="cancel the job's live Batch API batches (the next run keeps their "
                                                "partial results)")
    cancel.add_argument("job", help=JOB_HELP)
    validate = commands.add_parser("validate", help="check the job file, input and API key without sending anything")
    validate.add_argument("job", help=JOB_HELP)
    merge = commands.add_parser("merge", help="write the output of a job split into shards from every shard's records")
    merge.add_argument("job", help=JOB_HELP)
    merge.add_argument("--shards", type=_count, metavar="N", help="the number of shards (default: the job file's "
                                                                  "shards:, or the shard folders in its checkpoint)")
    merge.add_argument("--partial", action="store_true",
                       help="write what the shards hold now, though some have not finished")
    for command in (run, retry, status, estimate_cmd, export, cancel, validate):
        command.add_argument("--shard", metavar="K/N", help="run (or read) shard K of N: the rows whose id's CRC-32 "
                                                           "modulo N is K, in a checkpoint folder of their own")
        command.add_argument("--shards", type=_count, metavar="N",
                             help="split the job into N shards; this process's shard is JOB_COMPLETION_INDEX "
                                  "(Kubernetes Indexed Jobs) or SLURM_ARRAY_TASK_ID (default: the job file's shards:)")
    commands.add_parser("simulate", help="start the local OpenAI-compatible simulator (see --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with readers_may_leave():
        try:
            return command(argv)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (batch/__main__.py), before a run's own handlers took over
            print("batch: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


def command(argv: list[str]) -> int:
    """The command `argv` asks for, its user's mistakes and batch's defects each told in one line."""
    if argv[:1] == ["simulate"]:
        from batch.simulator import main as simulate

        return simulate(argv[1:])
    args = build_parser().parse_args(argv)
    log_format = getattr(args, "log_format", "text")
    setup_logging(getattr(args, "verbose", False), log_format)
    try:
        if args.command in ("run", "retry-failed"):
            return run(args)
        if args.command == "cancel":
            return cancel(args)
        print(inspect(args))
        return 0
    except BatchError as exc:
        print(f"batch: error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a defect in batch, not a mistake of the user's: not 1, which means "rows failed"
        print(report_internal_error(exc, log_folder(args), log_format), file=sys.stderr)
        return EXIT_INTERNAL


def log_folder(args: argparse.Namespace) -> Path | None:
    """The folder of the batch.log the command's run writes its lines to (run_log): the job's local folder, or, for
    one shard (--shard, or --shards with the index from the environment), that shard's own; None when the job file
    itself cannot be read."""
    try:
        return shard_spec(load_job(args.job), shard_ask(args, need_index=False)).local_dir
    except Exception:  # the error being reported may be this one: it is reported once, where it happened
        return None


def report_internal_error(exc: Exception, checkpoint_dir: Path | None, log_format: str = "text") -> str:
    """One line naming what failed and where; the traceback goes to batch.log (or a file of its own)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [frame for frame in frames if Path(frame.filename).parent == Path(__file__).parent] or frames
    where = f" in {Path(ours[-1].filename).name}:{ours[-1].lineno} ({ours[-1].name})" if ours else ""
    what = redact(f"{type(exc).__name__}{where}: {exc}")
    line = f"batch: internal error: {what}"
    try:
        if checkpoint_dir is not None and checkpoint_dir.is_dir():
            path = checkpoint_dir / LOG_NAME
        else:
            fd, name = tempfile.mkstemp(prefix="batch-internal-error-", suffix=".log")
            os.close(fd)
            path = Path(name)
        write_traceback(path, exc, line, "json" if log_format == "json" else "text")
    except OSError as why:
        return f"{line} (its traceback could not be written: {why.strerror or why})"
    return f"{line} (the traceback is in {path}); please report it"


def shard_ask(args: argparse.Namespace, need_index: bool = True) -> ShardAsk:
    """What the command line and the environment say of shards (`need_index`: a count with no index is a mistake)."""
    return ShardAsk(getattr(args, "shard", None), getattr(args, "shards", None), os.environ, need_index)


def inspect(args: argparse.Namespace) -> str:
    """The commands that send nothing: validate, estimate, status, merge, export."""
    if args.command == "validate":
        return validation_report(preflight(args.job, shard=shard_ask(args, need_index=False)))
    spec = load_job(args.job)
    check_storage_reachable(spec)
    if args.command == "merge":
        whole = settings_of(spec)
        return format_merge(merge_shards(whole, job_shards(spec, args.shards), args.partial))
    spec = shard_spec(spec, shard_ask(args, need_index=False))
    if args.command == "estimate":
        settings = resolve(spec)
        parts = job_shards(spec, args.shards)
        if parts is not None:
            found = sharded_estimate(settings, parts, args.retry_failed)
            return json.dumps(found, ensure_ascii=False, indent=2) if args.json else format_sharded_estimate(found)
        found = estimate(settings, args.retry_failed)
        return json.dumps(found, ensure_ascii=False, indent=2) if args.json else format_estimate(found)
    if args.command == "status":
        settings = settings_of(spec)
        parts = job_shards(spec, args.shards)
        if parts is not None:
            state = sharded_status(settings, parts)
            return json.dumps(state, ensure_ascii=False, indent=2) if args.json else format_sharded_status(state)
        state = job_status(settings)
        return json.dumps(state, ensure_ascii=False, indent=2) if args.json else format_status(state)
    rows = export_output(spec, args.format, args.to, args.shards)
    return f"exported {counted(rows, 'row')}{f' of {spec.shard.label}' if spec.shard else ''} to {args.to}"


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise ConfigError("--limit must be 0 or more")
    options = RunOptions(retry_failed=args.retry_failed, force=args.force, limit=args.limit,
                         progress_interval_s=args.progress_interval, mode=args.mode, wait=args.wait)
    with command_line_process():
        # Before anything is written: the log file is the first write.
        plan = preflight(args.job, force=args.force, mode=args.mode, shard=shard_ask(args))
        if taken_early():  # its KeyboardInterrupt was dropped in a finalizer: stopped still, nothing written
            raise KeyboardInterrupt
        redact_everywhere([plan.api_key])
        with run_log(plan.locations.local_dir, args.log_format, plan.shard.label if plan.shard else None):
            summary = asyncio.run(run_job(plan, options))
    print(format_summary(summary))
    return int(summary["exit_code"])


def cancel(args: argparse.Namespace) -> int:
    """`batch cancel job.yaml`: the job's live batches cancelled at the provider, under the run lock."""
    from batch.batch_api.answerer import cancel_batches  # the openai SDK: imported by this command only
    from batch.batch_api.ledger import format_batch
    from batch.checkpoint.guard import RunLock

    plan = preflight(args.job, shard=shard_ask(args))
    redact_everywhere([plan.api_key])
    lock = RunLock(plan.locations.local_dir)
    lock.acquire()
    try:
        outcome = asyncio.run(cancel_batches(plan))
    finally:
        lock.release()
    job = job_named(plan.name, plan.shard.label if plan.shard else None)
    if not outcome:
        print(f"{job}: no live Batch API batch")
        return 0
    said = [f"cancelled {counted(len(outcome.cancelled), 'batch')}" if outcome.cancelled else "nothing to cancel"]
    if outcome.ended:  # completed, failed, expired, finalizing, or cancelling/cancelled by an earlier cancel
        states = Counter(batch["state"] for batch in outcome.ended)
        said.append(f"{counted(len(outcome.ended), 'batch')} already ended or ending ("
                    + ", ".join(f"{number} {state}" for state, number in sorted(states.items())) + ")")
    if outcome.dropped:
        said.append(f"dropped {counted(len(outcome.dropped), 'file')} not yet made a batch")
    if outcome.lost:
        said.append(f"{counted(len(outcome.lost), 'batch')} the provider no longer knows")
    print(f"{job}: " + "; ".join(said) + "; the next run merges what they answered and the rest is "
          "pending again")
    for what, batches in (("cancelled", outcome.cancelled), ("already ended or ending", outcome.ended),
                          ("dropped", outcome.dropped), ("lost", outcome.lost)):
        for batch in batches:
            print(f"  {what}: {format_batch(batch)}")
    return 0


def _count(text: str) -> int:
    """--shards: a whole number, 1 to MOST_SHARDS."""
    if not text.strip().isdigit() or not 1 <= int(text) <= MOST_SHARDS:
        raise argparse.ArgumentTypeError(f"is a number of shards, 1 to {MOST_SHARDS:,}, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    """--progress-interval: seconds, 0 or more (a NaN, an infinity or a negative would never or always print)."""
    value = float(text)  # ValueError: argparse says "invalid _seconds value"
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"is seconds, 0 or more, not {text!r}")
    return value
