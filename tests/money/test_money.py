"""Money you can trust: a budget that holds and is used, and totals that show what was paid. Over real HTTP."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from helpers import output_of, summary_of
from hypothesis import example, given
from hypothesis import strategies as st

from batch.checkpoint.writer import Checkpoint
from batch.errors import EXIT_BATCHES_LIVE
from batch.pricing import PRICES, cost_of, money, pricer_for

PLUS = {"name": "glm-4-plus"}  # 5 / 5 CNY per million tokens
JSON_PARAMS = {"max_tokens": 64, "response_format": {"type": "json_object"}}


def dense_rows(count: int) -> list[dict]:
    """Data prompts: numbers and commas, about 2 characters a token where the estimate assumes 4."""
    return [{"review_id": f"d{i}", "text": ",".join(str(i * 97 + k) for k in range(40))} for i in range(count)]


def status_of(run_cli, job) -> dict:
    code, out, err = run_cli("status", job, "--json")
    assert code == 0, err
    return json.loads(out)


def test_budget_at_concurrency_16_with_dense_prompts_holds_and_is_used(start_sim, make_job, run_cli):
    sim = start_sim(latency_ms=20)
    limit = 0.02
    job = make_job(sim, rows=dense_rows(120), model={**PLUS, "params": {"max_tokens": 8}},
                   limits={"concurrency": 16}, budget={"max_cost": limit})
    code, out, err = run_cli("run", job)
    assert code == 5, out + err
    spent = status_of(run_cli, job)["cost"]
    assert 0.9 * limit <= spent <= limit
    assert summary_of(job)["run"]["cost"] == pytest.approx(spent)
    assert "length" in summary_of(job)["run"]["finish_reasons"]  # answers at max_tokens: the worst case
    sent = sim.stats()["requests"]
    assert status_of(run_cli, job)["ok"] == sent

    sim.reset()
    assert run_cli("run", job)[0] == 5
    assert sim.stats()["requests"] == 0  # the same limit: nothing more fits


def test_estimate_bounds_the_cost_of_dense_prompts(sim, make_job, run_cli):
    job = make_job(sim, rows=dense_rows(10), model={**PLUS, "params": {"max_tokens": 8}})
    estimate = json.loads(run_cli("estimate", job, "--json")[1])
    assert run_cli("run", job)[0] == 0
    real = output_of(job)["cost"].sum()
    assert real <= estimate["cost_max"]
    assert estimate["prompt_tokens_max"] >= output_of(job)["prompt_tokens"].sum()
    assert "at most" in run_cli("estimate", job)[1]


def json_rows() -> list[dict]:
    return [{"review_id": f"j{i}", "text": f"review {i}" + (" [[badjson]]" if i % 2 else "")} for i in range(6)]


def test_retry_failed_keeps_what_earlier_answers_cost(sim, make_job, run_cli):
    job = make_job(sim, rows=json_rows(), model={**PLUS, "params": JSON_PARAMS}, output={"parse_json": True})
    assert run_cli("run", job)[0] == 1
    first = output_of(job).set_index("review_id")
    bad = first.index[first["error_class"] == "bad_json"]
    assert len(bad) == 3 and (first.loc[bad, "cost"] > 0).all()

    assert run_cli("run", job, "--retry-failed")[0] == 1  # the model answers prose again: paid again
    second = output_of(job).set_index("review_id")
    assert second.loc[bad, "cost"].tolist() == pytest.approx((2 * first.loc[bad, "cost"]).tolist())
    assert second.loc[bad, "total_tokens"].tolist() == (2 * first.loc[bad, "total_tokens"]).tolist()
    assert summary_of(job)["run"]["cost"] == pytest.approx(first.loc[bad, "cost"].sum())  # this run's own
    assert status_of(run_cli, job)["cost"] == pytest.approx(second["cost"].sum())
    assert second["cost"].sum() == pytest.approx(first["cost"].sum() + first.loc[bad, "cost"].sum())


def test_rows_paid_but_failed_count_in_the_summary_like_everywhere(sim, make_job, run_cli):
    job = make_job(sim, rows=json_rows(), model={**PLUS, "params": JSON_PARAMS}, output={"parse_json": True})
    code, out, _ = run_cli("run", job)
    assert code == 1
    result = output_of(job)
    run, status = summary_of(job)["run"], status_of(run_cli, job)
    assert run["cost"] == pytest.approx(result["cost"].sum()) == pytest.approx(status["cost"])
    assert run["total_tokens"] == result["total_tokens"].sum() == status["prompt_tokens"] + status["completion_tokens"]


def test_a_missing_total_falls_back_to_prompt_plus_completion(sim, make_job, run_cli):
    rows = [{"review_id": f"t{i}", "text": f"review {i} [[set:usage.total_tokens=null]]"} for i in range(20)]
    job = make_job(sim, rows=rows, model={"params": {"max_tokens": 8}}, budget={"max_total_tokens": 200})
    code, out, err = run_cli("run", job)
    assert code == 5, out + err
    status = status_of(run_cli, job)
    assert 0 < status["prompt_tokens"] + status["completion_tokens"] <= 200
    assert sim.stats()["requests"] < 20


def test_answers_without_usage_count_at_their_worst_case(sim, make_job, run_cli):
    rows = [{"review_id": f"u{i}", "text": f"review {i} [[set:usage=null]]"} for i in range(20)]
    job = make_job(sim, rows=rows, model={**PLUS, "params": {"max_tokens": 8}}, budget={"max_cost": 0.0016})
    code, out, err = run_cli("run", job)
    assert code == 5, out + err
    assert 0 < sim.stats()["requests"] < 20
    assert err.count("without token usage") == 1


def test_every_amount_printed_is_in_the_one_money_format(sim, make_job, run_cli):
    # The budget's own amounts (max_cost, a worst case counted for an answer without usage) as the summary,
    # the log, estimate and status print every other amount: batch.pricing.money's six decimals.
    rows = [{"review_id": f"u{i}", "text": f"review {i}" + (" [[set:usage=null]]" if i == 0 else "")}
            for i in range(20)]
    job = make_job(sim, rows=rows, model={**PLUS, "params": {"max_tokens": 8}}, limits={"concurrency": 1},
                   budget={"max_cost": 0.0016})
    code, out, err = run_cli("run", job)
    assert code == 5, out + err
    said = [out, err]
    for command in ("estimate", "status"):
        code, text, error = run_cli(command, job)
        assert code == 0, text + error
        said.append(text)
    printed = "\n".join(said)
    assert "of max_cost 0.001600 CNY" in out and "of max_cost 0.001600 CNY" in err
    assert "budget: max_cost 0.001600 CNY" in said[2]
    assert re.search(r"without token usage: the budget counts it at its worst case \(\d+ tokens, \d\.\d{6} CNY\)",
                     err), err
    amounts = re.findall(r"(\S+) CNY\b", printed)
    assert len(amounts) >= 6 and all(money(float(amount)) == amount for amount in amounts), amounts


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False))
@example(5e-7)  # six decimals round it to zero: its binary value is just below 5e-7
def test_money_is_close_to_the_amount_and_never_a_false_zero(amount):
    printed = money(amount)
    assert (float(printed) == 0) == (amount == 0)
    assert abs(float(printed) - amount) <= max(5e-7, amount * 0.05)
    assert money(float(printed)) == printed  # what it prints, read back, prints the same


def test_token_budget_counts_only_what_was_sent_and_the_cache_still_answers(sim, make_job, run_cli):
    rows = [{"review_id": f"c{i:02d}", "text": f"review {i % 10}"} for i in range(20)]  # rows 10-19 repeat 0-9
    job = make_job(sim, rows=rows, model={"params": {"max_tokens": 8}}, limits={"concurrency": 1},
                   budget={"max_total_tokens": 90})
    code, out, err = run_cli("run", job)
    assert code == 5, out + err
    sent = sim.stats()["requests"]
    assert 0 < sent < 10
    checkpoint = Checkpoint(job.parent / "out" / "result.checkpoint").read_all().to_pandas()
    answered = checkpoint.set_index("id")
    # Rows 10.. repeat rows the budget could pay for: the cache answers them, free, after the budget is reached.
    assert sorted(answered.index[answered["cache_hit"]]) == [f"c{i + 10:02d}" for i in range(sent)]
    used = int(checkpoint.loc[~checkpoint["cache_hit"], "total_tokens"].sum())
    assert f"used {used} of max_total_tokens 90" in out

    sim.reset()
    job = make_job(sim, rows=rows, model={"params": {"max_tokens": 8}}, limits={"concurrency": 1},
                   budget={"max_total_tokens": used + 60})
    run_cli("run", job)
    assert sim.stats()["requests"] >= 1  # a raised limit goes on


def test_a_cached_prose_answer_is_not_taken_by_a_parse_json_job(sim, make_job, run_cli, tmp_path):
    rows = [{"review_id": f"p{i}", "text": f"review {i}"} for i in range(4)]
    shared = {"path": str(tmp_path / "shared.sqlite")}
    plain = make_job(sim, rows=rows, cache=shared)
    assert run_cli("run", plain)[0] == 0
    sim.reset()
    parsing = make_job(sim, rows=rows, cache=shared,
                       output={"parse_json": True, "json_attempts": 1, "path": "json/result.parquet"})
    assert run_cli("run", parsing)[0] == 1
    assert sim.stats()["requests"] == 4  # asked again: prose does not pass a parse_json job's checks
    result = pd.read_parquet(tmp_path / "json" / "result.parquet")
    assert set(result["error_class"]) == {"bad_json"} and not result["cache_hit"].any()


def test_the_answer_cache_is_not_shared_between_servers(start_sim, make_job, run_cli, tmp_path):
    rows = [{"review_id": f"s{i}", "text": f"review {i}"} for i in range(4)]
    shared = {"path": str(tmp_path / "shared.sqlite")}
    assert run_cli("run", make_job(start_sim(), rows=rows, cache=shared))[0] == 0
    other = start_sim()
    assert run_cli("run", make_job(other, rows=rows, cache=shared, output={"path": "b/result.parquet"}))[0] == 0
    assert other.stats()["requests"] == 4


def test_tiny_costs_keep_their_precision(sim, make_job, run_cli):
    rows = [{"review_id": f"m{i}", "text": f"review {i}"} for i in range(3)]
    job = make_job(sim, rows=rows, model={"name": "my-model"}, pricing={"input": 0.001, "output": 0.001})
    code, out, _ = run_cli("run", job)
    assert code == 0
    real = output_of(job)["cost"].sum()
    assert 0 < real < 1e-6
    assert summary_of(job)["run"]["cost"] == pytest.approx(real)
    assert status_of(run_cli, job)["cost"] == pytest.approx(real)
    assert "cost: 0.000000" not in out and "cost so far: 0.000000" not in run_cli("status", job)[1]


def test_model_names_in_any_case_and_published_tier_boundaries():
    assert pricer_for("GLM-4-Plus") is PRICES["glm-4-plus"]
    glm = PRICES["glm-4.6"]
    assert cost_of(glm, 32_000, 200) == pytest.approx((32_000 * 2 + 200 * 8) / 1e6)  # [0, 32K] and [0, 0.2K]
    assert cost_of(glm, 32_000, 201) == pytest.approx((32_000 * 3 + 201 * 14) / 1e6)
    assert cost_of(glm, 32_001, 10) == pytest.approx((32_001 * 4 + 10 * 16) / 1e6)


def test_the_prompt_bound_counts_everything_a_message_carries():
    from batch.input.prompts import prompt_token_bound

    plain = [{"role": "user", "content": "1,2,3"}]
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "x" * 500}}]}
    assert prompt_token_bound(plain) == 8 + len("1,2,3") + 8
    assert prompt_token_bound([*plain, call]) > prompt_token_bound(plain) + 500


def test_an_online_run_beside_live_batches_never_spends_what_they_hold(start_sim, make_job, run_cli):
    """`mode: batch_api` leaves a live batch, then the job is run online: the batch's worst case (the provider's to
    answer, whatever the run's mode) stays held by the budget, so the online rows spend only what is left."""
    from batch.batch_api.ledger import ledger_at
    from batch.config import load_job
    from batch.preflight import settings_of

    sim = start_sim(batch_speed=0)  # no batch ends until the clock is advanced
    job = make_job(sim, rows=dense_rows(20), model={**PLUS, "params": {"max_tokens": 8}}, budget={"max_cost": 0.004},
                   batch_api={"poll_interval_s": 0.05})
    assert run_cli("run", job, "--mode", "batch_api", "--limit", "3")[0] == 6
    live = sum(entry.hold_cost for entry in ledger_at(settings_of(load_job(job)).locations).live())
    assert live > 0.001
    code, out, err = run_cli("run", job, "--mode", "online")
    # No row fits beside the batch: the run waits for it to end, as a Batch API run does (exit 6, not 5).
    assert code == EXIT_BATCHES_LIVE, out + err
    assert "live Batch API batches hold" in summary_of(job)["stopped"]
    spent = status_of(run_cli, job)["budget_cost"]
    assert spent > 0 and live + spent <= 0.004
