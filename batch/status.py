"""`batch status`: what a job has done, without a request."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.compute as pc

from batch.answered import RowStates
from batch.config import JobSpec
from batch.failures import PROMPT_CHANGED
from batch.guard import RunLock
from batch.pricing import CURRENCY, money
from batch.prompts import PromptBuilder
from batch.reader import InputTable
from batch.writer import Checkpoint


def open_input(spec: JobSpec) -> InputTable:
    return InputTable(spec.input.path, spec.input.id_column, PromptBuilder(spec.prompt).columns,
                      spec.output.keep_columns, messages_column=spec.prompt.messages_column)


def row_states(spec: JobSpec, table: InputTable) -> tuple[int, RowStates]:
    """The input's row count and each row's state in the checkpoint, the log of a live run included: the same
    resume state a run starts from, read without touching the folder."""
    checkpoint = Checkpoint(spec.checkpoint_dir)
    records = checkpoint.has_records()
    total = table.scan(keep_hashes=records)
    states = checkpoint.row_states(total, table.row_hashes, table.row_prompts, with_log=records)
    table.row_hashes = table.row_prompts = None
    return total, states


def job_status(spec: JobSpec) -> dict[str, Any]:
    table = open_input(spec)
    total, states = row_states(spec, table)
    counts = states.counts(lambda: (ids for _, ids in table.id_batches([])))
    results = Checkpoint(spec.checkpoint_dir).snapshot()
    sent = results.filter(pc.invert(pc.fill_null(results.column("cache_hit"), False)))  # the cache's cost no tokens
    summary_path = spec.checkpoint_dir / "summary.json"
    last = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
    return {
        "job": spec.name,
        "rows_total": total,
        "ok": counts.ok,
        "failed": counts.failed,
        "pending": total - counts.ok - counts.failed,
        "changed": counts.changed,
        "not_in_input": counts.not_in_input,
        "failed_by_class": failed_by_class(states, table),
        "prompt_tokens": pc.sum(sent.column("prompt_tokens")).as_py() or 0,
        "completion_tokens": pc.sum(sent.column("completion_tokens")).as_py() or 0,
        "cost": pc.sum(results.column("cost")).as_py() or 0.0,
        "currency": CURRENCY,
        "running_pid": RunLock(spec.checkpoint_dir).holder() if spec.checkpoint_dir.is_dir() else None,
        "last_run": None if last is None else {
            "finished_at": last.get("finished_at"), "exit_code": last.get("exit_code"),
            "requests_per_s": last["run"]["requests_per_s"], "stopped": last.get("stopped")},
        "output": str(spec.output.path) if spec.output.path.exists() else None,
    }


def failed_by_class(states: RowStates, table: InputTable) -> dict[str, int]:
    counted: Counter[str] = Counter()
    start = 0
    for _, ids in table.id_batches([]):
        codes = states.last(start, ids)[0]
        counted.update({states.name(int(code)): int(n) for code, n in zip(*np.unique(codes, return_counts=True))})
        start += len(ids)
    return {name: n for name, n in counted.items() if name not in (None, "ok", PROMPT_CHANGED)}


def format_status(status: dict[str, Any]) -> str:
    lines = [
        f"job {status['job']}: {status['rows_total']} rows: ok {status['ok']}, failed {status['failed']}, "
        f"pending {status['pending']}" + (f" ({status['changed']} answered before their prompt changed)"
                                          if status["changed"] else ""),
        f"  tokens so far: {status['prompt_tokens']} prompt + {status['completion_tokens']} completion, "
        f"cost so far: {money(status['cost'])} {status['currency']}",
    ]
    if status["not_in_input"]:
        lines.append(f"  not in the input: {status['not_in_input']} answers are for rows no longer in the input "
                     "(kept in the checkpoint)")
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
