"""Counting what a run did, showing progress while it runs, and the summary at the end."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm  # the text bar; a notebook's widget is tqdm.notebook's, taken where it can be drawn

from batch.batch_api.ledger import TERMINAL, format_batch
from batch.checkpoint.answered import INTERRUPTED
from batch.errors import option
from batch.logs import redact
from batch.preflight import merged_words
from batch.pricing import CURRENCY, money
from batch.records import Record, billed
from batch.shard import Shard
from batch.storage.locations import Location, write_text_at
from batch.wording import counted, job_named

log = logging.getLogger("batch")


@dataclass
class RunStats:
    rows_total: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    cost_unknown_rows: int = 0
    attempts: int = 0  # requests sent, counted by the pool as it sends them (a record may never come)
    throttled: int = 0  # 429 rate-limit answers
    concurrency_limit: float = 0.0  # the adaptive limit at the end
    finish_reasons: Counter[str] = field(default_factory=Counter)
    error_classes: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    def add(self, record: Record) -> None:
        """A record this run made. What it paid counts whether the row is ok or not (a reply that is not JSON
        was answered and billed); an answer from the cache paid nothing. A row cut short by the run's stop after
        answers it paid for (INTERRUPTED) is neither: pending."""
        if record["status"] == "ok":
            self.ok += 1
            if record["finish_reason"]:
                self.finish_reasons[record["finish_reason"]] += 1
        elif record["error_class"] != INTERRUPTED:
            self.failed += 1
            self.error_classes[record["error_class"]] += 1
        if record["cache_hit"] or not billed(record):
            return
        self.prompt_tokens += record["prompt_tokens"] or 0
        self.completion_tokens += record["completion_tokens"] or 0
        if record["cost"] is None:
            self.cost_unknown_rows += 1
        else:
            self.cost += record["cost"]

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.skipped

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def watched() -> bool:
    """Whether someone watches where the bar is drawn: stderr is a terminal, or the run is in a notebook's kernel,
    whose cell shows it. Elsewhere (cron, CI, a file, a pipe) a bar would be a line four times a second."""
    return sys.stderr.isatty() or _in_notebook()


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")  # imported by any kernel; batch never imports it itself
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None  # a terminal's IPython has no kernel


def _bar() -> type[tqdm]:
    """tqdm's widget in a notebook with ipywidgets, its text bar elsewhere: a notebook without ipywidgets gets the
    text bar (tqdm.auto would warn "IProgress not found" there, at import)."""
    if _in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as widget

        return widget
    return tqdm


class Progress:
    """A tqdm bar where someone watches (`watched`, or as `tty` says); a plain log line every `interval_s`
    seconds otherwise (cron, CI, files, pipes); nothing when not `shown`."""

    def __init__(self, stats: RunStats, interval_s: float = 5.0, tty: bool | None = None, shown: bool = True) -> None:
        self.stats = stats
        self.interval_s = interval_s
        self.shown = shown
        self._last_line = time.monotonic()
        use_bar = shown and (watched() if tty is None else tty)
        self.bar = _bar()(total=stats.rows_total, unit="row", dynamic_ncols=True, file=sys.stderr) if use_bar else None

    def refresh(self) -> None:
        s = self.stats
        if not self.shown:
            return
        if self.bar is not None:
            self.bar.n = s.done
            self.bar.set_postfix_str(f"ok={s.ok} failed={s.failed} tokens={s.prompt_tokens + s.completion_tokens}")
        elif time.monotonic() - self._last_line >= self.interval_s:
            self._last_line = time.monotonic()
            rate = (s.ok + s.failed) / max(s.elapsed, 1e-9)
            log.info("progress %d/%s (ok %d, failed %d, skipped %d), %s, %.1f rows/s",
                     s.done, counted(s.rows_total, "row"), s.ok, s.failed, s.skipped,
                     counted(s.prompt_tokens + s.completion_tokens, "token"), rate)

    def close(self) -> None:
        if self.bar is not None:
            self.refresh()
            self.bar.close()


def build_summary(job: str, model: str, stats: RunStats, totals: dict[str, int], stopped: str | None,
                  output: Path | None, exit_code: int) -> dict[str, Any]:
    wall = stats.elapsed
    sent = stats.ok + stats.failed
    return {
        "job": job,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "rows_total": stats.rows_total,
        "run": {"ok": stats.ok, "failed": stats.failed, "skipped": stats.skipped,
                "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                "total_tokens": stats.prompt_tokens + stats.completion_tokens,
                "cost": stats.cost, "currency": CURRENCY, "cost_unknown_rows": stats.cost_unknown_rows,
                "attempts": stats.attempts, "throttled": stats.throttled,
                "concurrency_limit_end": round(stats.concurrency_limit, 2), "wall_s": round(wall, 3),
                "requests_per_s": round(stats.attempts / wall, 2) if wall > 0 else 0.0,
                "rows_per_s": round(sent / wall, 2) if wall > 0 else 0.0,
                "finish_reasons": dict(stats.finish_reasons), "error_classes": dict(stats.error_classes)},
        "job_totals": totals,
        "stopped": stopped,
        "output": str(output) if output else None,
        "exit_code": exit_code,
    }


def format_summary(summary: dict[str, Any]) -> str:
    run, totals = summary["run"], summary["job_totals"]
    lines = [
        f"{job_named(summary['job'], _shard_label(summary))} ({summary['model']}): "
        f"{counted(summary['rows_total'], 'row')}",
        f"  this run: ok {run['ok']}, failed {run['failed']}, skipped (done before) {run['skipped']}",
        f"  all runs: ok {totals['ok']}, failed {totals['failed']}, pending {totals['pending']}",
        *([f"  not in the input: {counted(totals['not_in_input'], 'answer')} for rows no longer in the input (kept in "
            "the checkpoint)"]
          if totals.get("not_in_input") else []),
        f"  tokens: {run['prompt_tokens']} prompt + {run['completion_tokens']} completion = {run['total_tokens']}",
        f"  cost: {money(run['cost'])} {run['currency']}"
        + (f" (+ {counted(run['cost_unknown_rows'], 'row')} of unknown price)" if run["cost_unknown_rows"] else ""),
        f"  time: {run['wall_s']:.1f} s, {run['requests_per_s']} requests/s, {counted(run['attempts'], 'request')}"
        + (f", {run['throttled']} throttled (429)" if run["throttled"] else ""),
    ]
    if run["error_classes"]:
        lines.append("  failures: " + ", ".join(f"{k} {v}" for k, v in sorted(run["error_classes"].items())))
    odd = {k: v for k, v in run["finish_reasons"].items() if k != "stop"}
    if odd:
        lines.append("  finish reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(odd.items())))
    made = [batch for batch in summary.get("batches") or [] if batch["batch_id"]]
    waiting = [batch for batch in summary.get("batches") or [] if not batch["batch_id"]]
    ended = [batch for batch in made if batch["state"] in TERMINAL]  # as last polled; their results not merged yet
    working = [batch for batch in made if batch["state"] not in TERMINAL]
    if working:  # --wait would have waited for them: it is the advice only to a run that did not
        lines.append(f"  {counted(len(working), 'Batch API batch')} still being worked on: run again later"
                     + ("" if summary.get("wait") else f", or use {option('wait')}"))
        lines.extend(f"    {format_batch(batch)}" for batch in working)
    if ended:
        lines.append(f"  {counted(len(ended), 'Batch API batch')} ended at the provider, the results not merged yet: "
                     "the next run downloads them")
        lines.extend(f"    {format_batch(batch)}" for batch in ended)
    if waiting:  # no batch exists for them yet: not listed as batches
        lines.append(f"  {counted(len(waiting), 'Batch API request file')} "
                     f"({counted(sum(b['rows'] for b in waiting), 'row')}) not made a batch yet: the next run uploads "
                     "and submits them")
    if summary.get("merged_shards"):
        lines.append(f"  nothing sent: {merged_words(summary['merged_shards'])}")
    if summary["stopped"]:
        lines.append(f"  stopped: {summary['stopped']}")
    if summary["output"]:
        lines.append(f"  output: {summary['output']}")
    return redact("\n".join(lines))  # `stopped` may quote a server, and a server may quote the key


def _shard_label(summary: dict[str, Any]) -> str | None:
    shard = summary.get("shard")
    return Shard(shard["index"], shard["count"]).label if shard else None


def save_summary(summary: dict[str, Any], path: Location) -> None:
    write_text_at(path, redact(json.dumps(summary, ensure_ascii=False, indent=2)) + "\n")


__all__ = ["RunStats", "Progress", "build_summary", "format_summary", "save_summary"]
