"""`attempts` counts every request sent for a row, across runs and modes, and the budget counts answers without
usage at their worst case across runs. Over real HTTP to the simulator, which counts the requests it received for
each prompt (online, and lines of the Batch API batches it created)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from helpers import interrupt, output_of, start_run, summary_of, wait_for_answers, wait_until

from batch.checkpoint.writer import Checkpoint, _wal_table
from batch.errors import EXIT_BATCHES_LIVE
from batch.input.prompts import prompt_token_bound
from batch.simulator import SimulatorThread

PLUS = {"name": "glm-4-plus"}  # 5 / 5 CNY per million tokens online, half through the Batch API
NO_USAGE = " [[set:usage=null]]"


def requests_received(sim: SimulatorThread, text: str) -> int:
    """The requests the simulator received for the row whose text is `text` (prompt "Classify: {text}"): online
    ones and lines of the batches it created."""
    stats = sim.stats()
    prompt = f"Classify: {text}"
    return stats["by_prompt"].get(prompt, 0) + stats["batch_api"]["lines_by_prompt"].get(prompt, 0)


def assert_attempts_are_requests(sim: SimulatorThread, job: Path) -> pd.DataFrame:
    frame = output_of(job)
    received = [requests_received(sim, text) for text in frame["text"]]
    assert frame["attempts"].tolist() == received
    return frame


def marked_rows(count: int, marked: dict[int, str]) -> list[dict[str, Any]]:
    return [{"review_id": f"r{i:03d}", "text": f"review number {i}" + marked.get(i, "")} for i in range(count)]


BATCH = {"max_requests_per_file": 10, "poll_interval_s": 0.05}


def test_a_row_failed_in_one_run_and_retried_in_the_next_counts_the_requests_of_both(sim, make_job, run_cli):
    # flaky:N fails a row's first N requests (3 attempts a run); badjson:N its first N replies (3 asked a run).
    rows = marked_rows(6, {0: " [[flaky:4]]", 1: " [[badjson:4]]"})
    job = make_job(sim, rows=rows, model={"params": {"max_tokens": 64, "response_format": {"type": "json_object"}}},
                   output={"parse_json": True, "keep_columns": ["text"]})
    assert run_cli("run", job)[0] == 1
    first = assert_attempts_are_requests(sim, job)
    assert first["status"].tolist()[:2] == ["failed", "failed"]
    assert run_cli("run", job, "--retry-failed")[0] == 0
    second = assert_attempts_are_requests(sim, job)
    assert second["attempts"].tolist() == [5, 5, 1, 1, 1, 1]
    assert run_cli("run", job, "--retry-failed")[0] == 0  # nothing sent: nothing changes
    assert assert_attempts_are_requests(sim, job)["attempts"].tolist() == [5, 5, 1, 1, 1, 1]


def test_a_row_whose_prompt_changed_keeps_the_requests_of_its_earlier_answers(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=marked_rows(3, {0: " [[flaky:1]]"}))
    assert run_cli("run", job)[0] == 0
    edited = marked_rows(3, {0: " [[flaky:1]] edited"})
    pd.DataFrame(edited).to_csv(tmp_path / "reviews.csv", index=False)
    assert run_cli("run", job)[0] == 0
    frame = output_of(job)
    # Its cost and tokens are those of both answers: so are its requests (2 for each prompt: flaky:1).
    assert frame["attempts"].tolist() == [4, 1, 1]
    assert frame["attempts"][0] == requests_received(sim, "review number 0 [[flaky:1]]") + \
        requests_received(sim, edited[0]["text"])


def test_a_row_failed_online_then_answered_through_the_batch_api_counts_both(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0)
    job = make_job(sim, rows=marked_rows(6, {0: " [[flaky:3]]"}), batch_api=BATCH)
    assert run_cli("run", job)[0] == 1  # online: row 0 fails after 3 requests
    assert run_cli("run", job, "--retry-failed", "--mode", "batch_api")[0] == EXIT_BATCHES_LIVE
    sim.advance(3600)
    code, out, err = run_cli("run", job, "--mode", "batch_api")  # merged in a later run than it was sent in
    assert code == 0, out + err
    frame = assert_attempts_are_requests(sim, job)
    assert frame["attempts"].tolist() == [4, 1, 1, 1, 1, 1]


def test_a_failed_row_put_in_a_batch_and_answered_in_the_same_run_counts_once(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=1000)
    job = make_job(sim, rows=marked_rows(4, {0: " [[flaky:4]]"}), mode="batch_api", batch_api=BATCH,
                   retry={"max_attempts": 2})
    code, out, err = run_cli("run", job, "--wait")  # two batch failures: failed
    assert code == 1, out + err
    assert assert_attempts_are_requests(sim, job)["attempts"].tolist() == [2, 1, 1, 1]
    assert run_cli("run", job, "--retry-failed", "--mode", "online")[0] == 1  # 2 more requests, both failing
    assert assert_attempts_are_requests(sim, job)["attempts"].tolist() == [4, 1, 1, 1]
    code, out, err = run_cli("run", job, "--retry-failed", "--wait")
    assert code == 0, out + err
    assert assert_attempts_are_requests(sim, job)["attempts"].tolist() == [5, 1, 1, 1]


def test_rows_of_forgotten_batches_answered_online_count_their_batch_request(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0)
    job = make_job(sim, rows=marked_rows(12, {}), mode="batch_api", batch_api=BATCH)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    sim.forget()
    code, out, err = run_cli("run", job, "--mode", "online")
    assert code == 0, out + err
    assert assert_attempts_are_requests(sim, job)["attempts"].tolist() == [2] * 12


@pytest.mark.parametrize("modes", [
    ["online", "batch_api", "online", "batch_api"],
    ["batch_api", "batch_api", "online"],
    ["batch_api", "online", "online", "batch_api"],
])
def test_any_sequence_of_runs_and_modes_counts_every_request(start_sim, make_job, run_cli, modes):
    sim = start_sim(batch_speed=1000)
    # Rows failing their first 1..8 requests: each run (2 attempts online, or one batch) answers some of them.
    job = make_job(sim, rows=marked_rows(8, {i: f" [[flaky:{i}]]" for i in range(1, 8)}), batch_api=BATCH,
                   retry={"max_attempts": 2})
    for mode in modes:
        code, out, err = run_cli("run", job, "--retry-failed", "--mode", mode, "--wait")
        assert code in (0, 1), out + err  # every row answered or failed: the final file is written
        assert_attempts_are_requests(sim, job)


# -- the budget across runs: answers without usage count at their worst case in every later run -----------------

def online_worst_case(text: str, max_tokens: int) -> float:
    """A row's worst case at glm-4-plus's online price (5 CNY per million tokens, in and out)."""
    return (prompt_token_bound([{"role": "user", "content": f"Classify: {text}"}]) + max_tokens) * 5e-6


def status_of(run_cli, job: Path) -> dict[str, Any]:
    code, out, err = run_cli("status", job, "--json")
    assert code == 0, err
    return json.loads(out)


def test_answers_without_usage_keep_the_budget_over_many_runs(sim, make_job, run_cli):
    rows = marked_rows(20, {i: NO_USAGE for i in range(20)})
    limit = 0.0016
    job = make_job(sim, rows=rows, model={**PLUS, "params": {"max_tokens": 8}}, budget={"max_cost": limit})
    codes = [run_cli("run", job, "--limit", "2")[0] for _ in range(8)]
    assert codes[-1] == 5, codes
    answered = [r["text"] for r in rows if requests_received(sim, r["text"])]
    counted = sum(online_worst_case(text, 8) for text in answered)
    assert 0 < len(answered) < 20 and counted <= limit
    status = status_of(run_cli, job)
    assert status["cost"] == 0  # unknown: nothing invented
    assert status["budget_cost"] == pytest.approx(counted)
    assert "counted against the budget" in run_cli("status", job)[1]
    records = every_record(job)
    assert records["cost"].isna().all()


def every_record(job: Path) -> pd.DataFrame:
    folder = job.parent / "out" / "result.checkpoint"
    wal = _wal_table(folder / "wal.jsonl", lambda _m: None, keep_damaged=False)
    return pa.concat_tables([Checkpoint(folder).read_all(), wal]).to_pandas()


def test_a_token_budget_with_answers_without_usage_holds_over_many_runs(sim, make_job, run_cli):
    rows = marked_rows(20, {i: NO_USAGE for i in range(20)})
    job = make_job(sim, rows=rows, model={"params": {"max_tokens": 8}}, budget={"max_total_tokens": 200})
    for _ in range(8):
        run_cli("run", job, "--limit", "1")
    answered = [r["text"] for r in rows if requests_received(sim, r["text"])]
    bounds = [prompt_token_bound([{"role": "user", "content": f"Classify: {text}"}]) + 8 for text in answered]
    assert 0 < len(answered) < 8 and sum(bounds) <= 200
    assert status_of(run_cli, job)["budget_tokens"] == sum(bounds)


def test_batch_answers_without_usage_keep_the_budget_in_later_runs(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0)
    rows = marked_rows(30, {i: NO_USAGE for i in range(30)})
    job = make_job(sim, rows=rows, mode="batch_api", model={**PLUS, "params": {"max_tokens": 8}},
                   batch_api={"max_requests_per_file": 30, "poll_interval_s": 0.05}, budget={"max_cost": 0.0008})
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    sim.advance(3600)
    code, out, err = run_cli("run", job)
    assert code == 5, out + err
    sent = sum(requests_received(sim, r["text"]) for r in rows)
    code, out, err = run_cli("run", job)  # a later run counts them as this one did: nothing more fits
    assert code == 5, out + err
    assert sum(requests_received(sim, r["text"]) for r in rows) == sent


def test_a_row_edited_while_its_batch_is_live_and_answered_again_in_the_same_run_keeps_both_answers(
        start_sim, make_job, run_cli, tmp_path):
    sim = start_sim(batch_speed=0)
    job = make_job(sim, rows=marked_rows(4, {}), mode="batch_api", model=PLUS, batch_api=BATCH)
    assert run_cli("run", job)[0] == EXIT_BATCHES_LIVE
    edited = marked_rows(4, {0: " edited"})
    pd.DataFrame(edited).to_csv(tmp_path / "reviews.csv", index=False)
    sim.advance(3600)
    sim.reconfigure(batch_speed=1000)
    code, out, err = run_cli("run", job, "--wait")  # the old prompt's answer merged, the new one sent and merged
    assert code == 0, out + err
    frame = output_of(job)
    assert frame["attempts"].tolist() == [2, 1, 1, 1]
    assert requests_received(sim, "review number 0") + requests_received(sim, "review number 0 edited") == 2
    # Both answers were paid for in this run (none in the first): the row's record holds both.
    assert summary_of(job)["run"]["cost"] == pytest.approx(frame["cost"].sum())
    assert status_of(run_cli, job)["cost"] == pytest.approx(frame["cost"].sum())


@pytest.mark.parametrize("signals", [1, 2])
def test_a_row_whose_retry_a_stop_cut_short_keeps_what_its_paid_answers_cost(start_sim, make_job, run_cli, signals):
    """Row 0's first answer is billed but failed (finish_reason network_error). One signal: the row waits a long
    backoff for its retry, and the run stops there. Two: its retry is in flight (slow) when the second stops the run
    at once, dropping it. Either way the first answer was paid for: the row's record keeps it and the requests sent,
    pending again, the run's cost counts it, and the next run's record of the row holds it."""
    sim = start_sim()
    rows = marked_rows(6, {0: " [[paidfail:1]]" + (" [[slow:3000]]" if signals == 2 else "")})
    backoff_s = 60 if signals == 1 else 0.01
    job = make_job(sim, rows=rows, model={**PLUS, "params": {"max_tokens": 16}},
                   retry={"max_attempts": 3, "initial_backoff_s": backoff_s, "max_backoff_s": backoff_s})
    process = start_run(job)
    try:
        wait_until(lambda: requests_received(sim, rows[0]["text"]) == signals, "row 0's billed, failed answer" +
                   (", and its retry in flight" if signals == 2 else ""))
        wait_for_answers(job, 5)
        interrupt(process, signals)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, err
    kept = every_record(job).set_index("id").loc["r000"]
    assert (kept["status"], kept["error_class"], kept["attempts"]) == ("failed", "interrupted", signals)
    assert kept["total_tokens"] > 0 and kept["cost"] > 0
    assert summary_of(job)["run"]["cost"] == pytest.approx(every_record(job)["cost"].sum())
    status = status_of(run_cli, job)
    assert (status["ok"], status["failed"], status["pending"]) == (5, 0, 1)  # pending again, not failed
    assert status["cost"] == pytest.approx(every_record(job)["cost"].sum())  # what was paid is counted
    assert run_cli("run", job)[0] == 0  # no --retry-failed needed: the row was pending
    row = assert_attempts_are_requests(sim, job).set_index("review_id").loc["r000"]
    assert (row["status"], row["attempts"]) == ("ok", signals + 1)
    assert row["total_tokens"] == 2 * kept["total_tokens"]  # both answers (the same usage each): not the one dropped
    assert row["cost"] == pytest.approx(2 * kept["cost"])
