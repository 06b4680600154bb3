"""The Plan is the resolved job: a run reads its typed values, made once by the preflight, never the job file again
(docs/architecture.md, "Settings are resolved once"; tests/test_resolved_once.py reads the code for the same rule)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from helpers import ROWS, output_of
from hypothesis import given
from hypothesis import strategies as st

import batch
from batch.config import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_STREAM_TIMEOUT_S, JobSpec, check_job, load_job
from batch.errors import ConfigError
from batch.plan import Limits, Locations
from batch.preflight import preflight, resolve
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


def limits_as_written(spec) -> tuple[dict, set[str]]:
    return spec.limits.model_dump(), set(spec.limits.model_fields_set)


@given(stream=st.booleans(), timeout=st.one_of(st.none(), st.floats(0.5, 5000)),
       idle=st.one_of(st.none(), st.floats(0.5, 5000)))
def test_checking_a_job_changes_nothing_of_it(stream, timeout, idle):
    """check_job validates, and the preflight resolves the timeouts from what the job says: the JobSpec is the same
    after any number of checks, and resolves to the same limits each time."""
    limits = {**({"timeout_s": timeout} if timeout is not None else {}),
              **({"idle_timeout_s": idle} if idle is not None else {})}
    spec = JobSpec.model_validate({"name": "j", "input": {"path": "in.csv"}, "prompt": {"template": "{text}"},
                                   "model": {"name": "glm-4-flash", "stream": stream}, "output": {"path": "o.parquet"},
                                   "limits": limits})
    before = limits_as_written(spec)
    try:
        check_job(spec)
    except ConfigError:
        return
    check_job(spec)
    assert limits_as_written(spec) == before
    first = resolve(spec).limits
    assert resolve(spec).limits == first and limits_as_written(spec) == before
    expected_timeout = timeout if timeout is not None else DEFAULT_STREAM_TIMEOUT_S if stream else 120
    assert first.timeout_s == expected_timeout
    assert first.idle_timeout_s == (None if not stream else idle if idle is not None
                                    else min(DEFAULT_IDLE_TIMEOUT_S, expected_timeout))


def test_validate_and_run_resolve_the_same_limits_of_a_job_loaded_once(sim, make_job):
    """A job loaded (and checked) once, then changed in Python before it runs: what it resolves to follows what it
    says now, as if loaded afresh; no default a check filled in is taken for the user's."""
    job = make_job(sim, rows=ROWS[:3], model={"stream": True}, limits={"timeout_s": None})
    job.write_text(job.read_text().replace("  timeout_s: null\n", ""))
    spec = load_job(job)
    assert spec.limits.idle_timeout_s is None and "timeout_s" not in spec.limits.model_fields_set
    validated = preflight(spec)  # `batch validate`
    assert (validated.limits.timeout_s, validated.limits.idle_timeout_s) == (DEFAULT_STREAM_TIMEOUT_S,
                                                                              DEFAULT_IDLE_TIMEOUT_S)
    assert preflight(spec).limits == validated.limits
    spec.model.stream = False  # as the job file would say with stream: false
    plan = preflight(spec)
    assert (plan.limits.timeout_s, plan.limits.idle_timeout_s) == (120, None)
    assert batch.run(spec).exit_code == 0 and len(output_of(job)) == 3
