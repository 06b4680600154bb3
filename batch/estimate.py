"""`batch estimate`: what the rest of a job will take and cost, without sending a request."""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc

from batch.preflight import Settings
from batch.pricing import CURRENCY, cost_of, worst_cost
from batch.prompts import RowPromptError, estimate_tokens
from batch.reader import Skipped
from batch.status import open_input, row_states
from batch.writer import Checkpoint

TOKENIZER_NOTE = "approximation: 1 token per CJK character, 1 per 4 other characters, +4 per message"


def estimate(settings: Settings, retry_failed: bool = False) -> dict[str, Any]:
    """`settings` from batch.preflight.resolve: the max_tokens and the price that run uses."""
    spec, builder, max_tokens, pricer = settings.spec, settings.builder, settings.max_tokens, settings.pricer
    table = open_input(spec)
    _, states = row_states(spec, table)
    done_table = Checkpoint(spec.checkpoint_dir).snapshot()
    ok = done_table.filter(pc.equal(done_table.column("status"), "ok"))
    observed = pc.mean(ok.column("completion_tokens")).as_py() if ok.num_rows else None

    rows = skipped = unsendable = prompt_tokens = 0
    low = high = 0.0
    start = states.first_to_send(retry_failed)
    for row in table.rows(lambda seq, ids: states.to_send(seq, ids, retry_failed), start):
        if isinstance(row, Skipped):
            skipped += row.count
            continue
        try:
            tokens = estimate_tokens(builder.messages(row.values))
        except RowPromptError:
            unsendable += 1
            continue
        rows += 1
        prompt_tokens += tokens
        if pricer is not None:
            low += cost_of(pricer, tokens, round(observed or 0)) or 0.0
            high += worst_cost(pricer, tokens, max_tokens) if max_tokens else 0.0
    changed = states.counts(lambda: (ids for _, ids in table.id_batches([]))).changed
    return {
        "job": spec.name, "model": spec.model.name, "rows_to_do": rows, "rows_done_before": skipped,
        "rows_without_prompt": unsendable, "rows_changed": changed,
        "prompt_tokens_estimate": prompt_tokens, "tokenizer": TOKENIZER_NOTE,
        "max_tokens": max_tokens, "observed_completion_tokens_per_row": observed,
        "completion_tokens_expected": round(rows * observed) if observed is not None else None,
        "completion_tokens_max": rows * max_tokens if max_tokens else None,
        "cost_low": round(low, 6) if pricer else None,
        "cost_high": round(high, 6) if pricer and max_tokens else None,
        "currency": CURRENCY,
    }


def format_estimate(e: dict[str, Any]) -> str:
    lines = [
        f"estimate for job {e['job']} ({e['model']}): {e['rows_to_do']} rows to send "
        f"({e['rows_done_before']} done before, {e['rows_without_prompt']} without a prompt"
        + (f", {e['rows_changed']} whose prompt changed since answered" if e["rows_changed"] else "")
        + "); nothing was sent",
        f"  prompt tokens: ~{e['prompt_tokens_estimate']} ({e['tokenizer']})",
    ]
    answer = []
    if e["completion_tokens_max"] is not None:
        answer.append(f"at most {e['completion_tokens_max']} (max_tokens {e['max_tokens']} per row)")
    if e["observed_completion_tokens_per_row"] is not None:
        answer.append(f"~{e['completion_tokens_expected']} at the {e['observed_completion_tokens_per_row']:.1f} "
                      "per row answered so far")
    lines.append("  completion tokens: " + ("; ".join(answer) or "unknown: no max_tokens and no answers yet"))
    if e["cost_low"] is None:
        lines.append(f"  cost: unknown (no price for {e['model']}: add pricing: to the job)")
    else:
        high = f"{e['cost_high']:.6f}" if e["cost_high"] is not None else "unbounded (no max_tokens)"
        lines.append(f"  cost: {e['cost_low']:.6f} to {high} {e['currency']}")
    return "\n".join(lines)
