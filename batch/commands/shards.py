"""A job run as N shards (batch/shard.py), read as one: `batch merge` writes the job's one output from every
shard's records, `batch status` and `batch estimate` show each shard, and `batch export` and `read_results` read the
merged output, or each row's state in its shard's checkpoint before it is merged. `job_shards` is where each of them
finds a job's shards."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from batch.checkpoint.final import LastRecords, ShardRecords, is_current, merged_footer, reply_columns, write_final
from batch.checkpoint.finished import shard_state, why_unfinished
from batch.checkpoint.writer import checkpoint_at
from batch.commands.estimate import estimate, format_budget, format_estimate, mean_completion_tokens, read_for_estimate
from batch.commands.status import JobReading, format_lease, id_batches, job_status, read_job
from batch.errors import ConfigError, OutputWriteError, os_reason
from batch.plan import Settings
from batch.preflight import checkpoint_layouts, input_table
from batch.pricing import CURRENCY, money
from batch.shard import shard_of
from batch.storage.locations import Location, object_exists, write_text_at
from batch.wording import counted

MERGE_SUMMARY_NAME = "merge.json"  # in the job's checkpoint folder: what the last merge wrote


@dataclass
class ShardsReading:
    """A job split into shards as read now, sending nothing: each shard's reading (read_job: the log of a live run
    included), whether it has finished, and whether the job's output is the one `batch merge` writes from them now."""
    parts: list[Settings]
    readings: list[JobReading]
    unfinished: list[str]  # each shard not finished, named with why (why_waiting)
    merged_is_current: bool  # every shard finished, no row pending, and the output merged from their records as now

    def input_order(self, whole: Settings) -> np.ndarray:
        """Where each input row is among the shards' rows put one shard after another (each shard's in input order):
        row i of the input is row `order[i]` of them."""
        which = np.concatenate([np.zeros(0, np.int64),
                                *(shard_of(ids, len(self.parts)) for _, ids in input_table(whole).id_batches([]))])
        placed = np.argsort(which, kind="stable")  # the input row of each of the shards' rows, one shard after another
        return np.argsort(placed)


def read_shards(whole: Settings, parts: list[Settings]) -> ShardsReading:
    """Each shard of the job `whole` (`parts`: job_shards) as it is now: what `export` and `read_results` read."""
    readings = [read_job(part) for part in parts]
    unfinished = waiting_shards(parts, [shard_state(part) for part in parts], [reading.pending for reading in readings])
    current = not unfinished and is_current(whole.locations.output,
                                            merged_footer(whole, (reading.checkpoint for reading in readings)))
    return ShardsReading(parts, readings, unfinished, current)


def why_waiting(state: dict[str, Any], pending: int) -> str | None:
    """Why a shard (`state`: shard_state; `pending`: its rows with no answer now) is not ready to be read as finished,
    or None: it has not finished, a run of it is alive, or rows of it are pending again (added to the input, or their
    prompt changed, since it ended). What `merge`, `export` and `read_results` wait for. The phrase is the whole
    reason ("not finished", "running, pid 12", "3 rows pending"): a line naming it says nothing of its own on why."""
    return why_unfinished(state) or (f"{counted(pending, 'row')} pending" if pending else None)


def waiting_shards(parts: list[Settings], states: list[dict[str, Any]], pending: list[int]) -> list[str]:
    """Each shard of `parts` not ready to be read as finished (why_waiting), named with why."""
    return [f"{part.shard.label} ({why})"  # type: ignore[union-attr]
            for part, state, rows in zip(parts, states, pending) if (why := why_waiting(state, rows))]


def merge_shards(whole: Settings, parts: list[Settings] | None, partial: bool = False) -> dict[str, Any]:
    """Every shard's records (`parts`: each shard's settings) into the job's one output, in input order, one record
    per id: the table one process would have written for the same answers. Refused, naming the shards, while a
    shard has not finished or a run of one is alive; `partial`: written from what the shards' parts hold now (a row
    with no record there has no answer in it). Returns the merge's summary, the shards' costs and tokens added up."""
    at = whole.locations
    if not parts:
        raise ConfigError(f"{at.job_file}: the job is not split into shards (no shards: N in the job file, no "
                          f"--shards, and no shard folder in {at.checkpoint_dir}): `batch run` writes its output")
    count = len(parts)
    if count not in checkpoint_layouts(at.checkpoint_dir, at.local_dir).shards:  # an output of nothing but pending rows
        raise ConfigError(f"{at.job_file}: nothing to merge: {at.checkpoint_dir} holds no shard of {count} "
                          f"(shard=K-of-{count}): run them first (`batch run {at.job_file} --shard K/{count}`)")
    states = [shard_state(part) for part in parts]
    if not partial:  # before each shard is read: a shard not finished is told at once
        _refuse_waiting(at.job_file, waiting_shards(parts, states, [0] * count))
    readings = [_read_shard(part) for part in parts]
    if not partial:  # rows pending again in a finished shard (the input edited since) are never merged as answered
        _refuse_waiting(at.job_file, waiting_shards(parts, states, [reading["pending"] for reading in readings]))
    records = ShardRecords([_last_records(reading) for reading in readings])
    try:
        # Made from every shard's parts and the input, as one checkpoint's final file is made from its own.
        footer = merged_footer(whole, (reading["checkpoint"] for reading in readings))
        rows = _write_records(whole, at.output, readings, records, footer)
    except OSError as exc:
        raise OutputWriteError(f"{at.output}: cannot write the output: {os_reason(exc)} (every answer is safe in the "
                               "shards' checkpoints: merge again once it can be written)") from None
    summary = _merge_summary(whole, parts, states, readings, rows, partial)
    try:
        text = json.dumps(summary, ensure_ascii=False, indent=2) + "\n"
        write_text_at(at.checkpoint_dir / MERGE_SUMMARY_NAME, text)
    except OSError:
        pass  # the output is written; only this copy of the summary is lost (it was printed)
    return summary


def _refuse_waiting(job_file: Location, waiting: list[str]) -> None:
    if waiting:
        raise ConfigError(f"{job_file}: cannot merge yet: {', '.join(waiting)}: run each to the end "
                          "(`batch run` with its --shard), or merge --partial to write what is there")


def write_shard_rows(part: Settings, path: Location) -> int:
    """Shard `part`'s rows alone, in input order, beside their last records in its parts, written to `path` as the
    job's output holds them (`batch export --shard`); returns the rows written."""
    reading = _read_shard(part)
    return _write_records(part, path, [reading], _last_records(reading))


def _last_records(reading: dict[str, Any]) -> LastRecords:
    return LastRecords(reading["checkpoint"].row_groups() if reading["states"].record_count else None,
                       reading["states"])


def _write_records(settings: Settings, path: Location, readings: list[dict[str, Any]],
                   records: LastRecords | ShardRecords, footer: dict[bytes, bytes] | None = None) -> int:
    """The input rows of `settings` (the whole job's, or a shard's) beside their last `records`, read from the
    checkpoints of `readings` (_read_shard), as a final file at `path`; returns the rows written."""
    out = settings.output
    replies = reply_columns(out, settings.schema, itertools.chain.from_iterable(
        reading["checkpoint"].kept_records(reading["states"], id_batches(reading["table"]), ["status", "response"])
        for reading in readings)
        if out.parse_json else [])
    keep = list(out.keep_columns)
    return write_final(path, input_table(settings).id_batches(keep), out.id_column, keep, records, replies,
                       footer=footer)


def _read_shard(part: Settings) -> dict[str, Any]:
    """A shard's input rows, checkpoint and each row's last record in its parts (a live run's log is left out: the
    rows it holds are the shard's to recover when it runs again)."""
    table = input_table(part)
    checkpoint = checkpoint_at(part.locations)
    has_records = checkpoint.has_records()
    total = table.scan(keep_hashes=has_records)
    states = checkpoint.row_states(total, table.row_hashes, table.row_prompts)
    table.row_hashes = table.row_prompts = None
    counts = states.counts(id_batches(table))
    spent = checkpoint.spent(states, id_batches(table))
    return {"table": table, "checkpoint": checkpoint, "states": states, "rows": total, "ok": counts.ok,
            "failed": counts.failed, "pending": total - counts.ok - counts.failed, "spent": spent}


def _merge_summary(whole: Settings, parts: list[Settings], states: list[dict[str, Any]],
                   readings: list[dict[str, Any]], rows: int, partial: bool) -> dict[str, Any]:
    shards = [{"shard": part.shard.label, "rows": reading["rows"], "ok": reading["ok"],  # type: ignore[union-attr]
               "failed": reading["failed"], "pending": reading["pending"], "finished": state["finished"],
               "prompt_tokens": reading["spent"].prompt_tokens, "completion_tokens": reading["spent"].completion_tokens,
               "cost": reading["spent"].cost}
              for part, state, reading in zip(parts, states, readings)]
    added = {key: sum(shard[key] for shard in shards)
             for key in ("ok", "failed", "pending", "prompt_tokens", "completion_tokens", "cost")}
    return {"job": whole.name, "shards": shards, "rows_total": rows, **added,
            "total_tokens": added["prompt_tokens"] + added["completion_tokens"], "currency": CURRENCY,
            "partial": partial, "output": str(whole.locations.output)}


def format_merge(summary: dict[str, Any]) -> str:
    lines = [f"job {summary['job']}: merged {counted(len(summary['shards']), 'shard')} into {summary['output']}"
             + (" (partial)" if summary["partial"] else ""),
             f"  rows: {summary['rows_total']}: ok {summary['ok']}, failed {summary['failed']}, "
             f"pending {summary['pending']}",
             f"  tokens: {summary['prompt_tokens']} prompt + {summary['completion_tokens']} completion = "
             f"{summary['total_tokens']}",
             f"  cost: {money(summary['cost'])} {summary['currency']}"]
    lines.extend(f"    {shard['shard']}: ok {shard['ok']}, failed {shard['failed']}, pending {shard['pending']}, "
                 f"cost {money(shard['cost'])}" + ("" if shard["finished"] else ", not finished")
                 for shard in summary["shards"])
    return "\n".join(lines)


def sharded_status(whole: Settings, parts: list[Settings]) -> dict[str, Any]:
    """`batch status` of a job split into shards (`parts`: each shard's settings): each shard's status, and their
    rows, tokens and cost added up."""
    shards = []
    for part in parts:
        # Who holds each shard's lease (`lease`: on object storage, wherever it runs) is in its job_status; the run
        # lock's holder (running_pid) is the run on this host.
        shards.append({**job_status(part), **shard_state(part)})  # job_status names the shard
    added = {key: sum(shard[key] for shard in shards)
             for key in ("rows_total", "ok", "failed", "pending", "prompt_tokens", "completion_tokens", "cost")}
    output = whole.locations.output
    return {"job": whole.name, "shard_count": len(parts), **added, "currency": CURRENCY, "shards": shards,
            "output": str(output) if object_exists(output) else None}


def format_sharded_status(status: dict[str, Any]) -> str:
    lines = [f"job {status['job']}: {counted(status['shard_count'], 'shard')}, {counted(status['rows_total'], 'row')}: "
             f"ok {status['ok']}, "
             f"failed {status['failed']}, pending {status['pending']}",
             f"  tokens so far: {status['prompt_tokens']} prompt + {status['completion_tokens']} completion, "
             f"cost so far: {money(status['cost'])} {status['currency']}"]
    for shard in status["shards"]:
        elsewhere = shard["lease"] is not None and shard["lease"]["state"] == "alive"  # its lease renewed: a live run
        running = f"running (pid {shard['running_pid']})" if shard["running_pid"] else \
            "running" if elsewhere else "not running"
        lease = f", lease {format_lease(shard['lease'])}" if shard["lease"] else ""
        lines.append(f"  {shard['shard']}: ok {shard['ok']}, failed {shard['failed']}, pending {shard['pending']}, "
                     f"{'finished' if shard['finished'] else 'not finished'}, {running}{lease}")
    if status["output"]:
        lines.append(f"  output: {status['output']}")
    return "\n".join(lines)


# What an estimate of a job split into shards adds up over its shards (the rest is the same for every shard).
_ESTIMATE_SUMS = ("rows_to_do", "rows_done_before", "rows_in_batches", "rows_without_prompt", "rows_changed",
                  "prompt_tokens_estimate", "prompt_tokens_max", "completion_tokens_expected", "completion_tokens_max",
                  "cost_expected", "cost_max", "cost_expected_batch_api", "cost_max_batch_api", "cost_spent",
                  "budget_cost_spent", "budget_tokens_spent")


def sharded_estimate(whole: Settings, parts: list[Settings], retry_failed: bool = False) -> dict[str, Any]:
    """`batch estimate` of a job split into shards (`parts`: each shard's settings; `whole`: from resolve): each
    shard's rows done, spent and still to come, read from its own checkpoint, with its share of the budget, and
    those added up. Every shard expects the answers' mean length over all the shards' answers so far."""
    readings = [read_for_estimate(part) for part in parts]
    observed = mean_completion_tokens(readings)
    shards = [estimate(part, retry_failed, reading, observed) for part, reading in zip(parts, readings)]
    added = {key: None if any(shard[key] is None for shard in shards) else sum(shard[key] for shard in shards)
             for key in _ESTIMATE_SUMS}
    budget = whole.budget
    alike = {key: value for key, value in shards[0].items() if key != "shard"}  # the same in every shard's
    return {**alike, **added, "job": whole.name, "shard_count": len(parts),
            "budget_max_cost": budget.max_cost if budget else None,
            "budget_max_total_tokens": budget.max_total_tokens if budget else None,
            "shards": [{key: shard[key] for key in ("shard", *_ESTIMATE_SUMS, "budget_max_cost",
                                                    "budget_max_total_tokens", "budget_shared")}
                       for shard in shards]}


def format_sharded_estimate(e: dict[str, Any]) -> str:
    heading, *rest = format_estimate(e).split("\n")
    lines = [heading.replace(f"({e['model']}):", f"({e['model']}), {counted(e['shard_count'], 'shard')}:", 1), *rest]
    if e["budget_shared"]:
        lines.append("  each shard takes from the job's whole budget, in Redis (limits.shared):")
    elif e["budget_max_cost"] is not None or e["budget_max_total_tokens"] is not None:
        lines.append(f"  each shard keeps to its share of the budget (the job's / {e['shard_count']}):")
    else:
        lines.append("  each shard:")
    for shard in e["shards"]:
        line = (f"    {shard['shard']}: {counted(shard['rows_to_do'], 'row')} to send "
                f"({shard['rows_done_before']} done before), spent {money(shard['cost_spent'])}")
        if shard["cost_expected"] is not None:
            line += f", ~{money(shard['cost_expected'])} expected"
            if shard["cost_max"] is not None:
                line += f", at most {money(shard['cost_max'])}"
        if not shard["budget_shared"] and (shard["budget_max_cost"] is not None
                                           or shard["budget_max_total_tokens"] is not None):
            line += f"; its budget: {format_budget({**shard, 'currency': e['currency']})}"
        lines.append(line)
    return "\n".join(lines)
