"""The result record: one per answer or failure, as the checkpoint's log and Parquet parts hold it.

`Record` is its type, `RECORD_SCHEMA` its Arrow schema, and the field groups below say which fields
the others take of it: the final file, the answer cache, the spending totals. Records are built
here only, by the three constructors: from an answer the client checked, from a failure, and from
an answer kept in the cache. A record stays a plain dict (a TypedDict): the pool makes one per
answer, and anything heavier would cost CPU on every row.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypedDict

import pyarrow as pa

from batch.logs import redact
from batch.pricing import Pricer, cost_of

if TYPE_CHECKING:
    from batch.input.reader import Row


class Record(TypedDict):
    id: str
    seq: int  # the input row it was sent from
    status: str  # "ok" or "failed"
    response: str | None
    reasoning_content: str | None
    tool_calls: str | None  # the tools the model called (message.tool_calls), as JSON text; None when it called none
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cost: float | None  # CNY; None when the model has no known price
    model: str
    request_id: str | None
    latency_s: float | None
    ttft_s: float | None  # streamed: seconds to the first content, reasoning or tool-call token (else None)
    attempts: int  # requests sent for it: 0 when the cache answered or the row had no prompt
    error_class: str | None
    error: str | None
    cache_hit: bool
    prompt_hash: int | None
    worst_case_cost: float | None  # what the budget counted beyond `cost` for answers that came without usage
    worst_case_tokens: int | None  # likewise beyond `total_tokens`: their worst case (None: nothing counted so)
    epoch: int | None  # the lease epoch of the run that wrote it (batch/storage/lease.py); None: no lease (local)
    carried: str | None  # what it holds of the row's records before it (carry): JSON of CARRIED_FIELDS; None: nothing


RECORD_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("seq", pa.int64()),
    ("status", pa.string()),
    ("response", pa.string()),
    ("reasoning_content", pa.string()),
    ("tool_calls", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("total_tokens", pa.int64()),
    ("cost", pa.float64()),
    ("model", pa.string()),
    ("request_id", pa.string()),
    ("latency_s", pa.float64()),
    ("ttft_s", pa.float64()),
    ("attempts", pa.int32()),
    ("error_class", pa.string()),
    ("error", pa.string()),
    ("cache_hit", pa.bool_()),
    # CRC-32 of the row's prompt values when it was sent (reader.prompt_hashes): a row whose values were
    # edited since is sent again. Null in checkpoints written before it existed: those are taken as unchanged.
    ("prompt_hash", pa.uint32()),
    # What the budget counted for the row's answers that came without usage (at their worst case) beyond the
    # cost and tokens it knows: the next run's budget starts from cost + these, as this run counted them. Never in
    # the output, whose cost stays null (unknown) for such an answer. Null in checkpoints written before them.
    ("worst_case_cost", pa.float64()),
    ("worst_case_tokens", pa.int64()),
    # The lease epoch of the run that wrote the record: of one id's records, the rule (checkpoint/answered.py) takes
    # the highest epoch's, so a zombie holder's late answer never hides the new holder's. Null: written without a
    # lease (a local checkpoint, or before epochs were recorded), epoch 0.
    ("epoch", pa.int64()),
    # What the record holds of the row's earlier records (their CARRIED_FIELDS, added by `carry`), as JSON: the
    # record's own answers are what it holds beyond this. Two holders of one checkpoint (a zombie and the run that
    # took its lease over) each add up what they saw; the checkpoint sums each holder's own (answered.py). Null:
    # nothing carried, or written before it was recorded.
    ("carried", pa.string()),
])
RECORD_FIELDS = RECORD_SCHEMA.names
assert RECORD_FIELDS == list(Record.__annotations__), "Record and RECORD_SCHEMA list the same fields"

# What the final file shows beside each input row: the input has the id, and the row's place and prompt are its own.
OUTPUT_FIELDS = [name for name in RECORD_FIELDS if name not in (
    "id", "seq", "prompt_hash", "worst_case_cost", "worst_case_tokens", "epoch", "carried")]
# What the answer cache keeps of an answer: what another row asking the same thing copies.
CACHED_FIELDS = ("response", "reasoning_content", "tool_calls", "finish_reason", "prompt_tokens", "completion_tokens",
                 "total_tokens", "model", "request_id")
# What an answer cost: a row's record holds the sum over all its answers (add_paid_before).
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
PAID_FIELDS = ("cost", *TOKEN_FIELDS)
WORST_CASE_FIELDS = ("worst_case_cost", "worst_case_tokens")
# What a row's record sums over every answer and request sent for it, in every run and mode (add_paid_before): its
# cost and tokens, what the budget counted at worst case, and its requests (`attempts`).
CARRIED_FIELDS = (*PAID_FIELDS, *WORST_CASE_FIELDS, "attempts")
# Dictionary-encoded when written: the fields with a handful of distinct values. The others (ids, answers)
# are unique per row, and a dictionary builder per column held ~10 MB while it found that out.
DICTIONARY_FIELDS = ["status", "finish_reason", "model", "error_class"]


def answer_record(row: Row, data: dict[str, Any], latency: float, attempts: int, pricer: Pricer | None,
                  model: str, ttft: float | None = None) -> Record:
    """The record of an answer the client checked (client.accepted: every field has its type, no key in it);
    `ttft`: the seconds to its first token, when it was streamed."""
    choice = data["choices"][0]
    message = choice["message"]
    return {
        "id": row.id, "seq": row.seq, "status": "ok",
        "response": message.get("content"),
        "reasoning_content": message.get("reasoning_content"),
        "tool_calls": json.dumps(message["tool_calls"], ensure_ascii=False) if message.get("tool_calls") else None,
        "finish_reason": choice.get("finish_reason"),
        **paid_for(data.get("usage") or {}, pricer),  # type: ignore[typeddict-item]
        "model": data.get("model") or model,
        "request_id": data.get("request_id") or data.get("id"),
        "latency_s": round(latency, 4), "ttft_s": None if ttft is None else round(ttft, 4), "attempts": attempts,
        "error_class": None, "error": None, "cache_hit": False, "prompt_hash": row.prompt_hash,
        "worst_case_cost": None, "worst_case_tokens": None, "epoch": None, "carried": None,
    }


def paid_for(usage: dict[str, Any], pricer: Pricer | None) -> dict[str, Any]:
    """What an answer with this usage (checked: client.check_usage) cost: its PAID_FIELDS."""
    prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total_tokens(usage),
            "cost": cost_of(pricer, prompt_tokens, completion_tokens,
                            (usage.get("prompt_tokens_details") or {}).get("cached_tokens"))}


def failed_record(row: Row, error_class: str, error: str, attempts: int, model: str) -> Record:
    """The record of a row that got no usable answer (its error redacted: it is written to disk)."""
    return {
        "id": row.id, "seq": row.seq, "status": "failed", "response": None, "reasoning_content": None,
        "tool_calls": None, "finish_reason": None, "prompt_tokens": None, "completion_tokens": None,
        "total_tokens": None, "cost": None, "model": model, "request_id": None, "latency_s": None, "ttft_s": None,
        "attempts": attempts,
        "error_class": error_class, "error": redact(error), "cache_hit": False, "prompt_hash": row.prompt_hash,
        "worst_case_cost": None, "worst_case_tokens": None, "epoch": None, "carried": None,
    }


def cached_record(kept: dict[str, Any], row: Row) -> Record:
    """A row's record made from another request's answer (`kept`: its CACHED_FIELDS): no request sent, nothing paid."""
    return {
        "id": row.id, "seq": row.seq, "status": "ok", **{name: kept.get(name) for name in CACHED_FIELDS},
        "cost": 0.0, "latency_s": 0.0, "ttft_s": None, "attempts": 0, "error_class": None, "error": None,
        "cache_hit": True, "prompt_hash": row.prompt_hash, "worst_case_cost": None, "worst_case_tokens": None,
        "epoch": None, "carried": None,
    }


def cached_fields(record: Record) -> dict[str, Any]:
    """What the answer cache keeps of `record`."""
    return {name: record[name] for name in CACHED_FIELDS}


def total_tokens(usage: dict[str, Any]) -> int | None:
    """usage.total_tokens, or prompt + completion when a server leaves it out."""
    total = usage.get("total_tokens")
    if total is None and usage.get("prompt_tokens") is not None and usage.get("completion_tokens") is not None:
        return usage["prompt_tokens"] + usage["completion_tokens"]
    return total


def add_paid_before(record: Record, paid: dict[str, Any] | None) -> None:
    """Add to `record` what earlier answers and requests for its row hold (`paid`: some of CARRIED_FIELDS), so the
    row's record holds the sum over all of them. A field unknown on either side stays what it was on the other."""
    if not paid:
        return
    for name, value in paid.items():
        if value is not None:
            mine = record[name]  # type: ignore[literal-required]
            record[name] = value if mine is None else mine + value  # type: ignore[literal-required]


def carry(record: Record, before: dict[str, Any] | None) -> None:
    """Add to `record`, a row's new record, what its record before it holds (`before`: its CARRIED_FIELDS; None:
    none), and note what was added (`carried`), so its own answers can be told from those it carries."""
    add_paid_before(record, before)
    kept = {name: value for name, value in (before or {}).items() if value is not None}
    record["carried"] = json.dumps(kept, sort_keys=True) if kept else None


def asked_again(record: Record, before: Record) -> Record:
    """The row's record after `record`, an answer to a request asked again after `before` (the row's record so far,
    in this run): `record` with the cost, tokens and attempts of both."""
    summed = record.copy()
    add_paid_before(summed, {name: before[name] for name in CARRIED_FIELDS})  # type: ignore[literal-required]
    return summed


def billed(record: Record) -> bool:
    """Whether a record holds an answer the server produced (and billed), ok or not (a reply that is not JSON), or
    the usage of answers that came and were judged failures (the pool sums them into the row's record)."""
    return record["response"] is not None or record["finish_reason"] is not None or \
        any(record[name] is not None for name in PAID_FIELDS)  # type: ignore[literal-required]
