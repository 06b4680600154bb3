"""Prices, cost per row, budgets that hold, and Zhipu's parameter ranges."""

from __future__ import annotations

import pytest
from helpers import output_of, summary_of

from batch.pricing import PRICES, Price, cost_of

ROWS = [{"review_id": f"r{i}", "text": f"a review about product {i}"} for i in range(10)]


def test_cost_per_row_from_the_built_in_price(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, model={"name": "glm-4-plus"})  # 5 / 5 CNY per million tokens
    code, out, _ = run_cli("run", job)
    assert code == 0
    result = output_of(job)
    assert result["cost"].tolist() == pytest.approx((result["total_tokens"] * 5 / 1e6).tolist())
    summary = summary_of(job)
    assert summary["run"]["cost"] == pytest.approx(result["cost"].sum(), abs=1e-6)
    assert "CNY" in out


def test_job_pricing_overrides_and_unknown_models_cost_null_with_one_warning(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, model={"name": "my-finetune"})
    code, out, err = run_cli("run", job)
    assert code == 0
    assert output_of(job)["cost"].isna().all()
    assert err.count("no known price for model my-finetune") == 1
    assert "10 rows of unknown price" in out

    job = make_job(sim, rows=ROWS, model={"name": "my-finetune"}, pricing={"input": 1, "output": 3},
                   output={"path": "out2/result.parquet"})
    assert run_cli("run", job)[0] == 0
    import pandas as pd
    result = pd.read_parquet(job.parent / "out2" / "result.parquet")
    expected = (result["prompt_tokens"] * 1 + result["completion_tokens"] * 3) / 1e6
    assert result["cost"].tolist() == pytest.approx(expected.tolist())


def test_tiered_and_cached_prices():
    glm = PRICES["glm-4.6"]
    assert cost_of(glm, 1000, 100) == pytest.approx((1000 * 2 + 100 * 8) / 1e6)
    assert cost_of(glm, 1000, 500) == pytest.approx((1000 * 3 + 500 * 14) / 1e6)
    assert cost_of(glm, 40_000, 100) == pytest.approx((40_000 * 4 + 100 * 16) / 1e6)
    assert cost_of(glm, 1000, 100, cached_tokens=600) == pytest.approx((400 * 2 + 600 * 0.4 + 100 * 8) / 1e6)
    assert cost_of(None, 10, 10) is None
    assert Price(1, 1).cost(10, 10, cached_tokens=5) == pytest.approx(20 / 1e6)  # no cache price: all fresh


def test_budget_stops_before_it_can_be_exceeded_and_a_raised_budget_resumes(sim, make_job, run_cli):
    budget = 0.0012  # a few requests' worst case at 5 CNY per million tokens
    job = make_job(sim, rows=ROWS, model={"name": "glm-4-plus"}, limits={"concurrency": 2},
                   budget={"max_cost": budget})
    code, out, err = run_cli("run", job)
    assert code == 5
    assert "budget reached" in err and "budget reached" in out
    summary = summary_of(job)
    answered = summary["job_totals"]["ok"]
    assert 0 < answered < len(ROWS)
    assert summary["run"]["cost"] <= budget
    assert sim.stats()["requests"] == answered  # nothing sent that the budget could not cover

    job = make_job(sim, rows=ROWS, model={"name": "glm-4-plus"}, limits={"concurrency": 2},
                   budget={"max_cost": 1})
    assert run_cli("run", job)[0] == 0
    assert sim.stats()["requests"] == len(ROWS)


def test_token_budget_counts_every_run(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, budget={"max_total_tokens": 300})
    assert run_cli("run", job)[0] == 5
    first = tokens_used(job)
    assert 0 < first <= 300
    assert run_cli("run", job)[0] == 5
    assert tokens_used(job) <= 300  # the tokens of the first run still count


def tokens_used(job) -> int:
    from batch.checkpoint.writer import Checkpoint
    records = Checkpoint(job.parent / "out" / "result.checkpoint").read_all().to_pandas()
    return int(records.drop_duplicates("id", keep="last")["total_tokens"].fillna(0).sum())  # each id's last


@pytest.mark.parametrize(("budget", "message"), [
    ({"max_cost": 1}, "needs model.params.max_tokens"),
])
def test_budget_without_max_tokens_is_a_config_error(sim, make_job, run_cli, budget, message):
    job = make_job(sim, rows=ROWS, model={"name": "glm-4-plus", "params": {"max_tokens": None}},
                   budget=budget)
    code, _, err = run_cli("run", job)
    assert code == 2 and message in err
    assert sim.stats()["requests"] == 0


def test_budget_on_a_model_without_price_is_a_config_error(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, model={"name": "my-finetune"}, budget={"max_cost": 1})
    code, _, err = run_cli("run", job)
    assert code == 2 and "needs a price for model my-finetune" in err


@pytest.mark.parametrize(("param", "value", "message"), [
    ("temperature", 1.5, "params.temperature 1.5 is outside Zhipu's range [0.0, 1.0]"),
    ("top_p", 0, "params.top_p 0 is outside Zhipu's range [0.01, 1.0]"),
])
def test_zhipu_parameter_ranges(make_job, run_cli, monkeypatch, param, value, message):
    monkeypatch.setenv("ZHIPU_API_KEY", "unused-key-0000")
    job = make_job(None, rows=ROWS, model={"provider": "zhipu", "params": {param: value}})
    code, _, err = run_cli("run", job)
    assert code == 2
    assert message in err
