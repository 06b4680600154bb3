"""`python -m batch run job.yaml`: the command line, exit codes, and one-line errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from batch.config import load_job, resolve_api_key
from batch.errors import EXIT_INTERRUPTED, BatchError, ConfigError
from batch.estimate import estimate, format_estimate
from batch.runner import RunOptions, run_job
from batch.status import format_status, job_status, validate
from batch.summary import format_summary

log = logging.getLogger("batch")


class RedactSecrets(logging.Filter):
    """Belt and braces: whatever a library logs, the API key is never written out."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 6]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(s in message for s in self.secrets):
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
        return True


def setup_logging(verbose: bool) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s batch %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batch", description="Run an LLM job over a table, checkpointed to Parquet.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) a job")
    run.add_argument("job", help="the job file (YAML)")
    run.add_argument("--retry-failed", action="store_true", help="send failed rows again")
    run.add_argument("--force", action="store_true",
                     help="resume even if model, params, prompt or input changed since the checkpoint was made")
    run.add_argument("--progress-interval", type=float, default=5.0, metavar="S",
                     help="seconds between progress lines when not on a terminal (default 5)")
    run.add_argument("--limit", type=int, metavar="N", help="send at most N pending rows (try a job cheaply)")
    run.add_argument("-v", "--verbose", action="store_true")
    status = commands.add_parser("status", help="rows done / failed / pending, tokens, cost, whether a run is alive")
    status.add_argument("job")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    estimate_cmd = commands.add_parser("estimate", help="rows, tokens and cost still to come; sends nothing")
    estimate_cmd.add_argument("job")
    estimate_cmd.add_argument("--retry-failed", action="store_true", help="count failed rows a retry would send")
    estimate_cmd.add_argument("--json", action="store_true", help="print the estimate as JSON")
    validate = commands.add_parser("validate", help="check the job file, input and API key without sending anything")
    validate.add_argument("job")
    commands.add_parser("simulate", help="start the local OpenAI-compatible simulator (see --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:
        from batch.simulator import main as simulate

        return simulate(argv[1:])
    args = build_parser().parse_args(argv)
    handler = setup_logging(getattr(args, "verbose", False))
    try:
        spec = load_job(args.job)
        if args.command == "validate":
            print(validate(spec))
            return 0
        if args.command == "estimate":
            found = estimate(spec, args.retry_failed)
            print(json.dumps(found, ensure_ascii=False, indent=2) if args.json else format_estimate(found))
            return 0
        if args.command == "status":
            state = job_status(spec)
            print(json.dumps(state, ensure_ascii=False, indent=2) if args.json else format_status(state))
            return 0
        if args.limit is not None and args.limit < 0:
            raise ConfigError("--limit must be 0 or more")
        api_key = resolve_api_key(spec)
        handler.addFilter(RedactSecrets([api_key]))
        options = RunOptions(retry_failed=args.retry_failed, force=args.force, limit=args.limit,
                             progress_interval_s=args.progress_interval)
        summary = asyncio.run(run_job(spec, api_key, options))
    except BatchError as exc:
        print(f"batch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("batch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_summary(summary))
    return int(summary["exit_code"])
