"""`batch estimate`: what the rest of a job will take and cost, without sending a request."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc

from batch.checkpoint.writer import Checkpoint, checkpoint_at
from batch.commands.status import id_batches, row_states
from batch.input.prompts import (
    MESSAGE_OVERHEAD_TOKENS,
    REQUEST_OVERHEAD_TOKENS,
    RowPromptError,
    estimate_tokens,
    prompt_token_bound,
)
from batch.input.reader import Skipped
from batch.plan import Settings
from batch.preflight import input_table
from batch.pricing import BATCH_PRICE_FACTOR, CURRENCY, cost_of, money, worst_cost

TOKENIZER_NOTE = "approximation: 1 token per CJK character, 1 per 4 other characters, +4 per message"
BOUND_NOTE = (f"at most 1 token per UTF-8 byte, +{MESSAGE_OVERHEAD_TOKENS} per message, "
              f"+{REQUEST_OVERHEAD_TOKENS} per request")


def estimate(settings: Settings, retry_failed: bool = False) -> dict[str, Any]:
    """`settings` from batch.preflight.resolve: the max_tokens and the price that run uses."""
    builder, max_tokens, pricer = settings.builder, settings.max_tokens, settings.pricer
    table = input_table(settings)
    checkpoint = checkpoint_at(settings.locations)  # one reader: a damaged file is read, and warned of, once
    _, states = row_states(settings.locations, table, checkpoint)
    observed = _mean_completion_tokens(checkpoint, states.last_record_mask(id_batches(table)))

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
    in_batches = states.held()  # skipped too, but not done: their answers come from live Batch API batches
    return {
        "job": settings.name, "model": settings.model, "rows_to_do": rows, "rows_done_before": skipped - in_batches,
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
        "currency": CURRENCY,
    }


def _mean_completion_tokens(checkpoint: Checkpoint, last: np.ndarray) -> float | None:
    """The mean completion length of the ok answers so far (each id's last record, the log of a live run too)."""
    tokens = answers = 0
    for records in checkpoint.chosen_records(last, ["status", "completion_tokens"], with_log=True):
        completions = records.column("completion_tokens").filter(pc.equal(records.column("status"), "ok"))
        tokens += pc.sum(completions).as_py() or 0
        answers += pc.count(completions).as_py()  # an answer without usage says nothing about its length
    return tokens / answers if answers else None


def format_estimate(e: dict[str, Any]) -> str:
    lines = [
        f"estimate for job {e['job']} ({e['model']}): {e['rows_to_do']} rows to send "
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
