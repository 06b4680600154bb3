"""The Plan is the resolved job: a run reads its typed values, made once by the preflight, never the job file again
(docs/architecture.md, "Settings are resolved once"; tests/test_resolved_once.py reads the code for the same rule)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from helpers import ROWS, output_of

from batch.config import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_STREAM_TIMEOUT_S
from batch.plan import Limits, Locations
from batch.preflight import preflight
from batch.runner import RunOptions, run_job


def test_the_plan_holds_the_resolved_values(sim, make_job, tmp_path):
    job = make_job(sim, model={"stream": True}, limits={"requests_per_minute": 600},
                   budget={"max_total_tokens": 10_000}, cache={"path": "shared/answers.sqlite"},
                   output={"parse_json": True, "json_columns": ["label"]})
    plan = preflight(job)
    folder = tmp_path / "out" / "result.checkpoint"
    assert plan.locations == Locations(job, tmp_path / "reviews.csv", tmp_path / "out" / "result.parquet", folder,
                                       folder, tmp_path / "shared" / "answers.sqlite", cache_shared=True)
    # A streamed answer's limits, filled in by the job file's defaults; the job's own values as written.
    assert plan.limits == Limits(4, 600, None, 10, min(DEFAULT_IDLE_TIMEOUT_S, 10), 8 * 1024 * 1024, None, 30)
    assert (plan.budget.max_total_tokens, plan.budget.max_cost) == (10_000, None)
    assert (plan.output.id_column, plan.output.keep_columns, plan.output.json_columns) == \
        ("review_id", ("text",), ("label",))
    assert (plan.model, plan.mode, plan.stream, plan.name) == ("glm-4-flash", "online", True, "test-job")
    assert preflight(job, mode="batch_api").mode == "batch_api"  # the run's mode: --mode over the job file's
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.limits.concurrency = 1  # type: ignore[misc]


def test_the_plan_takes_defaults_where_the_job_sets_none(sim, make_job, tmp_path):
    job = make_job(sim, model={"stream": True}, limits={"timeout_s": None}, input={"id_column": None},
                   output={"keep_columns": []})
    job.write_text(job.read_text().replace("  timeout_s: null\n", ""))
    plan = preflight(job)
    assert (plan.limits.timeout_s, plan.limits.idle_timeout_s) == (DEFAULT_STREAM_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S)
    assert plan.output.id_column == "row_id" and plan.input_id_column is None
    assert plan.locations.cache == tmp_path / "out" / "result.checkpoint" / "answers.sqlite"
    assert not plan.locations.cache_shared  # the checkpoint's own: locked for its run
    assert preflight(make_job(sim)).limits.idle_timeout_s is None  # not streamed: no silence limit


@pytest.mark.asyncio
async def test_a_run_reads_the_plan_not_the_job_file(sim, make_job, tmp_path):
    """A job file changed after its preflight changes nothing in the run: it answers, names, counts and writes where
    and as the plan says."""
    plan = preflight(make_job(sim, rows=ROWS))
    elsewhere = tmp_path / "elsewhere"
    spec = plan.spec
    spec.name, spec.model.name, spec.mode = "other", "other-model", "batch_api"
    spec.output.path, spec.input.path = elsewhere / "result.parquet", elsewhere / "in.csv"
    spec.output.keep_columns, spec.input.id_column = [], None
    spec.limits.concurrency, spec.retry.max_attempts = 4096, 100
    summary = await run_job(plan, RunOptions(tty=False))
    assert summary["exit_code"] == 0 and summary["mode"] == "online"
    assert (summary["job"], summary["model"]) == ("test-job", "glm-4-flash")
    result = output_of(plan.locations.job_file)
    assert len(result) == len(ROWS) and set(result.columns) >= {"review_id", "text"}
    assert set(result["model"]) == {"glm-4-flash"} and (result["attempts"] == 1).all()
    assert not elsewhere.exists() and not Path(summary["output"]).is_relative_to(elsewhere)
