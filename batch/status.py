"""`batch status` and `batch validate`: what a job has done, and whether it can run, without a request."""

from __future__ import annotations

import json
from typing import Any

import pyarrow.compute as pc

from batch.config import JobSpec, resolve_api_key
from batch.guard import RunLock
from batch.pricing import CURRENCY
from batch.prompts import PromptBuilder
from batch.reader import InputTable
from batch.writer import Checkpoint


def open_input(spec: JobSpec) -> InputTable:
    return InputTable(spec.input.path, spec.input.id_column, PromptBuilder(spec.prompt).columns,
                      spec.output.keep_columns)


def validate(spec: JobSpec) -> str:
    """Every check a run makes before its first request; raises ConfigError at the first problem."""
    table = open_input(spec)
    rows = table.scan()
    resolve_api_key(spec)
    columns = ", ".join(PromptBuilder(spec.prompt).columns)
    return (f"{spec.job_path}: ok: {rows} rows in {spec.input.path}, prompt columns {columns}, "
            f"model {spec.model.name} at {spec.model.resolved_base_url}")


def job_status(spec: JobSpec) -> dict[str, Any]:
    table = open_input(spec)
    results = Checkpoint(spec.checkpoint_dir).snapshot()
    ok = pc.equal(results.column("status"), "ok")
    done_ok = pc.sum(ok).as_py() or 0
    failed = results.num_rows - done_ok
    summary_path = spec.checkpoint_dir / "summary.json"
    last = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
    total = table.scan()
    return {
        "job": spec.name,
        "rows_total": total,
        "ok": done_ok,
        "failed": failed,
        "pending": total - done_ok - failed,
        "failed_by_class": dict(zip(*_counts(results.filter(pc.invert(ok)).column("error_class")))),
        "prompt_tokens": pc.sum(results.column("prompt_tokens")).as_py() or 0,
        "completion_tokens": pc.sum(results.column("completion_tokens")).as_py() or 0,
        "cost": round(pc.sum(results.column("cost")).as_py() or 0.0, 6),
        "currency": CURRENCY,
        "running_pid": RunLock(spec.checkpoint_dir).holder() if spec.checkpoint_dir.is_dir() else None,
        "last_run": None if last is None else {
            "finished_at": last.get("finished_at"), "exit_code": last.get("exit_code"),
            "requests_per_s": last["run"]["requests_per_s"], "stopped": last.get("stopped")},
        "output": str(spec.output.path) if spec.output.path.exists() else None,
    }


def _counts(column: Any) -> tuple[list[Any], list[int]]:
    counted = pc.value_counts(column)
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()


def format_status(status: dict[str, Any]) -> str:
    lines = [
        f"job {status['job']}: {status['rows_total']} rows: ok {status['ok']}, failed {status['failed']}, "
        f"pending {status['pending']}",
        f"  tokens so far: {status['prompt_tokens']} prompt + {status['completion_tokens']} completion, "
        f"cost so far: {status['cost']:.6f} {status['currency']}",
    ]
    if status["failed_by_class"]:
        lines.append("  failed: " + ", ".join(f"{k} {v}" for k, v in sorted(status["failed_by_class"].items())))
    last = status["last_run"]
    if last:
        stopped = f", stopped: {last['stopped']}" if last["stopped"] else ""
        when = f"finished {last['finished_at']}, " if last["finished_at"] else ""
        lines.append(f"  last run: {when}exit {last['exit_code']}, "
                     f"{last['requests_per_s']} requests/s{stopped}")
    running = status["running_pid"]
    lines.append(f"  running now: {'yes, pid ' + str(running) if running else 'no'}")
    if status["output"]:
        lines.append(f"  output: {status['output']}")
    return "\n".join(lines)
