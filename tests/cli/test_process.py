"""The real command as a separate process: progress under cron, Ctrl-C, and kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from helpers import ROWS, output_of, start_run, summary_of, wait_for_answers


def test_progress_lines_when_stdout_is_not_a_terminal(start_sim, make_job):
    sim = start_sim(latency_ms=100)
    job = make_job(sim, rows=ROWS[:12], limits={"concurrency": 2})
    done = subprocess.run([sys.executable, "-m", "batch", "run", str(job), "--progress-interval", "0.2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "progress" in done.stderr and "/12 rows" in done.stderr
    assert "ok 12, failed 0" in done.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_in_flight_requests_and_resumes_without_resending(start_sim, make_job, run_cli, sig):
    sim = start_sim(latency_ms=300)
    job = make_job(sim, rows=ROWS, limits={"concurrency": 4})
    process = start_run(job)
    try:
        wait_for_answers(job, 4)
        process.send_signal(sig)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert f"stopped: interrupted by {sig.name}" in out
    summary = summary_of(job)
    assert summary["job_totals"]["pending"] > 0
    sim.reconfigure(latency_ms=0)  # the latency kept requests in flight at the signal; the rest need none
    code, _, _ = run_cli("run", job)
    assert code == 0
    # In-flight requests were allowed to finish and were recorded: nothing was asked twice.
    assert sim.stats()["requests"] == len(ROWS)
    assert max(sim.stats()["by_prompt"].values()) == 1
    assert list(output_of(job)["review_id"]) == [r["review_id"] for r in ROWS]


def test_kill_9_at_any_point_costs_at_most_the_requests_in_flight(start_sim, make_job, run_cli):
    concurrency = 4
    sim = start_sim(latency_ms=20, latency_dist="lognormal", seed=7)
    job = make_job(sim, rows=[{"review_id": f"k{i:03d}", "text": f"kill {i}"} for i in range(300)],
                   limits={"concurrency": concurrency},
                   output={"checkpoint_rows": 7, "checkpoint_seconds": 0.3})  # parts and log both in play
    # Each run is killed once the checkpoint holds this many answers: in the log, in a part, or mid-compaction,
    # wherever the run happens to be then. Every run resumes the previous one; none can finish first.
    kill_at = (5, 50, 51, 120, 200)
    for answers in kill_at:
        process = start_run(job)
        try:
            wait_for_answers(job, answers)
            assert process.poll() is None, "the run ended before its kill"
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        finally:
            process.kill()
            process.communicate()
    kills = len(kill_at)
    code, _, err = run_cli("run", job)
    assert code == 0, err
    stats = sim.stats()
    resent = stats["requests"] - 300
    # Each kill may cost the requests that were in flight at that instant, never an answer that had arrived.
    assert 0 <= resent <= kills * concurrency
    assert sum(n - 1 for n in stats["by_prompt"].values()) == resent
    result = output_of(job)
    assert list(result["review_id"]) == [f"k{i:03d}" for i in range(300)]
    assert (result["status"] == "ok").all()
    for part in (job.parent / "out" / "result.checkpoint").glob("part-*.parquet"):
        pq.read_table(part)  # no corrupt part file
    print(f"kill -9 x{kills}: re-sent {resent} requests (bound {kills * concurrency})")


def test_a_row_still_retrying_at_sigint_stays_pending_not_failed(start_sim, make_job, run_cli):
    sim = start_sim(latency_ms=100)
    rows = [dict(r) for r in ROWS[:6]]
    rows[0]["text"] = "unlucky [[flaky:3]]"
    # Its fourth attempt, the first to succeed, cannot come before 3 x 0.5 s of backoff: long after the signal.
    job = make_job(sim, rows=rows, limits={"concurrency": 2},
                   retry={"max_attempts": 5, "initial_backoff_s": 0.5, "max_backoff_s": 0.5})
    process = start_run(job)
    try:
        wait_for_answers(job, 3)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, err
    flaky_requests = sim.stats()["by_prompt"]["Classify: unlucky [[flaky:3]]"]
    summary = summary_of(job)
    assert summary["job_totals"]["failed"] == 0
    # The long backoff kept the row retrying at the signal; the rerun need not wait as long.
    sim.reconfigure(latency_ms=0)
    job = make_job(sim, rows=rows, limits={"concurrency": 2},
                   retry={"max_attempts": 5, "initial_backoff_s": 0.01, "max_backoff_s": 0.01})
    code, _, err = run_cli("run", job)  # a plain rerun, no --retry-failed, finishes it
    assert code == 0, err
    assert sim.stats()["by_prompt"]["Classify: unlucky [[flaky:3]]"] == 4
    assert flaky_requests < 4


def test_arrears_mid_run_stops_the_job_keeps_the_checkpoint_and_a_later_run_resumes(start_sim, make_job, run_cli):
    concurrency = 8
    broke = start_sim(latency_ms=50, fail_after=30, fail_status=429, fail_code="1113")
    rows = [{"review_id": f"a{i:03d}", "text": f"arrears {i}"} for i in range(200)]
    job = make_job(broke, rows=rows, limits={"concurrency": concurrency},
                   retry={"max_attempts": 6, "initial_backoff_s": 1, "max_backoff_s": 5})
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "batch", "run", str(job)], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert done.returncode == 3
    assert "1113" in done.stderr and "account" in done.stderr
    refused = broke.stats()["by_status"]["429"]
    assert refused <= concurrency  # no 1113 is retried, and no new row is sent after the first
    summary = summary_of(job)
    assert summary["job_totals"]["ok"] == 30 and summary["job_totals"]["failed"] == 0

    topped_up = start_sim()
    job = make_job(topped_up, rows=rows, limits={"concurrency": concurrency})
    assert run_cli("run", job)[0] == 0
    assert topped_up.stats()["requests"] == 200 - 30
    print(f"1113: whole run incl. start-up {took:.2f} s, {refused} requests refused")


RUN_AND_REPORT_PANDAS = ("import sys\nfrom batch.cli import main\ncode = main(sys.argv[1:])\n"
                         "print('pandas imported:', 'pandas' in sys.modules)\nsys.exit(code)")


def test_a_run_keeps_pandas_out_parse_json_included(start_sim, make_job):
    sim = start_sim()
    rows = [{"review_id": f"p{i}", "text": f"review {i}"} for i in range(30)]
    job = make_job(sim, rows=rows, input_file="in.parquet")
    done = subprocess.run([sys.executable, "-c", RUN_AND_REPORT_PANDAS, "run", str(job)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pandas imported: False" in done.stdout  # pyarrow's probe for pandas found none
    result = output_of(job)
    assert list(result["review_id"]) == [r["review_id"] for r in rows] and set(result["status"]) == {"ok"}

    parsing = make_job(sim, rows=rows, input_file="in.parquet", model={"params": {
        "response_format": {"type": "json_object"}, "max_tokens": 200}},
        output={"path": "json/result.parquet", "parse_json": True})
    done = subprocess.run([sys.executable, "-c", RUN_AND_REPORT_PANDAS, "run", str(parsing)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pandas imported: False" in done.stdout  # the reply columns are built in Arrow, a window at a time
    result = pq.read_table(parsing.parent / "json" / "result.parquet").to_pylist()
    assert len(result) == 30 and {r["label"] for r in result} <= {"positive", "negative", "neutral"}


RUN_AS_A_LIBRARY = """import sys
import pyarrow as pa
before = pa.default_memory_pool().backend_name
import batch
result = batch.run(sys.argv[1], progress=False)
import pandas
print(result.exit_code, before, pa.default_memory_pool().backend_name)
"""


def test_a_program_that_runs_a_job_keeps_its_allocator_and_imports(sim, make_job):
    job = make_job(sim, rows=ROWS[:5])
    done = subprocess.run([sys.executable, "-c", RUN_AS_A_LIBRARY, str(job)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    code, before, after = done.stdout.split()
    assert code == "0" and after == before != "system"  # the command line's settings are its own
