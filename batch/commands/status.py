"""`batch status`: what a job has done, without a request."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from batch.batch_api.ledger import describe, format_batch, ledger_at
from batch.checkpoint.answered import PENDING_AGAIN, SUBMITTED, RowStates
from batch.checkpoint.final import is_current, made_from, output_footer, output_settings
from batch.checkpoint.guard import RunLock, read_run_mark
from batch.checkpoint.writer import Checkpoint, checkpoint_at
from batch.input.reader import InputTable
from batch.plan import Locations, Settings
from batch.preflight import input_table
from batch.pricing import CURRENCY, money
from batch.storage.base import Store
from batch.storage.lease import holder_prefix, read_lease
from batch.storage.locations import Location, object_exists, read_text_at
from batch.wording import counted, job_named


def row_states(locations: Locations, table: InputTable, checkpoint: Checkpoint) -> tuple[int, RowStates]:
    """The input's row count and each row's state in the checkpoint, the log of a live run included: the same
    resume state a run starts from, read without touching the checkpoint."""
    records = checkpoint.has_records()
    total = table.scan(keep_hashes=records)
    states = checkpoint.row_states(total, table.row_hashes, table.row_prompts, with_log=records)
    table.row_hashes = table.row_prompts = None
    # Rows in live Batch API batches are neither done nor to send.
    ledger_at(locations).hold(states, id_batches(table))
    return total, states


@dataclass
class JobReading:
    """A job as read now, sending nothing: its input, checkpoint, each row's state and whether its final file is
    the one a run would write now (read_job)."""
    table: InputTable
    checkpoint: Checkpoint
    states: RowStates
    total: int
    pending: int
    schema: dict[str, Any] | None  # output.json_schema as read
    final_is_current: bool  # every row ok or failed, and the final file written from these records, input, settings


def read_job(settings: Settings) -> JobReading:
    """The job as it is: what `read_results` and `export` read. The final file is current only when no row is
    pending and it is newer than every record and the input, written with the output settings it has now."""
    at = settings.locations
    table = input_table(settings)
    checkpoint = checkpoint_at(at)  # one reader: a damaged file is read, and warned of, once
    total, states = row_states(at, table, checkpoint)
    counts = states.counts(id_batches(table))
    schema = settings.schema  # with a json_schema, its columns are typed by it, as in the output
    pending = total - counts.ok - counts.failed
    return JobReading(table, checkpoint, states, total, pending, schema,
                      pending == 0 and _output_is_current(settings, checkpoint))


def _output_is_current(settings: Settings, checkpoint: Checkpoint) -> bool:
    """Whether the final file is the one batch writes from the checkpoint's records, the input and the output
    settings as they are now."""
    at = settings.locations
    return is_current(at.output, output_footer(output_settings(settings.output, settings.schema),
                                               made_from(checkpoint, at.input)))


def id_batches(table: InputTable) -> Callable[[], Iterator[pa.Array]]:
    """The input's ids, a batch at a time, read afresh on each call (RowStates reads them when records moved)."""
    return lambda: (ids for _, ids in table.id_batches([]))


def shard_named(settings: Settings) -> dict[str, str]:
    """The shard whose part of the job `settings` is, as its status and estimate name it ({"shard": "shard 1/4"}, as
    its log lines do), or nothing for the whole job."""
    return {"shard": settings.shard.label} if settings.shard else {}


def job_status(settings: Settings) -> dict[str, Any]:
    at = settings.locations
    table = input_table(settings)
    checkpoint = checkpoint_at(at)  # one reader: a damaged file is read, and warned of, once
    total, states = row_states(at, table, checkpoint)
    counts = states.counts(id_batches(table))
    spent = checkpoint.spent(states, id_batches(table), with_log=True)
    running = RunLock(at.local_dir).holder() if at.local_dir.is_dir() else None
    pending = total - counts.ok - counts.failed
    output = object_exists(at.output)
    return {
        "job": settings.name,
        **shard_named(settings),
        "rows_total": total,
        "ok": counts.ok,
        "failed": counts.failed,
        "pending": pending,
        "changed": counts.changed,
        "not_in_input": counts.not_in_input,
        "failed_by_class": failed_by_class(states, table),
        "prompt_tokens": spent.prompt_tokens,
        "completion_tokens": spent.completion_tokens,
        "cost": spent.cost,
        # What the budget counts as spent (the next run starts from it): the cost and tokens above, and answers
        # that came without usage at their worst case.
        "budget_cost": spent.budget_cost,
        "budget_tokens": spent.budget_tokens,
        "worst_case_tokens": spent.worst_case_tokens,
        "currency": CURRENCY,
        "running_pid": running,
        "lease": lease_status(at.checkpoint_store(), ended_here=None if running else holder_prefix(at.local_dir)),
        "last_run": last_run(at.checkpoint_dir, running),
        "output": str(at.output) if output else None,
        # False: not written from the records as they are now (a run writes it again, sending nothing): a zombie
        # holder's answers in flight that came after the run that wrote it, the input edited, other settings
        "output_current": (pending == 0 and _output_is_current(settings, checkpoint))
        if output and settings.shard is None else None,  # a shard writes none of its own: merge does
        "in_batches": states.held(),
        # As the last run saw them (status sends no request): the next run polls them.
        "batches": [describe(entry) for entry in ledger_at(at).files.values() if entry.live],
    }


def lease_status(store: Store, now: float | None = None, ended_here: str | None = None) -> dict[str, Any] | None:
    """Who holds the checkpoint's lease (a checkpoint on a URL: batch/storage/lease.py), as `status` shows it: the
    holder (its host, which in Kubernetes is the pod's name, and pid), its epoch, and whether it is alive (renewed
    within its ttl), ended (within its ttl, but its holder was a run on this host, named `ended_here`, that is no
    longer running: killed -9; the next run here takes it over at once), expired (its holder stopped renewing: the
    next run takes it over) or released (its run ended). None: no lease (a local checkpoint, or no run yet)."""
    try:
        found = read_lease(store)
    except OSError:  # no checkpoint yet, or a store that does not answer: status says what it can
        return None
    if found is None:
        return None
    state, now = found[0], time.time() if now is None else now
    host, pid = state.holder, None
    named = state.holder.rsplit(":", 3)  # HOST:FOLDER:PID:TOKEN (runner._take_lease)
    if len(named) == 4 and named[2].isdigit():
        host, pid = named[0], int(named[2])
    alive = state.alive(now)
    return {"holder": state.holder, "host": host, "pid": pid, "epoch": state.epoch,
            "state": ("ended" if ended_here and state.holder.startswith(ended_here) else "alive") if alive else
                     "released" if state.expires_at == 0 else "expired",
            # Seconds until it expires unless renewed (alive), or since it expired (negative); None once released.
            "expires_in_s": None if state.expires_at == 0 else round(state.expires_at - now, 1)}


def format_lease(lease: dict[str, Any] | None) -> str:
    """The lease as one phrase: 'held by HOST (pid P), epoch E, alive (20 s left)', and so on."""
    if lease is None:
        return "none"
    who = f"{lease['host']} (pid {lease['pid']})" if lease["pid"] is not None else lease["host"]
    if lease["state"] == "alive":
        return f"held by {who}, epoch {lease['epoch']}, alive ({lease['expires_in_s']:.0f} s left unless renewed)"
    if lease["state"] == "ended":
        return (f"held by {who}, epoch {lease['epoch']}, whose run ended without releasing it (killed?): the next run "
                f"on this host takes it over, another after {lease['expires_in_s']:.0f} s")
    if lease["state"] == "expired":
        return (f"last held by {who}, epoch {lease['epoch']}, expired {-lease['expires_in_s']:.0f} s ago (the next run "
                "takes it over)")
    return f"released by {who}, epoch {lease['epoch']}"


def failed_by_class(states: RowStates, table: InputTable) -> dict[str, int]:
    counted: Counter[str] = Counter()
    start = 0
    for _, ids in table.id_batches([]):
        codes = states.last(start, ids)[0]
        counted.update({states.name(int(code)): int(n) for code, n in zip(*np.unique(codes, return_counts=True))})
        start += len(ids)
    return {name: n for name, n in counted.items() if name not in (None, "ok", *PENDING_AGAIN, SUBMITTED)}


def last_run(folder: Location, running: int | None) -> dict[str, Any] | None:
    """How the last run ended: "finished" (its summary), "did_not_finish" (killed or crashed: its
    mark is still there and no live run holds the lock), "error" (stopped on an error it could note),
    or "unreadable" (a damaged summary.json); None before the first run."""
    marked = read_run_mark(folder) if running is None else None
    if marked is not None:
        state = "error" if marked.get("error") else "did_not_finish"
        return {"state": state, **{k: marked.get(k) for k in ("started_at", "pid", "ended_at", "exit_code", "error")}}
    path = folder / "summary.json"
    try:
        text = read_text_at(path)
        if text is None:
            return None
        last = json.loads(text)
        return {"state": "finished", "finished_at": last.get("finished_at"), "exit_code": last["exit_code"],
                "requests_per_s": last["run"]["requests_per_s"], "stopped": last.get("stopped")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}".splitlines()[0]
        return {"state": "unreadable", "error": f"{path} is damaged ({reason})"}


def format_status(status: dict[str, Any]) -> str:
    lines = [
        f"{job_named(status['job'], status.get('shard'))}: {counted(status['rows_total'], 'row')}: "
        f"ok {status['ok']}, failed {status['failed']}, pending {status['pending']}"
        + (f" ({status['changed']} answered before their prompt changed)" if status["changed"] else ""),
        f"  tokens so far: {status['prompt_tokens']} prompt + {status['completion_tokens']} completion, "
        f"cost so far: {money(status['cost'])} {status['currency']}",
    ]
    if status["worst_case_tokens"]:
        lines.append(f"  counted against the budget: {money(status['budget_cost'])} {status['currency']}, "
                     f"{counted(status['budget_tokens'], 'token')} (answers that came without usage at their worst "
                     "case)")
    if status["batches"]:
        lines.append(f"  Batch API: {counted(status['in_batches'], 'pending row')} in "
                     f"{counted(len(status['batches']), 'live batch')} (as the last run saw them):")
        lines.extend(f"    {format_batch(batch)}" for batch in status["batches"])
    if status["not_in_input"]:
        lines.append(f"  not in the input: {counted(status['not_in_input'], 'answer')} for rows no longer in the input "
                     "(kept in the checkpoint)")
    if status["failed_by_class"]:
        lines.append("  failed: " + ", ".join(f"{k} {v}" for k, v in sorted(status["failed_by_class"].items())))
    last = status["last_run"]
    if last:
        lines.append(f"  last run: {_last_run_line(last)}")
    running = status["running_pid"]
    lines.append(f"  running now: {'yes, pid ' + str(running) if running else 'no'}")
    if status["lease"] is not None:
        lines.append(f"  lease: {format_lease(status['lease'])}")
    if status["output"]:
        stale = " (not written from the records as they are now: a run writes it again, sending nothing)"
        lines.append(f"  output: {status['output']}{stale if status.get('output_current') is False else ''}")
    return "\n".join(lines)


def _last_run_line(last: dict[str, Any]) -> str:
    # a note whose start could not be read back when the run ended (its store failing then) says no start
    started = f", started {last['started_at']}" if last.get("started_at") else ""
    if last["state"] == "did_not_finish":
        return f"did not finish (killed or crashed){started}, pid {last['pid']}"
    if last["state"] == "error":
        return f"stopped on an error (exit {last['exit_code']}){started}: {last['error']}"
    if last["state"] == "unreadable":
        return f"its summary is unreadable: {last['error']}; the next run writes a new one"
    stopped = f", stopped: {last['stopped']}" if last["stopped"] else ""
    when = f"finished {last['finished_at']}, " if last["finished_at"] else ""
    return f"{when}exit {last['exit_code']}, {last['requests_per_s']} requests/s{stopped}"
