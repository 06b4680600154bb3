"""An input edited between runs (deleted rows, changed prompts, moved rows) and while a run is going, over real
HTTP."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import output_of, start_run, summary_of, wait_for_answers

ROWS = [{"review_id": f"r{i}", "text": f"review number {i}"} for i in range(25)]


def write_rows(job, rows):
    pd.DataFrame(rows).to_csv(job.parent / "reviews.csv", index=False)


def test_deleted_rows_leave_totals_that_add_up_and_a_final_file_of_the_current_rows(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS)
    assert run_cli("run", job)[0] == 0
    kept = [r for i, r in enumerate(ROWS) if i not in (0, 3, 7, 12, 24)]
    write_rows(job, kept)
    sim.reset()

    code, out, _ = run_cli("run", job)
    assert code == 0
    assert sim.stats()["requests"] == 0
    assert "all runs: ok 20, failed 0, pending 0" in out
    assert "not in the input: 5 answers for rows no longer in the input" in out
    result = output_of(job)
    assert result["review_id"].tolist() == [r["review_id"] for r in kept]
    assert result["status"].eq("ok").all()

    code, out, _ = run_cli("status", job, "--json")
    status = json.loads(out)
    assert (status["rows_total"], status["ok"], status["failed"], status["pending"]) == (20, 20, 0, 0)
    assert status["not_in_input"] == 5


def test_a_row_whose_prompt_changed_is_sent_again(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS)
    assert run_cli("run", job)[0] == 0
    first = output_of(job).set_index("review_id")
    edited = [dict(r) for r in ROWS]
    edited[4]["text"] = "review number 4, edited"
    edited[20]["text"] = "review number 20, edited"
    write_rows(job, edited)
    sim.reset()

    status = json.loads(run_cli("status", job, "--json")[1])
    assert (status["ok"], status["pending"], status["changed"]) == (23, 2, 2)
    assert status["failed_by_class"] == {}  # a changed prompt is pending, not a failure
    estimate = json.loads(run_cli("estimate", job, "--json")[1])
    assert (estimate["rows_to_do"], estimate["rows_changed"]) == (2, 2)

    code, out, _ = run_cli("run", job)
    assert code == 0
    assert sim.stats()["by_prompt"] == {"Classify: review number 4, edited": 1, "Classify: review number 20, edited": 1}
    result = output_of(job).set_index("review_id")
    assert result.loc["r4", "response"] != first.loc["r4", "response"]
    assert result.loc["r5", "response"] == first.loc["r5", "response"]
    assert "prompt_hash" not in result.columns

    sim.reset()
    assert run_cli("run", job)[0] == 0
    assert sim.stats()["requests"] == 0


def test_a_changed_prompt_is_found_in_a_parquet_input_and_after_rows_moved(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, input_file="reviews.parquet")
    assert run_cli("run", job)[0] == 0
    edited = [dict(r) for r in ROWS[1:]]  # the first row deleted: every other row moves up by one
    edited[10]["text"] = "review number 11, edited"
    pd.DataFrame(edited).to_parquet(job.parent / "reviews.parquet", index=False)
    sim.reset()

    code, out, _ = run_cli("run", job)
    assert code == 0
    assert sim.stats()["by_prompt"] == {"Classify: review number 11, edited": 1}
    assert output_of(job)["review_id"].tolist() == [r["review_id"] for r in edited]


# -- the input edited or replaced while a run is going -----------------------------------------------------------

MANY = [{"review_id": f"m{i:03d}", "text": f"review number {i}"} for i in range(100)]


def test_a_row_edited_mid_run_after_its_answer_is_never_paired_with_it(start_sim, make_job, run_cli):
    sim = start_sim(latency_ms=50)
    job = make_job(sim, rows=MANY, limits={"concurrency": 2})  # ~2.5 s: the edit comes long before the end
    process = start_run(job)
    try:
        wait_for_answers(job, 2)  # the first rows are answered; the small file was read whole at the start
        edited = [dict(r) for r in MANY]
        edited[0]["text"] = "review number 0, edited after its answer"
        write_rows(job, edited)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 2, err
    assert "Traceback" not in err
    assert "stopped: " in out and "reviews.csv: the input was edited or replaced while batch was reading it" in out
    assert not (job.parent / "out" / "result.parquet").exists()  # the new text would sit beside the old answer
    assert summary_of(job)["exit_code"] == 2

    sim.reset()
    sim.reconfigure(latency_ms=0)
    code, _, err = run_cli("run", job)
    assert code == 0, err
    assert sim.stats()["by_prompt"] == {"Classify: review number 0, edited after its answer": 1}
    result = output_of(job).set_index("review_id")
    assert result.loc["m000", "text"] == edited[0]["text"]
    assert "to: Classify: review number 0, edite" in result.loc["m000", "response"]  # (cut at max_tokens)


def test_an_input_replaced_mid_run_stops_taking_rows_and_the_next_run_sends_each_row_once(
        start_sim, make_job, run_cli):
    sim = start_sim(latency_ms=50)
    job = make_job(sim, rows=MANY[:5], input_file="reviews.parquet", limits={"concurrency": 2})
    path = job.parent / "reviews.parquet"
    # Row groups of 10 rows: the run reads the file a group at a time, as it sends.
    pq.write_table(pa.Table.from_pylist(MANY), path, row_group_size=10)
    process = start_run(job)
    try:
        wait_for_answers(job, 2)
        grown = MANY[50:] + MANY[:50] + [{"review_id": f"n{i}", "text": f"new review {i}"} for i in range(20)]
        pq.write_table(pa.Table.from_pylist(grown), path.with_name("next.parquet"), row_group_size=10)
        path.with_name("next.parquet").replace(path)  # as a tool that writes a new file over the old one
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 2, err
    assert "Traceback" not in err
    assert "reviews.parquet: the input was edited or replaced while batch was reading it" in out
    first = sim.stats()["requests"]
    assert first < len(MANY)  # it stopped taking rows

    sim.reconfigure(latency_ms=0)
    code, _, err = run_cli("run", job)
    assert code == 0, err
    assert sim.stats()["requests"] == len(grown)  # each row once, over both runs
    assert max(sim.stats()["by_prompt"].values()) == 1
    assert output_of(job)["review_id"].tolist() == [r["review_id"] for r in grown]


def test_a_row_that_moved_and_changed_holds_the_cost_of_all_its_answers(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, input_file="reviews.parquet", pricing={"input": 1, "output": 3})
    assert run_cli("run", job)[0] == 0
    first = output_of(job).set_index("review_id")
    edited = [dict(r) for r in ROWS[1:]]  # the first row deleted: every other row moves up by one
    edited[10]["text"] = "review number 11, edited"
    pd.DataFrame(edited).to_parquet(job.parent / "reviews.parquet", index=False)

    assert run_cli("run", job)[0] == 0
    again = summary_of(job)["run"]  # this run sent r11 alone
    assert again["ok"] == 1 and again["cost"] > 0
    row = output_of(job).set_index("review_id").loc["r11"]
    for paid in ("prompt_tokens", "completion_tokens", "cost"):
        assert row[paid] == pytest.approx(first.loc["r11", paid] + again[paid]), paid
    # What the job spent: every answer once, r0's (no longer in the input) and both of r11's.
    status = json.loads(run_cli("status", job, "--json")[1])
    assert status["cost"] == pytest.approx(first["cost"].sum() + again["cost"])
    assert status["cost"] == pytest.approx(output_of(job)["cost"].sum() + first.loc["r0", "cost"])
