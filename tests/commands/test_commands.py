"""Everyday commands: status, validate, --limit, and which failures --retry-failed sends again."""

from __future__ import annotations

import json

from helpers import ROWS, output_of, start_run, summary_of, wait_for_answers


def test_status_before_during_and_after_a_run(start_sim, make_job, run_cli):
    sim = start_sim(latency_ms=200)
    job = make_job(sim, rows=ROWS, limits={"concurrency": 2})
    code, out, _ = run_cli("status", job)
    assert code == 0
    assert f"{len(ROWS)} rows: ok 0, failed 0, pending {len(ROWS)}" in out
    assert "running now: no" in out

    process = start_run(job)
    try:
        wait_for_answers(job, 3)
        code, out, _ = run_cli("status", job, "--json")
        live = json.loads(out)
        assert live["running_pid"] == process.pid
        assert live["ok"] >= 3 and live["pending"] == len(ROWS) - live["ok"]
        assert live["prompt_tokens"] > 0
        sim.reconfigure(latency_ms=0)  # the latency kept the run alive for the live status; the rest needs none
    finally:
        process.communicate(timeout=60)
    code, out, _ = run_cli("status", job)
    assert f"ok {len(ROWS)}, failed 0, pending 0" in out
    assert "running now: no" in out and "exit 0" in out
    assert sim.stats()["requests"] == len(ROWS)  # status sends nothing


def test_validate_checks_everything_and_sends_nothing(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS[:5])
    code, out, _ = run_cli("validate", job)
    assert code == 0
    assert "ok: 5 rows" in out
    bad = make_job(sim, rows=ROWS[:5], prompt={"template": "{missing}"})
    code, _, err = run_cli("validate", bad)
    assert code == 2 and "missing" in err
    assert sim.stats()["requests"] == 0


def test_limit_sends_only_the_first_n_pending_rows(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS[:10])
    code, out, _ = run_cli("run", job, "--limit", "3")
    assert code == 0  # what was asked was done; the rest stays pending
    assert "pending 7" in out
    assert sim.stats()["requests"] == 3
    assert not (job.parent / "out" / "result.parquet").exists()
    code, out, _ = run_cli("run", job, "--limit", "3")
    assert code == 0 and "pending 4" in out and "skipped (done before) 3" in out
    assert sim.stats()["requests"] == 6
    assert run_cli("run", job)[0] == 0
    assert sim.stats()["requests"] == 10
    assert len(output_of(job)) == 10


def test_retry_failed_resends_only_failures_that_may_succeed_now(sim, make_job, run_cli):
    rows = [{"review_id": "ok", "text": "fine"},
            {"review_id": "unsafe", "text": "bad [[error:400:1301]]"},
            {"review_id": "flaky", "text": "busy [[flaky:2]]"}]
    job = make_job(sim, rows=rows, retry={"max_attempts": 2})
    assert run_cli("run", job)[0] == 1
    assert summary_of(job)["run"]["cost_unknown_rows"] == 0  # a failure without an answer cost nothing
    status = json.loads(run_cli("status", job, "--json")[1])
    assert status["failed_by_class"] == {"content_filter": 1, "server_error": 1}
    code, _, _ = run_cli("run", job, "--retry-failed")
    assert code == 1  # the content-safety failure stands
    by_prompt = sim.stats()["by_prompt"]
    assert by_prompt["Classify: bad [[error:400:1301]]"] == 1  # never sent again
    assert by_prompt["Classify: busy [[flaky:2]]"] == 3
    result = output_of(job).set_index("review_id")
    assert result.loc["flaky", "status"] == "ok"
    assert result.loc["unsafe", "error_class"] == "content_filter"


def test_estimate_sends_nothing_and_bounds_the_real_cost(sim, make_job, run_cli):
    rows = [{"review_id": f"e{i}", "text": f"评论 {i}: the product works well"} for i in range(10)]
    job = make_job(sim, rows=rows, model={"name": "glm-4-plus"})
    code, out, _ = run_cli("estimate", job, "--json")
    assert code == 0
    before = json.loads(out)
    assert before["rows_to_do"] == 10 and before["rows_done_before"] == 0
    assert before["completion_tokens_max"] == 10 * 64
    assert before["observed_completion_tokens_per_row"] is None
    assert 0 <= before["cost_expected"] < before["cost_max"]
    assert sim.stats()["requests"] == 0

    assert run_cli("run", job, "--limit", "4")[0] == 0
    code, out, _ = run_cli("estimate", job)
    assert "6 rows to send (4 done before" in out
    assert "per row answered so far" in out and "CNY" in out

    assert run_cli("run", job)[0] == 0
    real = output_of(job)["cost"].sum()
    assert real <= before["cost_max"]  # the worst case really is an upper bound


def test_status_names_no_output_while_its_path_is_a_folder(sim, make_job, run_cli):
    """A folder at output.path is a mistake the run refuses, not a final output for status to point at."""
    job = make_job(sim, rows=ROWS[:2], output={"path": "out/result.parquet"})
    (job.parent / "out" / "result.parquet").mkdir(parents=True)
    code, out, err = run_cli("status", job, "--json")
    assert code == 0, err
    assert json.loads(out)["output"] is None


def test_a_run_ended_on_an_error_whose_start_could_not_be_read_back_says_no_start() -> None:
    """Its store failing when the run ended, the note kept the error alone: status said "started None"."""
    from batch.commands.status import _last_run_line

    ended = {"state": "error", "exit_code": 70, "started_at": None, "pid": None, "error": "the store failed"}
    assert _last_run_line(ended) == "stopped on an error (exit 70): the store failed"
    ended["started_at"] = "2026-12-07 15:00:00"
    assert _last_run_line(ended) == "stopped on an error (exit 70), started 2026-12-07 15:00:00: the store failed"
