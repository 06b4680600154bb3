"""The final file read window by window: last record wins, and rows that moved are found by id."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from helpers import checkpoint_of, output_of

from batch.checkpoint.final import LastRecords, write_final
from batch.checkpoint.writer import Checkpoint
from batch.input.reader import InputTable
from batch.records import OUTPUT_FIELDS


def final_in_small_windows(job: Path) -> Path:
    """The job's final file written again, its input read 7 rows and its checkpoint 20 rows at a time: windows
    that cut across input batches and checkpoint parts."""
    table = InputTable(job.parent / "in.parquet", "review_id", ["text"], ["text"], batch_rows=7)
    checkpoint = Checkpoint(checkpoint_of(job))
    total = table.scan(keep_hashes=True)
    states = checkpoint.row_states(total, table.row_hashes, table.row_prompts)
    path = job.parent / "small-windows.parquet"
    write_final(path, table.id_batches(["text"]), "review_id", ["text"], LastRecords(checkpoint.row_groups(), states),
                window_rows=20)
    return path


def assert_final(job, rows, path: Path | None = None) -> None:
    """Every input row in order, beside the last record written for its id: found here the slow, obvious way."""
    result = pq.read_table(path or job.parent / "out" / "result.parquet")
    assert result.column("review_id").to_pylist() == [r["review_id"] for r in rows]
    assert result.column("text").to_pylist() == [r["text"] for r in rows]
    records = Checkpoint(job.parent / "out" / "result.checkpoint").read_all()
    last = {row_id: at for at, row_id in enumerate(records.column("id").to_pylist())}
    want = records.take([last[r["review_id"]] for r in rows]).select(OUTPUT_FIELDS)
    assert result.drop_columns(["review_id", "text"]).equals(want)


def test_many_parts_and_windows_with_retried_rows_keep_the_last_answer(sim, make_job, run_cli):
    rows = [{"review_id": f"r{i:03d}", "text": f"review {i}" + (" [[flaky:1]]" if i % 9 == 4 else "")}
            for i in range(120)]
    job = make_job(sim, rows=rows, input_file="in.parquet", retry={"max_attempts": 1},
                   output={"checkpoint_rows": 5})
    assert run_cli("run", job)[0] == 1  # the flaky rows failed once
    assert set(output_of(job).set_index("review_id").loc[[r["review_id"] for r in rows[4::9]], "status"]) == {"failed"}
    code, out, err = run_cli("run", job, "--retry-failed")
    assert code == 0, out + err
    folder = job.parent / "out" / "result.checkpoint"
    assert Checkpoint(folder).read_all().num_rows == 120 + len(rows[4::9])  # failure and answer, both kept
    assert set(output_of(job)["status"]) == {"ok"}
    assert_final(job, rows)
    assert_final(job, rows, final_in_small_windows(job))
    schema = pq.read_schema(job.parent / "out" / "result.parquet")
    assert schema.names[:3] == ["review_id", "text", "status"] and schema.field("attempts").type == "int32"


def test_rows_moved_after_the_checkpoint_are_found_by_id(start_sim, make_job, run_cli):
    rows = [{"review_id": f"r{i:03d}", "text": f"review {i}"} for i in range(100)]
    job = make_job(start_sim(), rows=rows, input_file="in.parquet", output={"checkpoint_rows": 6})
    assert run_cli("run", job, "--limit", "60")[0] == 0

    moved = rows[::-1]  # the same rows, reversed: every answered row now sits elsewhere
    sim = start_sim()
    job = make_job(sim, rows=moved, input_file="in.parquet", output={"checkpoint_rows": 6})
    code, out, err = run_cli("run", job)
    assert code == 0, out + err
    assert sorted(sim.stats()["by_prompt"]) == sorted(f"Classify: review {i}" for i in range(60, 100))
    result = output_of(job)
    assert list(result["response"].str.contains(r"\S")) == [True] * 100
    assert_final(job, moved)
    assert_final(job, moved, final_in_small_windows(job))
