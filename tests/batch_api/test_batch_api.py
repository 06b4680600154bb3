"""mode: batch_api against the simulator's Batch API: submitted, collected, merged by custom_id, and nothing
submitted twice or lost, whatever stops a run (kill -9 at every step, expiry, cancel, error lines, mode switches)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import output_of, wait_until
from hypothesis import given
from hypothesis import strategies as st

from batch.batch_api.ledger import Ledger
from batch.checkpoint.writer import Checkpoint, _wal_table
from batch.errors import EXIT_BATCHES_LIVE
from batch.input.prompts import prompt_token_bound
from batch.simulator import SimulatorThread, answer_for

ROOT = Path(__file__).resolve().parents[2]


def rows(count: int, marked: dict[int, str] | None = None) -> list[dict[str, Any]]:
    marked = marked or {}
    return [{"review_id": f"r{i:05d}", "text": f"review number {i}" + marked.get(i, "")} for i in range(count)]


def batch_job(make_job: Callable[..., Path], sim: SimulatorThread, count: int = 30, per_file: int = 10,
              marked: dict[int, str] | None = None, **overrides: Any) -> Path:
    return make_job(sim, rows=rows(count, marked), mode="batch_api",
                    batch_api={"max_requests_per_file": per_file, "poll_interval_s": 0.05}, **overrides)


def submitted_twice(sim: SimulatorThread) -> list[str]:
    return sim.stats()["batch_api"]["custom_ids_submitted_twice"]


def ledger_events(job: Path) -> list[dict[str, Any]]:
    ledger = Ledger(job.parent / "out" / "result.checkpoint")
    return [json.loads(ledger.store.read_bytes(key)) for key in ledger.event_keys()]


def drop_event(job: Path, kind: str, number: int) -> None:
    """The state a kill before a step was recorded leaves: the ledger without that step of file `number`."""
    ledger = Ledger(job.parent / "out" / "result.checkpoint")
    for key in ledger.event_keys():
        event = json.loads(ledger.store.read_bytes(key))
        if event["event"] == kind and event["file"] == number:
            ledger.store.delete(key)


def every_record(job: Path) -> pa.Table:
    """Every record the checkpoint holds (parts and log), in write order."""
    folder = job.parent / "out" / "result.checkpoint"
    wal = _wal_table(folder / "wal.jsonl", lambda _m: None, keep_damaged=False)
    return pa.concat_tables([Checkpoint(folder).read_all(), wal])


def records_per_id(job: Path) -> Counter[str]:
    return Counter(every_record(job).column("id").to_pylist())


def expected_reply(text: str) -> str:
    return answer_for("glm-4-flash", [{"role": "user", "content": f"Classify: {text}"}])


def run_until_done(run_cli: Callable[..., tuple[int, str, str]], sim: SimulatorThread, job: Path,
                   *extra: str) -> int:
    """Cron, with the simulator's batch clock moved on between runs: run until the job no longer exits 6."""
    for _ in range(20):
        code, _, _ = run_cli("run", job, *extra)
        if code != EXIT_BATCHES_LIVE:
            return code
        sim.advance(3600)
    raise AssertionError("the job was still waiting for batches after 20 runs")


def test_cron_runs_submit_then_collect_into_the_same_records(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0)
    job = batch_job(make_job, sim, count=25)
    code, out, _ = run_cli("run", job)
    assert code == EXIT_BATCHES_LIVE, out
    assert "3 Batch API batches still being worked on" in out
    assert not (job.parent / "out" / "result.parquet").exists()
    code, out, _ = run_cli("status", job)
    assert "pending 25" in out and "(file 1)" in out and "failed:" not in out
    assert "Batch API: 25 pending rows in 3 live batches" in out
    code, out, _ = run_cli("run", job)  # nothing finished yet: still 6, nothing submitted again
    assert code == EXIT_BATCHES_LIVE
    assert sim.stats()["batch_api"]["batches_created"] == 3
    sim.advance(3600)
    code, out, _ = run_cli("run", job)
    assert code == 0, out
    frame = output_of(job)
    assert len(frame) == 25 and set(frame["status"]) == {"ok"}
    assert list(frame["response"]) == [expected_reply(f"review number {i}") for i in range(25)]
    assert frame["latency_s"].isna().all() and (frame["attempts"] == 1).all()
    assert frame["request_id"].notna().all() and (frame["cost"] == 0).all()  # glm-4-flash is free, in batch too
    assert frame["prompt_tokens"].notna().all()
    assert submitted_twice(sim) == []
    assert sim.stats()["batch_api"]["files_kept"] == 0  # inputs, outputs deleted once merged
    assert sim.stats()["requests"] == 0  # not one row sent online
    assert set(records_per_id(job).values()) == {1}
    code, out, _ = run_cli("run", job)  # a complete job reruns as a no-op
    assert code == 0 and sim.stats()["batch_api"]["batches_created"] == 3


@pytest.mark.parametrize("dialect", ["/v1", "/api/paas/v4"])
def test_wait_polls_until_every_batch_is_done(dialect, start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=200)
    job = batch_job(make_job, sim, count=30, model={"base_url": sim.url.removesuffix("/v1") + dialect})
    code, out, err = run_cli("run", job, "--wait")
    assert code == 0, out
    assert "Batch API: 30 of 30 lines answered, 0 batches still at the provider" in err  # not a terminal: log lines
    assert list(output_of(job)["response"]) == [expected_reply(f"review number {i}") for i in range(30)]
    assert submitted_twice(sim) == [] and sim.stats()["batch_api"]["files_kept"] == 0


def test_a_streamed_job_is_answered_in_files_without_stream_in_its_lines(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=200, batch_arrears_after=0)  # the first create refused: its request file stays here
    job = batch_job(make_job, sim, count=12, model={"stream": True}, limits={"timeout_s": 10})
    assert run_cli("run", job)[0] == 3
    lines = (job.parent / "out" / "result.checkpoint" / "batches" / "file-000001.jsonl").read_text().splitlines()
    bodies = [json.loads(line)["body"] for line in lines]
    assert len(bodies) == 10 and not any("stream" in body or "stream_options" in body for body in bodies)
    assert bodies[0]["max_tokens"] == 64  # the job's other params are there
    sim.reconfigure(batch_arrears_after=None)
    code, out, _ = run_cli("run", job, "--wait")
    assert code == 0, out
    assert list(output_of(job)["response"]) == [expected_reply(f"review number {i}") for i in range(12)]


def test_replies_are_checked_against_the_json_schema_as_online(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=200)
    schema = {"type": "object", "required": ["score"], "additionalProperties": False,
              "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}}}
    job = batch_job(make_job, sim, count=6, marked={4: " [[badjson:9]]"}, output={"json_schema": schema})
    code, out, _ = run_cli("run", job, "--wait")
    assert code == 1, out
    frame = output_of(job).set_index("review_id")
    assert frame.loc["r00004", "error_class"] == "bad_json"
    assert frame.loc["r00004", "error"].startswith("the reply does not match output.json_schema at $.score")
    assert frame.drop(index="r00004")["score"].between(1, 5).all()


def test_budget_reserves_a_file_worst_case_at_the_batch_price(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0)
    job = batch_job(make_job, sim, count=30, per_file=30, model={"name": "glm-4-plus"}, budget={"max_cost": 0.002})
    code, out, _ = run_cli("run", job)
    assert code == EXIT_BATCHES_LIVE, out  # the file stopped growing at the row that would not fit beside it
    (file,) = [e for e in ledger_events(job) if e["event"] == "file"]
    # glm-4-plus: 5 CNY per million tokens online, 2.5 through the Batch API; a row's worst case is its prompt's
    # bound and max_tokens (64)
    worst = [(prompt_token_bound([{"role": "user", "content": f"Classify: review number {i}"}]) + 64) * 5e-6
             for i in range(30)]

    def rows_that_fit(factor: float) -> int:
        return next(k for k in range(31) if k == 30 or sum(worst[:k + 1]) * factor > 0.002)

    assert file["rows"] == rows_that_fit(0.5) > rows_that_fit(1.0)
    assert file["hold_cost"] == pytest.approx(sum(worst[:file["rows"]]) / 2)
    assert len(sim.stats()["batch_api"]["custom_ids"]) == file["rows"] < 30
    sim.advance(3600)
    code, out, _ = run_cli("run", job)  # answered far below the worst case: the budget lets more rows go
    assert len(sim.stats()["batch_api"]["custom_ids"]) > file["rows"]
    assert submitted_twice(sim) == []
    frame = every_record(job).to_pandas()
    assert frame["cost"].sum() <= 0.002 and (frame["cost"] > 0).all()


def test_mode_switch_never_sends_a_row_of_a_live_batch_online(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0, batch_rate=5)
    job = batch_job(make_job, sim, count=20, per_file=20)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    code, out, _ = run_cli("run", job, "--mode", "online")
    assert code == EXIT_BATCHES_LIVE, out
    assert sim.stats()["requests"] == 0  # every row sits in the live batch
    sim.advance(3)  # validating 1 s, then 5 lines a second: some lines answered, then cancelled
    code, out, _ = run_cli("cancel", job)
    assert code == 0 and "cancelled 1 batch;" in out
    sim.advance(3600)
    code, out, _ = run_cli("run", job, "--mode", "online")  # collects the partial results, the rest online
    assert code == 0, out
    frame = output_of(job)
    assert list(frame["response"]) == [expected_reply(f"review number {i}") for i in range(20)]
    answered_in_batch = sim.stats()["batch_api"]["lines_answered"]
    assert 0 < answered_in_batch < 20
    assert sim.stats()["requests"] == 20 - answered_in_batch  # each row answered once, one way or the other
    assert set(records_per_id(job).values()) == {1}


def test_cancel_counts_only_the_batches_it_cancelled_and_names_those_already_ended(start_sim, make_job, run_cli):
    # Files of 10, 10 and 5 rows; the first one made a batch fails validation. One line a second: after 7 s the
    # 5-line batch has completed, the other is in progress.
    sim = start_sim(batch_speed=0, batch_rate=1, batch_finalizing_s=0.1, batch_fail_validations=1)
    job = batch_job(make_job, sim, count=25, per_file=10)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    sim.advance(7)
    states = Counter(b["status"] for b in provider_batches(sim))
    assert states == {"failed": 1, "completed": 1, "in_progress": 1}
    code, out, err = run_cli("cancel", job)
    assert code == 0, out + err
    head, *listed = out.splitlines()
    assert "cancelled 1 batch;" in head and "2 batches already ended or ending (1 completed, 1 failed)" in head, head
    assert sorted(line.split(":")[0].strip() for line in listed) == ["already ended or ending"] * 2 + ["cancelled"]
    assert Counter(b["status"] for b in provider_batches(sim)) == {"failed": 1, "completed": 1, "cancelling": 1}
    assert [e["file"] for e in ledger_events(job) if e["event"] == "cancel"] == [
        int(line.split("(file ")[1].split(")")[0]) for line in listed if line.strip().startswith("cancelled")]
    code, out, err = run_cli("cancel", job)  # asked again: nothing more is cancelled
    assert code == 0, out + err
    assert "nothing to cancel; 3 batches already ended or ending (1 cancelling, 1 completed, 1 failed)" in out, out
    sim.advance(3600)
    assert run_until_done(run_cli, sim, job) == 0
    frame = output_of(job)
    assert list(frame["response"]) == [expected_reply(f"review number {i}") for i in range(25)]
    assert submitted_twice(sim) == []


def test_expired_batch_keeps_its_partial_output_and_resubmits_the_rest(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0, batch_rate=4, batch_expire_s=3, batch_finalizing_s=0.1)
    job = batch_job(make_job, sim, count=12, per_file=12)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    sim.advance(10)  # validating 1 s, ~8 lines answered, then expired
    code, out, err = run_cli("run", job)  # merges the partial output, resubmits the expired lines in a new file
    assert code == EXIT_BATCHES_LIVE, out
    assert "Batch API: 8 of 12 lines answered" in err  # the 4 expired lines were not answered
    assert len(every_record(job)) == 8
    files = [e for e in ledger_events(job) if e["event"] == "file"]
    assert [f["rows"] for f in files] == [12, 4]
    code = run_until_done(run_cli, sim, job)  # the new batch's 4 lines are done in 2.1 s, before it expires
    assert code == 0
    frame = output_of(job)
    assert len(frame) == 12 and set(frame["status"]) == {"ok"}
    assert sorted(frame["attempts"].tolist()) == [1] * 8 + [2] * 4  # attempts count submissions
    assert submitted_twice(sim) == []


def test_rows_expired_once_too_often_fail_as_batch_expired_and_retry_failed_sends_them_again(
        start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0, batch_rate=4, batch_expire_s=3, batch_finalizing_s=0.1)
    job = batch_job(make_job, sim, count=12, per_file=12, retry={"max_attempts": 1})
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    sim.advance(10)  # 8 lines answered, the other 4 expired: their one submission is used up
    code, out, _ = run_cli("run", job)
    assert code == 1, out
    frame = output_of(job)
    assert sorted(frame["error_class"].dropna()) == ["batch_expired"] * 4
    assert run_cli("run", job, "--retry-failed")[0] == EXIT_BATCHES_LIVE  # in a new batch
    sim.advance(10)
    assert run_cli("run", job)[0] == 0
    assert set(output_of(job)["status"]) == {"ok"} and submitted_twice(sim) == []


def test_error_lines_fail_the_row_or_go_back_to_pending(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0)
    job = batch_job(make_job, sim, count=10, marked={2: " [[error:400:1301]]", 5: " [[flaky:1]]"})
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    sim.advance(3600)
    code, out, _ = run_cli("run", job)  # row 5's 5xx line goes back to pending and into a new batch
    assert code == EXIT_BATCHES_LIVE, out
    sim.advance(3600)
    code, out, _ = run_cli("run", job)
    assert code == 1, out  # complete, one row failed
    frame = output_of(job).set_index("review_id")
    assert frame.loc["r00002", "error_class"] == "content_filter" and frame.loc["r00002", "attempts"] == 1
    assert frame.loc["r00005", "status"] == "ok" and frame.loc["r00005", "attempts"] == 2
    assert submitted_twice(sim) == []


def test_arrears_at_create_stop_the_job_with_exit_3(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0, batch_arrears_after=1)
    job = batch_job(make_job, sim, count=20)
    code, out, err = run_cli("run", job)
    assert code == 3, out + err
    assert "1113" in out
    assert sim.stats()["batch_api"]["batches_created"] == 1


def test_poll_faults_are_retried(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0, batch_p_poll_500=0.3, batch_p_poll_503=0.2)
    job = batch_job(make_job, sim, count=30, retry={"max_attempts": 8})
    assert run_until_done(run_cli, sim, job) == 0
    assert sim.stats()["batch_api"]["poll_faults"] > 0
    assert len(output_of(job)) == 30 and submitted_twice(sim) == []


def test_a_control_plane_outage_is_waited_out_with_backoff(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0, batch_down_for_calls=4)  # upload, its retries, ... answer 503 (code 1305)
    job = batch_job(make_job, sim, count=20, retry={"max_attempts": 6})
    assert run_until_done(run_cli, sim, job) == 0
    assert sim.stats()["batch_api"]["files_uploaded"] == 2 and sim.stats()["batch_api"]["batches_created"] == 2
    assert len(output_of(job)) == 20 and submitted_twice(sim) == []


def test_an_outage_longer_than_the_retries_stops_with_exit_3_and_the_next_run_goes_on(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0, batch_down_for_calls=3)
    job = batch_job(make_job, sim, count=20, retry={"max_attempts": 2})
    code, out, _ = run_cli("run", job)
    assert code == 3 and "the Batch API upload failed" in out
    assert run_until_done(run_cli, sim, job) == 0
    assert len(output_of(job)) == 20 and submitted_twice(sim) == []
    assert sim.stats()["batch_api"]["files_kept"] == 0


@pytest.mark.parametrize("metadata", ["echoed", "not echoed"])
def test_a_batch_whose_id_was_lost_is_found_not_created_again(metadata, start_sim, make_job, run_cli):
    """The state a kill between create and its record leaves: the batch exists, the ledger does not name it; found
    by its metadata, or by its input file where the provider does not echo metadata."""
    sim = start_sim(batch_speed=0, batch_no_metadata=metadata == "not echoed")
    job = batch_job(make_job, sim, count=20)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    drop_event(job, "created", 2)
    sim.advance(3600)
    assert run_until_done(run_cli, sim, job) == 0
    assert sim.stats()["batch_api"]["batches_created"] == 2
    assert submitted_twice(sim) == [] and len(output_of(job)) == 20


def test_an_upload_whose_id_was_lost_is_used_not_uploaded_again(start_sim, make_job, run_cli):
    """The state a kill between an upload and its record leaves: the file is at the provider, the ledger has no id."""
    sim = start_sim(batch_speed=0, batch_arrears_after=1)
    job = batch_job(make_job, sim, count=20)
    assert run_cli("run", job)[0] == 3  # file 2 uploaded, its batch refused (arrears)
    drop_event(job, "uploaded", 2)
    sim.reconfigure(batch_arrears_after=None)  # the account is paid up
    sim.advance(3600)
    assert run_until_done(run_cli, sim, job) == 0
    assert sim.stats()["batch_api"]["files_uploaded"] == 2
    assert sim.stats()["batch_api"]["files_kept"] == 0
    assert submitted_twice(sim) == [] and len(output_of(job)) == 20


def test_a_checkpoint_whose_ledger_is_the_older_batches_jsonl_is_taken_on(start_sim, make_job, run_cli):
    """A checkpoint an older batch wrote holds the ledger's steps as lines of batches.jsonl: a run takes its live
    batches on from there (never made again), and records its own steps as objects beside it."""
    sim = start_sim(batch_speed=0)
    job = batch_job(make_job, sim, count=20)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    folder = job.parent / "out" / "result.checkpoint"
    older = "".join(json.dumps(event) + "\n" for event in ledger_events(job))
    (folder / "batches.jsonl").write_text(older)
    for event in (folder / "ledger").iterdir():
        event.unlink()
    sim.advance(3600)
    assert run_until_done(run_cli, sim, job) == 0
    assert sim.stats()["batch_api"]["batches_created"] == 2
    assert submitted_twice(sim) == [] and len(output_of(job)) == 20
    assert (folder / "batches.jsonl").read_text() == older
    steps = {event["event"] for event in ledger_events(job)}
    assert "file" not in steps and {"merged", "cleaned"} <= steps  # taken on where they were, not built again


def test_job_file_batch_api_settings_are_checked(make_job, run_cli):
    job = make_job(None, mode="batch_api", batch_api={"max_requests_per_file": 60000})
    code, _, err = run_cli("validate", job)
    assert code == 2 and "batch_api.max_requests_per_file" in err
    job = make_job(None, mode="batch", batch_api={"poll_intervall_s": 1})
    code, _, err = run_cli("validate", job)
    assert code == 2 and "mode" in err and "did you mean 'poll_interval_s'" in err


def test_estimate_shows_the_batch_price_beside_the_online_one(make_job, run_cli):
    job = make_job(None, model={"name": "glm-4-plus"})
    code, out, _ = run_cli("estimate", job, "--json")
    found = json.loads(out)
    assert found["cost_expected_batch_api"] == pytest.approx(found["cost_expected"] / 2)
    assert found["cost_max_batch_api"] == pytest.approx(found["cost_max"] / 2)
    code, out, _ = run_cli("estimate", job)
    assert "Batch API" in out


# -- kill -9 at every step, then reruns until done --------------------------------------------------

def _spawn(job: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "batch", "run", str(job), *args], cwd=job.parent, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _count(job: Path, kind: str) -> int:
    return sum(1 for e in ledger_events(job) if e["event"] == kind)


def _wal_lines(job: Path) -> int:
    wal = job.parent / "out" / "result.checkpoint" / "wal.jsonl"
    return wal.read_bytes().count(b"\n") if wal.exists() else 0


def _records_written(job: Path) -> bool:
    folder = job.parent / "out" / "result.checkpoint"
    return _wal_lines(job) > 0 or any(folder.glob("part-*.parquet"))


# Each is the first sign of the step, and stays true after it (the kill lands in it or just after): the exact
# states a kill leaves between two steps are made by hand in the tests above (lost file id, lost batch id).
KILL_POINTS: dict[str, Callable[[Path, SimulatorThread], bool]] = {
    "building": lambda job, sim: _count(job, "file") >= 2,  # the second file recorded, uploaded next
    "uploading": lambda job, sim: sim.stats()["batch_api"]["files_uploaded"] >= 3,
    "creating": lambda job, sim: _count(job, "uploaded") >= 3,
    "polling": lambda job, sim: _count(job, "created") == 4,
    "downloading": lambda job, sim: _count(job, "state") >= 1,
    "merging": lambda job, sim: _records_written(job),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_at_any_step_then_reruns_answer_every_row_exactly_once(point, start_sim, make_job, run_cli):
    finished_first = point in ("downloading", "merging")
    sim = start_sim(batch_speed=0)
    count = 4000 if finished_first else 40
    job = batch_job(make_job, sim, count=count, per_file=count // 4 if finished_first else 10)
    if finished_first:  # the batches exist and are done: the killed run downloads and merges them
        assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
        sim.advance(3600)
    reached = KILL_POINTS[point]
    process = _spawn(job, "--wait")
    deadline = time.monotonic() + 60
    try:  # polled finely: each step takes milliseconds, and the kill should land in the step or just after it
        while not reached(job, sim):
            assert process.poll() is None, f"the run ended before it reached {point}"
            assert time.monotonic() < deadline, f"the run never reached {point}"
            time.sleep(0.002)
    finally:
        process.send_signal(signal.SIGKILL)  # kill -9, or no process left behind by a failed wait
        process.wait(10)
    sim.advance(3600)
    assert run_until_done(run_cli, sim, job) == 0
    frame = output_of(job)
    assert len(frame) == count and set(frame["status"]) == {"ok"}
    assert submitted_twice(sim) == []
    assert set(records_per_id(job).values()) == {1}  # every row answered exactly once
    assert sim.stats()["requests"] == 0
    assert sim.stats()["batch_api"]["files_kept"] == 0  # an upload whose id was lost is used, then deleted
    assert pa.array(frame["attempts"]).to_pylist() == [1] * count


def test_a_ledger_line_cut_short_is_dropped_and_the_next_step_recorded_whole(tmp_path):
    from batch.batch_api.ledger import LEDGER_NAME

    # A checkpoint from before the steps were objects of their own: its batches.jsonl, the last line cut short.
    built = {"event": "file", "file": 1, "tag": "t", "rows": 1, "bytes": 1, "records_before": 0, "hold_cost": 0.0,
             "hold_tokens": 0, "at": 0.0}
    (tmp_path / LEDGER_NAME).write_text(json.dumps(built) + "\n" + '{"event": "uploaded", "fi')  # a kill mid-line
    ledger = Ledger(tmp_path)
    assert ledger.files[1].file_id is None  # the step cut short was not taken
    ledger.note("uploaded", 1, file_id="file-1")
    assert Ledger(tmp_path).files[1].file_id == "file-1"
    assert [json.loads(ledger.store.read_bytes(key))["event"] for key in ledger.event_keys()] == ["uploaded"]


def test_each_ledger_step_is_an_object_of_its_own_made_exclusively(tmp_path, caplog):
    """Two writers of one ledger (a zombie run and its successor) never write over each other's steps, and a step
    whose object is damaged is skipped with a warning, as a damaged line was."""
    from batch.storage.memory import MemoryStore

    store = MemoryStore()
    built = {"tag": "t", "rows": 1, "bytes": 1, "records_before": 0, "hold_cost": 0.0, "hold_tokens": 0}
    first, second = Ledger(tmp_path, store), Ledger(tmp_path, store)
    first.note("file", 1, **built)
    second.note("file", 2, **built)
    first.note("uploaded", 1, file_id="file-a")
    second.note("uploaded", 2, file_id="file-b")  # its number was taken: the next one
    store.inject("create", store.calls["create"] + 1, "torn")
    second.note("created", 2, batch_id="batch-b")  # torn as it was written
    assert [op for op, _ in store.writes] == ["create"] * 5
    read = Ledger(tmp_path, store)
    assert (read.files[1].file_id, read.files[2].file_id, read.files[2].batch_id) == ("file-a", "file-b", None)
    assert "ledger/00000005.json is damaged: skipped" in caplog.text


@given(st.lists(st.sampled_from(["zombie", "new holder", "zombie records", "new holder records"]), max_size=30))
def test_two_writers_of_one_ledger_never_build_files_of_one_number(steps):
    """A holder paused past its lease (which knows only the files of the ledger as it read it) and the run that took
    the lease over claim their new files' numbers in one ledger: whatever order they claim and record in, no number is
    given to both, and a number claimed but not recorded yet (the budget cut the file short) stays its claimer's."""
    import tempfile

    from batch.storage.memory import MemoryStore

    store = MemoryStore()
    built = {"tag": "t", "rows": 1, "bytes": 1, "records_before": 0, "hold_cost": 0.0, "hold_tokens": 0}
    with tempfile.TemporaryDirectory() as folder:
        writers = {"zombie": Ledger(Path(folder), store), "new holder": Ledger(Path(folder), store)}
        given_to: dict[int, str] = {}
        for step in steps:
            who, records = step.removesuffix(" records"), step.endswith(" records")
            number = writers[who].claim_number()
            assert given_to.setdefault(number, who) == who, f"file {number} given to both"
            if records:
                writers[who].note("file", number, **built)
        assert sorted(Ledger(Path(folder), store).files) == sorted(
            n for ledger in writers.values() for n in ledger.files)


def test_a_files_rows_are_spooled_locally_then_kept_whole_in_the_store(tmp_path):
    from batch.batch_api.ledger import custom_id
    from batch.storage.memory import MemoryStore

    store = MemoryStore()
    ledger = Ledger(tmp_path, store)
    writer = ledger.rows_writer(1)
    for seq in range(10_000):  # several slices
        writer.add(seq, f"id{seq}", custom_id(1, f"id{seq}"), 0, 1, 10)
    assert store.list() == []  # nothing in the store before the file is whole
    writer.close()
    assert store.writes == [("replace", "batches/file-000001.rows.parquet")]
    assert ledger.rows_of(1, ["seq"]).column("seq").to_pylist() == list(range(10_000))
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []  # the spool is gone


def test_a_rows_file_the_ledger_names_but_gone_is_one_config_error(tmp_path):
    from batch.batch_api.ledger import Ledger
    from batch.errors import ConfigError

    ledger = Ledger(tmp_path)
    ledger.note("file", 1, tag="t", rows=1, bytes=1, records_before=0, hold_cost=0.0, hold_tokens=0)
    with pytest.raises(ConfigError, match=r"file-000001.rows.parquet: .* Batch API file 1, .* \(it is missing\)"):
        ledger.submissions(5)
    ledger.store.replace(ledger.rows_key(1), lambda sink: sink.write(b"junk"))
    with pytest.raises(ConfigError, match=r"Batch API file 1, .* cannot be read \(.*Parquet"):
        ledger.submissions(5)


def test_a_rows_file_written_over_by_another_run_shifts_no_other_files_rows_and_never_crashes_the_merge(
        start_sim, make_job, run_cli):
    """A run of an older batch taken over while paused could write its own one-row file over the new holder's rows
    file of the same number (its batch of ten lines stays live). The next runs find each file's rows by what its rows
    file holds: the other files merge whole, the lines that answer no row of the written-over file are skipped with a
    warning (their rows go into a new batch), and the job ends, with no internal error."""
    sim = start_sim(batch_speed=0)
    job = batch_job(make_job, sim, count=30, per_file=10)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    ledger = Ledger(job.parent / "out" / "result.checkpoint")
    one_row = ledger.rows_of(2).slice(0, 1)
    buffer = pa.BufferOutputStream()
    pq.write_table(one_row, buffer)
    ledger.store.replace(ledger.rows_key(2), lambda sink: sink.write(buffer.getvalue().to_pybytes()))
    sim.advance(3600)
    code, _, err = run_cli("run", job)
    assert code in (0, EXIT_BATCHES_LIVE), err
    assert "file-000002.rows.parquet holds 1 row where the ledger recorded 10: written over" in err
    assert err.count("answers no row of the file") == 9
    assert run_until_done(run_cli, sim, job) == 0
    frame = output_of(job)
    assert len(frame) == 30 and set(frame["status"]) == {"ok"}


# -- ids the provider no longer knows (a restart that lost its state, a new key, files deleted by hand) ----------

def provider_batches(sim: SimulatorThread) -> list[dict[str, Any]]:
    """The batches the simulator holds, as GET /batches answers them (newest first)."""
    with urllib.request.urlopen(sim.url + "/batches?limit=100") as answer:
        return json.loads(answer.read())["data"]


def lost_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "the provider no longer knows" in line]


def test_batches_the_provider_forgot_are_submitted_again_once(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0)
    job = batch_job(make_job, sim, count=25)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    forgotten = {b["id"] for b in provider_batches(sim)}
    sim.forget()  # a restart that lost every file and batch
    code, out, err = run_cli("run", job)
    assert code == EXIT_BATCHES_LIVE, out + err  # the rows are in new batches, not stopped with exit 3
    warnings = lost_warnings(err)
    assert len(warnings) == 3 and {w.split("batch ")[-1].split(";")[0] for w in warnings} == forgotten
    assert all("rows are pending again" in w for w in warnings)
    assert "(file 4)" in out and "(file 1)" not in out  # exit 6 lists the new batches only
    sim.advance(3600)
    code, out, err = run_cli("run", job)
    assert code == 0, out + err
    assert lost_warnings(err) == []
    frame = output_of(job)
    assert list(frame["response"]) == [expected_reply(f"review number {i}") for i in range(25)]
    assert set(records_per_id(job).values()) == {1} and submitted_twice(sim) == []
    assert sim.stats()["batch_api"]["files_kept"] == 0


def test_forgotten_batches_go_online_in_online_mode_and_cancel_finds_nothing_to_cancel(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0)
    job = batch_job(make_job, sim, count=20)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    sim.forget(provider_batches(sim)[0]["id"])  # the newest: file 2
    code, out, err = run_cli("cancel", job)
    assert code == 0, out + err
    assert len(lost_warnings(err)) == 1 and "cancelled 1 batch; 1 batch the provider no longer knows" in out
    assert "  cancelled: batch " in out and "(file 1)" in out and "  lost: batch " in out and "(file 2)" in out
    sim.forget()
    code, out, err = run_cli("run", job, "--mode", "online")
    assert code == 0, out + err
    assert len(lost_warnings(err)) == 1
    assert list(output_of(job)["response"]) == [expected_reply(f"review number {i}") for i in range(20)]
    assert sim.stats()["requests"] == 20 and set(records_per_id(job).values()) == {1}


def test_an_upload_the_provider_forgot_before_its_batch_was_made_is_uploaded_again(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0, batch_arrears_after=1)
    job = batch_job(make_job, sim, count=20)
    assert run_cli("run", job)[0] == 3  # file 2 uploaded, its batch refused (arrears)
    (upload,) = [e["file_id"] for e in ledger_events(job) if e["event"] == "uploaded" and e["file"] == 2]
    sim.forget(upload)  # deleted by hand to get under the file cap
    sim.reconfigure(batch_arrears_after=None)
    code, out, err = run_cli("run", job)
    assert code == EXIT_BATCHES_LIVE, out + err
    assert [f"upload, file {upload}" in w for w in lost_warnings(err)] == [True]
    assert sim.stats()["batch_api"]["batches_created"] == 2
    sim.advance(3600)
    assert run_cli("run", job)[0] == 0
    assert len(output_of(job)) == 20 and set(records_per_id(job).values()) == {1} and submitted_twice(sim) == []


def test_a_result_file_the_provider_forgot_sends_only_its_rows_again(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0)
    job = batch_job(make_job, sim, count=12, per_file=12, marked={3: " [[error:400:1301]]"})
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    sim.advance(3600)
    (batch,) = provider_batches(sim)
    sim.forget(batch["output_file_id"])  # the error file (row 3's answer) is still there
    code, out, err = run_cli("run", job)
    assert code == EXIT_BATCHES_LIVE, out + err
    assert [batch["output_file_id"] in w for w in lost_warnings(err)] == [True]
    sim.advance(3600)
    assert run_cli("run", job)[0] == 1
    frame = output_of(job).set_index("review_id")
    assert frame.loc["r00003", "error_class"] == "content_filter" and (frame["status"] == "ok").sum() == 11
    assert set(records_per_id(job).values()) == {1}


# -- the input edited while its rows sit in live batches ---------------------------------------------------

def write_input(job: Path, table: list[dict[str, Any]]) -> None:
    pd.DataFrame(table).to_csv(job.parent / "reviews.csv", index=False)


def test_rows_deleted_moved_and_appended_while_batches_are_live_merge_by_id(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0)
    job = batch_job(make_job, sim, count=60, per_file=20)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    table = rows(60)
    edited = table[10:30][::-1] + table[45:] + table[30:45] + rows(65)[60:]  # 0-9 deleted, moved, 5 appended
    write_input(job, edited)
    code, out, err = run_cli("run", job)
    assert code == EXIT_BATCHES_LIVE, out + err
    assert len(sim.stats()["batch_api"]["custom_ids"]) == 65  # only the 5 appended rows in a new batch
    sim.advance(3600)
    code, out, err = run_cli("run", job)
    assert code == 0, out + err
    frame = output_of(job)
    assert frame["review_id"].tolist() == [r["review_id"] for r in edited]
    assert frame["response"].tolist() == [expected_reply(r["text"]) for r in edited]
    assert "not in the input: 10 answers for rows no longer in the input" in out
    assert submitted_twice(sim) == [] and set(records_per_id(job).values()) == {1}
    assert sim.stats()["requests"] == 0


@pytest.fixture(scope="module")
def two_live_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ledger folder with two live files: rows id0-id24 (file 1) and id25-id40 (file 2), in that input order."""
    from batch.batch_api.ledger import custom_id

    folder = tmp_path_factory.mktemp("ledger")
    ledger = Ledger(folder)
    for number, ids in ((1, range(0, 25)), (2, range(25, 41))):
        writer = ledger.rows_writer(number)
        for seq in ids:
            writer.add(seq, f"id{seq}", custom_id(number, f"id{seq}"), 0, 1, 10)
        writer.close()
        ledger.note("file", number, tag="t", rows=len(ids), bytes=1, records_before=0, hold_cost=0.0, hold_tokens=0)
    return folder


@given(kept=st.lists(st.integers(0, 40), unique=True, max_size=30), appended=st.integers(0, 5),
       random=st.randoms())
def test_the_rows_of_live_files_are_found_in_an_edited_input_by_id(two_live_files, kept, appended, random):
    """Whatever rows were deleted, moved or appended, each row of a live file is found where its id is now."""
    from batch.batch_api.ledger import Ledger

    ledger = Ledger(two_live_files)
    edited = [f"id{i}" for i in kept] + [f"new{i}" for i in range(appended)]
    random.shuffle(edited)
    ledger.place(lambda: iter([pa.array(edited[:7], pa.string()), pa.array(edited[7:], pa.string())]))
    now = {row_id: seq for seq, row_id in enumerate(edited)}
    assert ledger.files[1].seqs.tolist() == [now.get(f"id{i}", -1) for i in range(0, 25)]
    assert ledger.files[2].seqs.tolist() == [now.get(f"id{i}", -1) for i in range(25, 41)]


# -- result files that do not hold what the batch reports ---------------------------------------------------

def test_a_short_or_torn_result_file_is_downloaded_again_and_no_answered_row_is_sent_again(
        start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0, batch_short_downloads=1, batch_torn_downloads=1)
    job = batch_job(make_job, sim, count=20, per_file=20)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    sim.advance(3600)
    code, out, err = run_cli("run", job)
    assert code == 0, out + err
    assert "holds 10 lines where the batch reports 20" in err and "ends in a line cut short" in err
    assert sim.stats()["batch_api"]["cut_downloads"] == 2
    assert len(sim.stats()["batch_api"]["custom_ids"]) == 20 and submitted_twice(sim) == []
    frame = output_of(job)
    assert list(frame["response"]) == [expected_reply(f"review number {i}") for i in range(20)]
    assert (frame["attempts"] == 1).all() and set(records_per_id(job).values()) == {1}


def test_a_result_file_short_at_every_download_stops_with_exit_3_and_the_next_run_merges_it(
        start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0, batch_short_downloads=3)
    job = batch_job(make_job, sim, count=20, per_file=20)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    sim.advance(3600)
    code, out, err = run_cli("run", job)
    assert code == 3 and "holds 10 lines where the batch reports 20" in out, out + err
    assert not every_record(job).num_rows  # nothing merged from a file known to be short
    code, out, err = run_cli("run", job)
    assert code == 0, out + err
    assert len(sim.stats()["batch_api"]["custom_ids"]) == 20 and set(records_per_id(job).values()) == {1}


def test_a_wait_run_stopped_by_short_result_files_says_what_is_true_of_its_batches(start_sim, make_job, run_cli):
    """Run with --wait: no "or use --wait"; every batch was polled before a merge stopped the run, and one that has
    ended is said to have ended, its results still to be merged, not "created" nor "still being worked on"."""
    sim = start_sim(batch_speed=0, batch_short_downloads=3)
    job = batch_job(make_job, sim, count=20, per_file=10)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    sim.advance(3600)
    code, out, err = run_cli("run", job, "--wait")
    assert code == 3 and "holds 5 lines where the batch reports 10" in out, out + err
    assert "--wait" not in out and "still being worked on" not in out and ": created," not in out, out
    assert "2 Batch API batches ended at the provider, the results not merged yet: the next run downloads " \
           "them" in out, out
    assert out.count("): completed, 10 rows, 10 completed, 0 failed") == 2, out
    code, out, err = run_cli("run", job)
    assert code == 0, out + err
    assert len(sim.stats()["batch_api"]["custom_ids"]) == 20 and set(records_per_id(job).values()) == {1}


def test_an_ended_batch_that_names_no_output_file_is_reported_not_resubmitted(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0, batch_hide_output_polls=2)
    job = batch_job(make_job, sim, count=10, per_file=10)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    sim.advance(3600)
    code, out, err = run_cli("run", job)
    assert code == EXIT_BATCHES_LIVE, out + err
    (warning,) = [line for line in err.splitlines() if "but no output file" in line]
    assert "is completed with 10 completed lines but no output file: not merged yet" in warning
    code, out, err = run_cli("run", job)  # still hidden once, then named: merged
    assert code == EXIT_BATCHES_LIVE and "but no output file" in err
    assert run_cli("run", job)[0] == 0
    assert len(sim.stats()["batch_api"]["custom_ids"]) == 10 and set(records_per_id(job).values()) == {1}


# -- the budget: answers without usage, and exit 5 only when nothing more fits --------------------------------

def batch_worst_case(i: int, max_tokens: int) -> float:
    """Row i's worst case at glm-4-plus's Batch API price (2.5 CNY per million tokens, in and out)."""
    return (prompt_token_bound([{"role": "user", "content": f"Classify: review number {i} [[set:usage=null]]"}])
            + max_tokens) * 2.5e-6


def test_answers_without_usage_count_at_their_worst_case_and_the_budget_is_never_crossed(
        start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0)
    job = batch_job(make_job, sim, count=30, per_file=30, marked={i: " [[set:usage=null]]" for i in range(30)},
                    model={"name": "glm-4-plus", "params": {"max_tokens": 8}}, budget={"max_cost": 0.0008})
    code, out, err = run_cli("run", job)
    assert code == EXIT_BATCHES_LIVE, out + err  # what is held may come back: not the budget's stop yet
    (file,) = [e for e in ledger_events(job) if e["event"] == "file"]
    sim.advance(3600)
    code, out, err = run_cli("run", job)
    assert code == 5, out + err  # counted at their worst case, the answers leave no room for another row
    assert err.count("without token usage") == 1
    assert len(sim.stats()["batch_api"]["custom_ids"]) == file["rows"]
    assert sum(batch_worst_case(i, 8) for i in range(file["rows"])) <= 0.0008


def test_wait_submits_more_as_live_batches_give_back_what_they_held_and_exit_5_means_nothing_fits(
        start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=200)
    job = batch_job(make_job, sim, count=30, per_file=30, model={"name": "glm-4-plus"}, budget={"max_cost": 0.002})
    code, out, err = run_cli("run", job, "--wait")
    files = [e for e in ledger_events(job) if e["event"] == "file"]
    assert len(files) > 1 and sum(f["rows"] for f in files) > files[0]["rows"]  # more rows once the first ended
    frame = every_record(job).to_pandas()
    assert frame["cost"].sum() <= 0.002
    if code == 5:  # the last rows did not fit: nothing was live any more when it said so
        assert "budget reached: spent" in out and len(frame) < 30
        spent = float(out.split("budget reached: spent ")[1].split(" ")[0])
        assert spent == pytest.approx(frame["cost"].sum(), abs=1e-6)
    else:
        assert code == 0 and len(frame) == 30, out + err


# -- the provider's file cap, and files refused at validation -------------------------------------------------

def test_wait_at_the_file_cap_waits_for_the_jobs_own_batches_to_free_files(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=200, batch_max_files=3)  # /v1: an input file stays until the job deletes it
    job = batch_job(make_job, sim, count=50)
    code, out, err = run_cli("run", job, "--wait")
    assert code == 0, out + err
    assert "waiting for the job's live batches to end and free their files" in err and "file limit reached" in err
    assert list(output_of(job)["response"]) == [expected_reply(f"review number {i}") for i in range(50)]
    assert submitted_twice(sim) == [] and set(records_per_id(job).values()) == {1}
    assert sim.stats()["batch_api"]["files_kept"] == 0


def test_a_run_at_the_file_cap_exits_6_naming_only_the_batches_that_exist(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0, batch_max_files=3)
    job = batch_job(make_job, sim, count=40)
    code, out, err = run_cli("run", job)
    assert code == EXIT_BATCHES_LIVE, out + err
    assert "3 Batch API batches still being worked on" in out and "not created yet" not in out
    assert "1 Batch API request file (10 rows) not made a batch yet" in out
    assert run_until_done(run_cli, sim, job) == 0
    assert len(output_of(job)) == 40 and submitted_twice(sim) == [] and set(records_per_id(job).values()) == {1}


def test_an_upload_refused_with_no_batch_of_the_job_to_wait_for_stops_with_exit_3(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0, batch_max_files=0)
    job = batch_job(make_job, sim, count=10)
    code, out, err = run_cli("run", job, "--wait")
    assert code == 3 and "file limit reached" in out, out + err


@pytest.mark.parametrize("limit", ["lines", "bytes"])
def test_a_file_too_big_for_the_provider_is_split_not_resubmitted_unchanged(limit, start_sim, make_job, run_cli):
    over = {"batch_max_lines": 8} if limit == "lines" else {"batch_max_bytes": 1500}  # a line is ~200 bytes
    sim = start_sim(batch_speed=0, batch_limits_at_validation=True, **over)
    job = batch_job(make_job, sim, count=20, per_file=20)
    assert run_until_done(run_cli, sim, job) == 0
    files = [f["rows"] for f in ledger_events(job) if f["event"] == "file"]
    if limit == "lines":
        assert files == [20, 10, 10, 5, 5, 5, 5]
    else:
        assert files[0] == 20 and max(files[1:]) <= 10 and sum(files) > 40
    assert list(output_of(job)["response"]) == [expected_reply(f"review number {i}") for i in range(20)]
    assert set(records_per_id(job).values()) == {1}


def test_a_file_refused_at_validation_carries_the_providers_reason_into_its_rows_error(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0, batch_fail_validations=1)
    job = batch_job(make_job, sim, count=5, retry={"max_attempts": 1})
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    sim.advance(3600)
    code, out, err = run_cli("run", job)
    assert code == 1, out + err
    frame = output_of(job)
    assert set(frame["error_class"]) == {"batch_failed"}
    assert frame["error"].str.contains("simulated_refusal: the simulator refused this file").all()


def test_estimate_and_read_results_show_the_rows_in_live_batches_as_such(start_sim, make_job, run_cli):
    import batch

    sim = start_sim(batch_speed=0)
    job = batch_job(make_job, sim, count=15, per_file=10)
    assert run_cli("run", job, "--limit", "10")[0] == EXIT_BATCHES_LIVE
    found = json.loads(run_cli("estimate", job, "--json")[1])
    assert (found["rows_to_do"], found["rows_done_before"], found["rows_in_batches"]) == (5, 0, 10)
    assert "10 in live Batch API batches" in run_cli("estimate", job)[1]
    frame = batch.read_results(job)
    assert frame["status"].tolist() == ["in_batch"] * 10 + ["pending"] * 5
    assert frame["response"].isna().all()


def test_a_row_edited_while_its_batch_is_live_is_never_paired_with_the_old_answer(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0)
    job = batch_job(make_job, sim, count=6, per_file=10)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    table = rows(6)
    table[0] = {**table[0], "text": table[0]["text"] + " EDITED"}
    write_input(job, table)
    sim.advance(3600)
    code, out, err = run_cli("run", job)  # merges the batch: row 0's answer is to its old text
    assert code == EXIT_BATCHES_LIVE, out + err  # so row 0 goes again, in a batch of its own
    assert "all runs: ok 5, failed 0, pending 1" in out, out  # paid for (this run: ok 6), but not row 0's answer
    sim.advance(3600)
    code, out, err = run_cli("run", job)
    assert code == 0, out + err
    frame = output_of(job)
    assert frame["response"].tolist() == [expected_reply(r["text"]) for r in table]
    assert (frame["status"] == "ok").all()


def test_a_request_file_killed_while_spooled_is_removed_and_its_rows_built_again(start_sim, make_job, run_cli):
    """kill -9 while a request file is being written to its spool (batches/.file-000001.jsonl.tmp): the next run, in
    either mode, removes the spool (never uploaded, never left), and the rows go into a file built whole."""
    sim = start_sim(batch_speed=0)
    count = 30_000
    job = batch_job(make_job, sim, count=count, per_file=count)
    folder = job.parent / "out" / "result.checkpoint"
    spool = folder / "batches" / ".file-000001.jsonl.tmp"
    process = _spawn(job)
    try:
        wait_until(lambda: spool.exists() and spool.stat().st_size > 0 or process.poll() is not None,
                   "the first request file's spool being written")
        assert process.poll() is None, "the run ended before its spool was seen"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    assert spool.exists() and sim.stats()["batch_api"]["files_uploaded"] == 0
    assert [e for e in ledger_events(job) if e["event"] == "file"] == []  # never named: it was half written
    leftovers = [path.name for path in folder.rglob(".*.tmp")]
    assert leftovers, "the kill left no spool to clean"
    # An online rerun (which builds no file) of a few of the rows: the spool and every temp file are gone.
    pd.DataFrame(rows(5)).to_csv(job.parent / "reviews.csv", index=False)
    code, out, err = run_cli("run", job, "--mode", "online")
    assert code == 0, out + err
    assert list(folder.rglob(".*.tmp")) == [] and list((folder / "batches").iterdir()) == []
    # A Batch API rerun builds its file whole, from the rows, and uploads that.
    pd.DataFrame(rows(20)).to_csv(job.parent / "reviews.csv", index=False)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    assert sim.stats()["batch_api"]["files_uploaded"] == 1 and len(sim.stats()["batch_api"]["custom_ids"]) == 15
    sim.advance(3600)
    assert run_cli("run", job)[0] == 0
    assert list(output_of(job)["response"]) == [expected_reply(f"review number {i}") for i in range(20)]


def test_a_files_objects_the_ledger_never_named_are_deleted_by_the_next_run(start_sim, make_job, run_cli):
    """A kill after a request file was kept but before the ledger named it leaves its objects (batches/file-N.*):
    the next run deletes them (the file's rows are pending, and built again when a file is)."""
    sim = start_sim(batch_speed=0)
    job = batch_job(make_job, sim, count=10, per_file=10)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    batches = job.parent / "out" / "result.checkpoint" / "batches"
    for name in ("file-000002.jsonl", "file-000002.rows.parquet"):
        (batches / name).write_bytes(b"{}\n")
    (batches / ".file-000002.jsonl.0a1b2c3d4e5f.tmp").write_bytes(b"{")
    sim.advance(3600)
    assert run_cli("run", job)[0] == 0
    left = sorted(path.name for path in batches.iterdir())
    assert not [name for name in left if "file-000002" in name or name.endswith(".tmp")], left
    assert len(output_of(job)) == 10
