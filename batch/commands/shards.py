"""A job run as N shards (batch/shard.py), read as one: `batch merge` writes the job's one output from every
shard's records, and `batch status` shows each shard."""

from __future__ import annotations

import itertools
import json
from typing import Any

from batch.checkpoint.final import (
    LastRecords,
    ShardRecords,
    made_from,
    output_footer,
    output_settings,
    reply_columns,
    write_final,
)
from batch.checkpoint.finished import read_finished
from batch.checkpoint.guard import RunLock
from batch.checkpoint.writer import checkpoint_at
from batch.commands.status import id_batches, job_status
from batch.errors import ConfigError, OutputWriteError, os_reason
from batch.plan import Settings
from batch.preflight import input_table
from batch.pricing import CURRENCY, money
from batch.shard import FOLDER
from batch.storage.locations import Location, object_exists, store_at, write_text_at

MERGE_SUMMARY_NAME = "merge.json"  # in the job's checkpoint folder: what the last merge wrote


def shard_count(settings: Settings, given: int | None = None) -> int | None:
    """How many shards the job runs as: --shards, the job file's `shards:`, or the shard folders its checkpoint
    holds (all of one count); None when it is not sharded."""
    if given is not None and settings.shards is not None and given != settings.shards:
        raise ConfigError(f"--shards {given} and {settings.locations.job_file}: shards: {settings.shards} disagree on "
                          "the number of shards: give one count")
    if given is not None or settings.shards is not None:
        return given or settings.shards
    folder = settings.locations.checkpoint_dir
    counts = sorted({int(found[2]) for found in map(FOLDER.fullmatch, _shard_folders(folder)) if found})
    if len(counts) > 1:
        raise ConfigError(f"{folder} holds shards of {' and of '.join(map(str, counts))}: pass --shards N to say "
                          "which split to read")
    return counts[0] if counts else None


def _shard_folders(folder: Location) -> set[str]:
    """The names of the shard folders in the job's checkpoint `folder` (on a disk or a bucket)."""
    try:
        return {entry.key.split("/", 1)[0] for entry in store_at(folder).list("shard=")}
    except OSError:  # no checkpoint yet
        return set()


def shard_state(part: Settings) -> dict[str, Any]:
    """Whether a shard has finished (its _SUCCESS marker) and whether a run of it is alive (its run lock held)."""
    at = part.locations
    return {"finished": read_finished(at.checkpoint_dir) is not None,
            "running_pid": RunLock(at.local_dir).holder() if at.local_dir.is_dir() else None}


def merge_shards(whole: Settings, parts: list[Settings] | None, partial: bool = False) -> dict[str, Any]:
    """Every shard's records (`parts`: each shard's settings) into the job's one output, in input order, one record
    per id: the table one process would have written for the same answers. Refused, naming the shards, while a
    shard has not finished or a run of one is alive; `partial`: written from what the shards' parts hold now (a row
    with no record there has no answer in it). Returns the merge's summary, the shards' costs and tokens added up."""
    at = whole.locations
    if not parts:
        raise ConfigError(f"{at.job_file}: the job is not split into shards (no shards: N in the job file, no "
                          f"--shards, and no shard folder in {at.checkpoint_dir}): `batch run` writes its output")
    states = [shard_state(part) for part in parts]
    if not partial:
        waiting = [f"{part.shard.label} ({_unfinished(state)})"  # type: ignore[union-attr]
                   for part, state in zip(parts, states) if state["running_pid"] or not state["finished"]]
        if waiting:
            raise ConfigError(f"{at.job_file}: cannot merge yet: {', '.join(waiting)}: run each to the end "
                              "(`batch run` with its --shard), or merge --partial to write what is there")
    readings = [_read_shard(part) for part in parts]
    out = whole.output
    replies = reply_columns(out, whole.schema, itertools.chain.from_iterable(
        reading["checkpoint"].chosen_records(reading["states"].last_record_mask(id_batches(reading["table"])),
                                             ["status", "response"]) for reading in readings)
        if out.parse_json else [])
    records = ShardRecords([LastRecords(reading["checkpoint"].row_groups() if reading["states"].record_count else None,
                                        reading["states"]) for reading in readings])
    keep = list(out.keep_columns)
    try:
        # Made from every shard's parts and the input, as one checkpoint's final file is made from its own.
        made = json.dumps([made_from(reading["checkpoint"], at.input) for reading in readings])
        rows = write_final(at.output, input_table(whole).id_batches(keep), out.id_column, keep, records, replies,
                           footer=output_footer(output_settings(out, whole.schema), made))
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


def _unfinished(state: dict[str, Any]) -> str:
    return f"running, pid {state['running_pid']}" if state["running_pid"] else "not finished"


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
    lines = [f"job {summary['job']}: merged {len(summary['shards'])} shards into {summary['output']}"
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
        shards.append({"shard": part.shard.label, **job_status(part), **shard_state(part),  # type: ignore[union-attr]
                       # Who holds the shard's lease, once shards take one on object storage (the run lock's
                       # holder, running_pid, is the one on this host).
                       "lease_holder": None})
    added = {key: sum(shard[key] for shard in shards)
             for key in ("rows_total", "ok", "failed", "pending", "prompt_tokens", "completion_tokens", "cost")}
    output = whole.locations.output
    return {"job": whole.name, "shard_count": len(parts), **added, "currency": CURRENCY, "shards": shards,
            "output": str(output) if object_exists(output) else None}


def format_sharded_status(status: dict[str, Any]) -> str:
    lines = [f"job {status['job']}: {status['shard_count']} shards, {status['rows_total']} rows: ok {status['ok']}, "
             f"failed {status['failed']}, pending {status['pending']}",
             f"  tokens so far: {status['prompt_tokens']} prompt + {status['completion_tokens']} completion, "
             f"cost so far: {money(status['cost'])} {status['currency']}"]
    for shard in status["shards"]:
        running = f"running (pid {shard['running_pid']})" if shard["running_pid"] else "not running"
        lease = f", lease held by {shard['lease_holder']}" if shard["lease_holder"] else ""
        lines.append(f"  {shard['shard']}: ok {shard['ok']}, failed {shard['failed']}, pending {shard['pending']}, "
                     f"{'finished' if shard['finished'] else 'not finished'}, {running}{lease}")
    if status["output"]:
        lines.append(f"  output: {status['output']}")
    return "\n".join(lines)
