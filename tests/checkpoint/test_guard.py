"""Cron safety: one live run per job, a dead run's lock taken over, no resume under changed settings."""

from __future__ import annotations

import signal

from helpers import ROWS, output_of, start_run, wait_for_answers


def test_second_run_while_one_is_alive_exits_4_and_a_dead_runs_lock_is_taken_over(start_sim, make_job, run_cli):
    sim = start_sim(latency_ms=300)
    job = make_job(sim, rows=ROWS, limits={"concurrency": 2})
    first = start_run(job)
    try:
        wait_for_answers(job, 2)
        code, _, err = run_cli("run", job)
        assert code == 4
        assert f"another run of this job is alive (pid {first.pid})" in err
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        first.kill()
        first.communicate()
    sim.reconfigure(latency_ms=0)  # the latency kept the first run alive; the rerun needs none
    code, _, err = run_cli("run", job)  # the kernel dropped the dead run's lock
    assert code == 0, err
    assert len(output_of(job)) == len(ROWS)


def test_resume_with_changed_settings_is_refused_unless_forced(sim, make_job, run_cli):
    rows = ROWS[:3]
    job = make_job(sim, rows=rows, retry={"max_attempts": 1})
    assert run_cli("run", job)[0] == 0
    job = make_job(sim, rows=rows, prompt={"template": "Summarise: {text}"}, model={"params": {"max_tokens": 9}})
    code, _, err = run_cli("run", job)
    assert code == 2
    assert "template: 'Classify: {text}' -> 'Summarise: {text}'" in err
    assert "params" in err and "--force" in err
    assert "Traceback" not in err
    code, _, err = run_cli("run", job, "--force")
    assert code == 0, err
    assert sim.stats()["requests"] == 3  # forced: the answers already paid for are kept


def test_output_folder_that_cannot_be_created_is_a_clear_error(sim, make_job, run_cli, tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    job = make_job(sim, rows=ROWS[:2], output={"path": "blocker/result.parquet"})
    code, _, err = run_cli("run", job)
    assert code == 2
    assert err.startswith("batch: error: ") and "checkpoint folder" in err
    assert "Traceback" not in err
    assert sim.stats()["requests"] == 0
