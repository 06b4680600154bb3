"""An input edited between runs: deleted rows and changed prompts, over real HTTP."""

from __future__ import annotations

import json

import pandas as pd
from helpers import output_of

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
    assert "5 answers are for rows no longer in the input" in out
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
