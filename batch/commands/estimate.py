"""`batch estimate`: what the rest of a job will take and cost, without sending a request."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from batch.checkpoint.answered import RowStates
from batch.checkpoint.writer import Checkpoint, checkpoint_at
from batch.commands.status import id_batches, row_states, shard_named
from batch.input.prompts import (
    MESSAGE_OVERHEAD_TOKENS,
    REQUEST_OVERHEAD_TOKENS,
    RowPromptError,
    estimate_tokens,
    prompt_token_bound,
)
from batch.input.reader import InputTable, Skipped
from batch.plan import Settings
from batch.preflight import input_table
from batch.pricing import BATCH_PRICE_FACTOR, CURRENCY, cost_of, money, worst_cost
from batch.wording import counted, job_named

TOKENIZER_NOTE = "approximation: 1 token per CJK character, 1 per 4 other characters, +4 per message"
BOUND_NOTE = (f"at most 1 token per UTF-8 byte, +{MESSAGE_OVERHEAD_TOKENS} per message, "
              f"+{REQUEST_OVERHEAD_TOKENS} per request")


class EstimateReading(NamedTuple):
    """What a job's (or a shard's) checkpoint holds, as an estimate reads it."""
    table: InputTable
    checkpoint: Checkpoint
    states: RowStates
    completion_tokens: int  # of the ok answers so far that came with usage
    answers: int  # those answers


def read_for_estimate(settings: Settings) -> EstimateReading:
    table = input_table(settings)
    checkpoint = checkpoint_at(settings.locations)  # one reader: a damaged file is read, and warned of, once
    _, states = row_states(settings.locations, table, checkpoint)
    tokens, answers = _completion_tokens(checkpoint, states, id_batches(table))
    return EstimateReading(table, checkpoint, states, tokens, answers)


def mean_completion_tokens(readings: Iterable[EstimateReading]) -> float | None:
    """The mean completion length of the ok answers the `readings` hold (None: no answer with usage yet)."""
    tokens = answers = 0
    for reading in readings:
        tokens += reading.completion_tokens
        answers += reading.answers
    return tokens / answers if answers else None


def estimate(settings: Settings, retry_failed: bool = False, reading: EstimateReading | None = None,
             observed: float | None | Literal["own"] = "own") -> dict[str, Any]:
    """`settings` from batch.preflight.resolve: the max_tokens and the price that run uses. `reading`: its checkpoint
    read already (read_for_estimate); `observed`: the answers' mean length to expect, when not the checkpoint's own
    (a shard's estimate expects the whole job's)."""
    builder, max_tokens, pricer = settings.builder, settings.max_tokens, settings.pricer
    reading = reading or read_for_estimate(settings)
    table, checkpoint, states = reading.table, reading.checkpoint, reading.states
    if observed == "own":
        observed = mean_completion_tokens([reading])

    json_output = settings.json_output
    with_schema = json_output if json_output is not None and json_output.schema is not None else None
    unsent_tokens, unsent_bound = with_schema.unsent_tokens() if with_schema is not None else (0, 0)
    rows = skipped = unsendable = prompt_tokens = prompt_bound = 0
    expected = most = 0.0
    start = states.first_to_send(retry_failed)
    for row in table.rows(lambda seq, ids: states.to_send(seq, ids, retry_failed), start):
        if isinstance(row, Skipped):
            skipped += row.count
            continue
        try:
            messages = builder.messages(row.values)
        except RowPromptError:
            unsendable += 1
            continue
        tokens, bound = estimate_tokens(messages) + unsent_tokens, prompt_token_bound(messages) + unsent_bound
        rows += 1
        prompt_tokens += tokens
        prompt_bound += bound
        if pricer is not None:
            expected += cost_of(pricer, tokens, round(observed or 0)) or 0.0
            most += worst_cost(pricer, bound, max_tokens) if max_tokens else 0.0
    changed = states.counts(id_batches(table)).changed
    spent = checkpoint.spent(states, id_batches(table), with_log=True)
    budget = settings.budget
    in_batches = states.held()  # skipped too, but not done: their answers come from live Batch API batches
    return {
        "job": settings.name, **shard_named(settings), "model": settings.model, "rows_to_do": rows,
        "rows_done_before": skipped - in_batches,
        "rows_in_batches": in_batches,
        "rows_without_prompt": unsendable, "rows_changed": changed,
        "prompt_tokens_estimate": prompt_tokens, "tokenizer": TOKENIZER_NOTE,
        "prompt_tokens_max": prompt_bound, "prompt_bound": BOUND_NOTE,
        # Included in the two above: what output.json_schema adds to each row's prompt, and where it is sent.
        "schema_prompt_tokens_per_row": with_schema.extra_tokens(settings.system) if with_schema else None,
        "schema_via": with_schema.via if with_schema else None,
        "max_tokens": max_tokens, "observed_completion_tokens_per_row": observed,
        "completion_tokens_expected": round(rows * observed) if observed is not None else None,
        "completion_tokens_max": rows * max_tokens if max_tokens else None,
        # Expected: the prompt estimate and the answers' length so far (none yet: prompts only). Max: a real
        # bound, the same the budget reserves.
        "cost_expected": expected if pricer else None,
        "cost_max": most if pricer and max_tokens else None,
        # The Batch API (mode: batch_api) bills the same tokens at BATCH_PRICE_FACTOR of the online price.
        "cost_expected_batch_api": expected * BATCH_PRICE_FACTOR if pricer else None,
        "cost_max_batch_api": most * BATCH_PRICE_FACTOR if pricer and max_tokens else None,
        # What the rows done so far cost, and what the budget counts of it (answers without usage at their worst).
        "cost_spent": spent.cost, "budget_cost_spent": spent.budget_cost, "budget_tokens_spent": spent.budget_tokens,
        # A shard's are its share of the job's budget (JobSpec.for_shard); with limits.shared, the whole one, which
        # every shard takes from in Redis.
        "budget_max_cost": budget.max_cost if budget else None,
        "budget_max_total_tokens": budget.max_total_tokens if budget else None,
        "budget_shared": settings.limits.shared is not None,
        "currency": CURRENCY,
    }


def _completion_tokens(checkpoint: Checkpoint, states: RowStates, id_batches: Callable[[], Iterable[pa.Array]]
                       ) -> tuple[int, int]:
    """The completion tokens of the rows answered so far (each id's kept record, the log of a live run too), and how
    many rows they are: a row's, as its cost, sums every answer paid for it, over every holder that wrote it."""
    tokens = answers = 0
    for records in checkpoint.kept_records(states, id_batches, ["status", "completion_tokens"], with_log=True):
        completions = records.column("completion_tokens").filter(pc.equal(records.column("status"), "ok"))
        tokens += pc.sum(completions).as_py() or 0
        answers += pc.count(completions).as_py()  # an answer without usage says nothing about its length
    return tokens, answers


def format_estimate(e: dict[str, Any]) -> str:
    lines = [
        f"estimate for {job_named(e['job'], e.get('shard'))} ({e['model']}): {counted(e['rows_to_do'], 'row')} to send "
        f"({e['rows_done_before']} done before, {e['rows_without_prompt']} without a prompt"
        + (f", {e['rows_in_batches']} in live Batch API batches" if e["rows_in_batches"] else "")
        + (f", {e['rows_changed']} whose prompt changed since answered" if e["rows_changed"] else "")
        + "); nothing was sent",
        f"  prompt tokens: ~{e['prompt_tokens_estimate']} expected ({e['tokenizer']}); "
        f"at most {e['prompt_tokens_max']} ({e['prompt_bound']})",
    ]
    if e["schema_prompt_tokens_per_row"] is not None:
        where = "in the system prompt" if e["schema_via"] == "prompt" else "as response_format"
        lines.append(f"    of which ~{e['schema_prompt_tokens_per_row']} per row are output.json_schema, sent {where}")
    answer = []
    if e["completion_tokens_max"] is not None:
        answer.append(f"at most {e['completion_tokens_max']} (max_tokens {e['max_tokens']} per row)")
    if e["observed_completion_tokens_per_row"] is not None:
        answer.append(f"~{e['completion_tokens_expected']} at the {e['observed_completion_tokens_per_row']:.1f} "
                      "per row answered so far")
    lines.append("  completion tokens: " + ("; ".join(answer) or "unknown: no max_tokens and no answers yet"))
    if e["cost_spent"]:
        lines.append(f"  spent so far: {money(e['cost_spent'])} {e['currency']}")
    if e["budget_max_cost"] is not None or e["budget_max_total_tokens"] is not None:
        lines.append(f"  budget: {format_budget(e)}")
    if e["cost_expected"] is None:
        lines.append(f"  cost: unknown (no price for {e['model']}: add pricing: to the job)")
    else:
        most = f"{money(e['cost_max'])}" if e["cost_max"] is not None else "unbounded (no max_tokens)"
        basis = "" if e["observed_completion_tokens_per_row"] is not None else " for the prompts alone (no answers yet)"
        lines.append(f"  cost online: ~{money(e['cost_expected'])} expected{basis}, at most {most} {e['currency']}")
        most = f"{money(e['cost_max_batch_api'])}" if e["cost_max_batch_api"] is not None else "unbounded"
        lines.append(f"  cost through the Batch API (mode: batch_api, half price): "
                     f"~{money(e['cost_expected_batch_api'])} expected, at most {most} {e['currency']}")
    return "\n".join(lines)


def format_budget(e: dict[str, Any]) -> str:
    """The budget of an estimate `e` and what is left of it."""
    said = []
    if e["budget_max_cost"] is not None:
        left = max(0.0, e["budget_max_cost"] - e["budget_cost_spent"])
        said.append(f"max_cost {money(e['budget_max_cost'])} {e['currency']}, {money(left)} left")
    if e["budget_max_total_tokens"] is not None:
        left_tokens = max(0, e["budget_max_total_tokens"] - e["budget_tokens_spent"])
        said.append(f"max_total_tokens {e['budget_max_total_tokens']}, {left_tokens} left")
    return "; ".join(said)
