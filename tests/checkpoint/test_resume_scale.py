"""Resume and final output over a checkpoint of many parts, read in Arrow batches rather than whole."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import opened, output_of, record, states

import batch
from batch.checkpoint import answered as answered_module
from batch.checkpoint.answered import Answered
from batch.checkpoint.writer import MERGE_PARTS_ABOVE, Checkpoint
from batch.errors import CheckpointWriteError
from batch.input.reader import InputTable
from batch.preflight import preflight
from batch.runner import RunOptions, run_job
from batch.storage.memory import Fault, MemoryStore


@pytest.mark.asyncio
async def test_resume_over_many_parts_sends_only_the_rest_and_merges_them_at_the_end(start_sim, make_job):
    rows = [{"review_id": f"r{i:03d}", "text": f"review {i}"} for i in range(300)]
    sim = start_sim()
    job = make_job(sim, rows=rows, input_file="in.parquet", output={"checkpoint_rows": 4})
    # What a run killed after 200 answers leaves: 50 parts of 4 and no merge (close() never ran).
    folder = job.parent / "out" / "result.checkpoint"
    killed = Checkpoint(folder, rows_per_part=4)
    killed.open()
    for i in range(200):
        answer = record(i)
        answer.update(id=f"r{i:03d}", seq=i)
        killed.append(answer)
    assert len(list(folder.glob("part-*.parquet"))) == 50 > MERGE_PARTS_ABOVE

    plan = preflight(job)
    # The input read 7 rows at a time: its ids are looked up over many batches.
    table = InputTable(plan.spec.input.path, "review_id", ["text"], ["text"], batch_rows=7)
    summary = await run_job(dataclasses.replace(plan, table=table), RunOptions(tty=False))
    assert summary["exit_code"] == 0
    sent = sim.stats()["by_prompt"]
    assert sorted(sent) == sorted(f"Classify: review {i}" for i in range(200, 300))
    (merged,) = folder.glob("part-*.parquet")  # merged at the end of the run, not before its first request
    assert pq.ParquetFile(merged).metadata.num_rows == 300
    result = output_of(job)
    assert list(result["review_id"]) == [r["review_id"] for r in rows]
    assert list(result["text"]) == [r["text"] for r in rows] and set(result["status"]) == {"ok"}
    assert list(result["response"][:200]) == [f"answer {i}" for i in range(200)]
    # The output is the one made from the records as they are now, merged: `export` takes it at once (the merge
    # came after the final file, whose footer then named parts gone: export refused it until a second run).
    assert batch.status(job)["output_current"] is True


def test_merge_streams_parts_into_row_groups_and_the_last_record_wins(tmp_path):
    folder = tmp_path / "ck"
    ck = Checkpoint(folder, rows_per_part=3, merge_batch_rows=10)
    ck.open()
    for i in range(3 * (MERGE_PARTS_ABOVE + 2)):
        ck.append(record(i % 60, "failed" if i < 60 else "ok"))  # 60 failures, then answers for the first 42 ids
    ck.close()
    reopened = Checkpoint(folder)
    done = states(opened(reopened))
    reopened.close()
    assert done == {f"id{i}": "ok" if i < 3 * (MERGE_PARTS_ABOVE + 2) - 60 else "server_error" for i in range(60)}
    (part,) = folder.glob("part-*.parquet")
    file = pq.ParquetFile(part)
    assert file.metadata.num_rows == 3 * (MERGE_PARTS_ABOVE + 2)
    assert max(file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)) <= 12
    assert file.read().column("id").to_pylist() == [f"id{i % 60}" for i in range(3 * (MERGE_PARTS_ABOVE + 2))]


def test_ids_that_share_a_hash_are_told_apart(monkeypatch):
    # A real 64-bit collision cannot be found for a test: hash by length instead, so every id collides.
    monkeypatch.setattr(answered_module, "_hashes", lambda chunks: np.concatenate(
        [np.array([len(s) for s in chunk.to_pylist()], np.int64) for chunk in chunks] or [np.empty(0, np.int64)]))

    def column(values):
        return pa.chunked_array([pa.array(values, pa.string())])

    done = Answered(column(["ab", "cd", "ab", "ef", "cd", "x"]),
                    column(["failed", "failed", "ok", "failed", "failed", "ok"]),
                    column(["timeout", "server_error", None, "content_filter", "timeout", None]))
    assert len(done) == 4
    asked = pa.array(["ab", "cd", "ef", "gh", "x", "y"])
    assert done.state(asked).to_pylist() == ["ok", "timeout", "content_filter", None, "ok", None]


def test_input_ids_that_share_a_hash_are_not_called_duplicates(tmp_path, monkeypatch):
    import batch.input.reader
    from batch.errors import ConfigError

    # Every id of one length collides: the scan must confirm a repeated hash on the ids themselves.
    monkeypatch.setattr(batch.input.reader, "hash_ids",
                        lambda ids: np.array([len(s) for s in ids.to_pylist()], np.int64))
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["aa", "bb", "cc", "dd", "ee"], "text": list("abcde")}), path)
    assert batch.input.reader.InputTable(path, "id", ["text"], [], batch_rows=3).scan() == 5
    pq.write_table(pa.table({"id": ["aa", "bb", "cc", "dd", "bb"], "text": list("abcde")}), path)
    with pytest.raises(ConfigError) as found:
        batch.input.reader.InputTable(path, "id", ["text"], [], batch_rows=3).scan()
    assert str(found.value) == f"{path} row 5: duplicate id 'bb' in column 'id'"


def test_row_states_keep_each_rows_last_record_and_find_moved_records_by_id():
    from batch.checkpoint.answered import RowStates
    from batch.input.reader import hash_ids

    states = RowStates(4, hash_ids(pa.array(["a", "b", "c", "d"])))

    def add(*records):  # (id, seq, status, error_class), in write order
        ids, seqs, status, error_class = zip(*records)
        states.add(pa.array(ids), pa.array(seqs, pa.int64()), pa.array(status), pa.array(error_class))

    # Failures all, but d's answer: of one id's records an answer is kept before any failure (record_rank).
    add(("a", 0, "failed", "server_error"),
        ("b", 1, "failed", "timeout"),
        ("x", 2, "ok", None),  # an id no longer in the input, at c's row: not c's answer
        ("c", 3, "failed", "content_filter"),  # c was at row 3 when this was written; it is at row 2 now
        ("b", 1, "failed", "server_error"))  # b retried: the last of two records in one batch wins
    add(("d", 0, "failed", "timeout"),  # d, when it sat at row 0
        ("d", 3, "ok", None),  # and later at its own row: newer, so it wins
        ("a", None, "failed", "timeout"),  # no seq (an old checkpoint): found by id, and newest for a
        ("b", 7, "failed", "timeout"))  # a seq past the input's end: found by id, and newest for b
    states.settle()
    ids = pa.array(["a", "b", "c", "d"])
    codes, written = states.last(0, ids)
    assert [states.name(c) for c in codes] == ["timeout", "timeout", "content_filter", "ok"]
    assert written.tolist() == [7, 8, 3, 6]
    assert states.to_send(0, ids, retry_failed=False).tolist() == [False] * 4
    assert states.to_send(0, ids, retry_failed=True).tolist() == [True, True, False, False]
    assert states.to_send(2, ids.slice(2), retry_failed=True).tolist() == [False, False]
    assert states.counts(lambda: [ids.slice(0, 3), ids.slice(3)]) == (1, 3, 0, 1)  # x is not an input row

    states.add_one(1, "ok")  # this run's answer for b: newer than its moved record
    states.add_one(2, "ok")
    assert [states.name(c) for c in states.last(0, ids)[0]] == ["timeout", "ok", "ok", "ok"]
    assert states.counts(lambda: [ids]) == (3, 1, 0, 1)


def test_row_states_without_moved_records_count_without_reading_the_input():
    from batch.checkpoint.answered import RowStates
    from batch.input.reader import hash_ids

    states = RowStates(3, hash_ids(pa.array(["a", "b", "c"])))
    states.add(pa.array(["a", "c"]), pa.array([0, 2]), pa.array(["ok", "failed"]), pa.array([None, "timeout"]))
    states.settle()

    def unread():
        raise AssertionError("the input was read")

    assert states.counts(unread) == (1, 1, 0, 0)
    assert states.to_send(0, pa.array(["a", "b", "c"]), retry_failed=False).tolist() == [False, True, False]


def test_the_scan_gathers_hashes_past_its_first_allocation_for_csv(tmp_path):
    from batch.errors import ConfigError
    from batch.input.reader import InputTable, hash_ids

    ids = [f"row-{i}" for i in range(70_000)]  # more than the 65,536 hashes first allocated for a CSV
    path = tmp_path / "in.csv"
    path.write_text("id,text\n" + "".join(f"{i},t\n" for i in ids))
    table = InputTable(path, "id", ["text"], [], csv_block_bytes=4096)  # many batches, and the array doubles
    assert table.scan(keep_hashes=True) == 70_000
    assert np.array_equal(table.row_hashes, hash_ids(pa.array(ids)))
    (path.parent / "dup.csv").write_text("id,text\n" + "".join(f"{i},t\n" for i in ids + ["row-5"]))
    with pytest.raises(ConfigError, match="row 70001: duplicate id .row-5."):
        InputTable(path.parent / "dup.csv", "id", ["text"], [], csv_block_bytes=4096).scan()


def test_rows_skip_whole_parquet_row_groups_before_the_first_row_to_send(tmp_path):
    from batch.input.reader import InputTable, Row, Skipped

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(10)], "text": list("abcdefghij")}), path,
                   row_group_size=4)
    table = InputTable(path, "id", ["text"], [])
    asked = []

    def wanted(seq, ids):
        asked.append((seq, ids.to_pylist()))
        return np.array([seq + i >= 6 for i in range(len(ids))])

    got = list(table.rows(wanted, start=6))
    assert asked == [(4, ["r4", "r5", "r6", "r7"]), (8, ["r8", "r9"])]  # rows 0-3 (the first row group): not read
    assert got[0] == Skipped(4) and got[1] == Skipped(2)
    assert [(r.seq, r.id, r.values) for r in got if isinstance(r, Row)] == [
        (6, "r6", {"text": "g"}), (7, "r7", {"text": "h"}), (8, "r8", {"text": "i"}), (9, "r9", {"text": "j"})]
    assert sum(r.count for r in got if isinstance(r, Skipped)) == 6
    assert list(table.rows(wanted, start=10)) == [Skipped(10)]  # nothing to send: no row is read


def test_first_row_to_send():
    from batch.checkpoint.answered import RowStates
    from batch.input.reader import hash_ids

    ids = pa.array(["a", "b", "c"])
    states = RowStates(3, hash_ids(ids))
    assert states.first_to_send(retry_failed=False) == 0
    states.add(ids, pa.array([0, 1, 2]), pa.array(["ok", "failed", "ok"]), pa.array([None, "timeout", None]))
    states.settle()
    assert states.first_to_send(retry_failed=False) == 3  # every row answered: nothing to read
    assert states.first_to_send(retry_failed=True) == 1  # the timeout is sent again
    moved = RowStates(3, hash_ids(ids))
    moved.add(pa.array(["c"]), pa.array([0]), pa.array(["ok"]), pa.array([None]))
    moved.settle()
    assert moved.first_to_send(retry_failed=False) == 0  # a record kept by id: every row is looked at


def test_parts_merge_into_bounded_files_and_a_kill_mid_merge_keeps_the_last_record(tmp_path):
    total = 3 * (MERGE_PARTS_ABOVE + 2)

    def fill(folder, store=None):
        ck = Checkpoint(folder, rows_per_part=3, merge_batch_rows=4, merge_file_rows=9, store=store)
        ck.open()
        for i in range(total):  # each id fails in an early part and is answered in a later one
            ck.append(record(i % 60, "failed" if i < 60 else "ok"))
        ck.close(merge=False)
        return ck

    want = {f"id{i}": "ok" if i < total - 60 else "server_error" for i in range(60)}
    merged = fill(tmp_path / "merged")
    merged.merge()
    files = sorted((tmp_path / "merged").glob("part-*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [9] * (total // 9) + [total % 9] * (total % 9 > 0)
    assert Checkpoint(tmp_path / "merged").read_all().column("id").to_pylist() == [f"id{i % 60}" for i in range(total)]
    assert states(opened(Checkpoint(tmp_path / "merged"))) == want

    # As if killed after the first merged part was made, before its run's parts were deleted.
    store = MemoryStore([Fault("delete", 1, "unavailable")])
    killed = fill(tmp_path / "killed", store)
    parts = len(store.list("part-"))
    with pytest.raises(CheckpointWriteError):
        killed.merge()
    assert len(store.list("part-")) == parts + 1
    assert states(opened(Checkpoint(tmp_path / "killed", store=store))) == want


def test_records_written_between_the_scan_and_the_lock_are_still_found(sim, make_job, run_cli, monkeypatch):
    rows = [{"review_id": f"r{i}", "text": f"review {i}"} for i in range(10)]
    job = make_job(sim, rows=rows, input_file="in.parquet")
    assert run_cli("run", job, "--limit", "4")[0] == 0
    # As if another run wrote its records after this one's scan looked (no records: ids' order not kept).
    seen = []
    real = Checkpoint.has_records

    def none_at_first(self):
        seen.append(self)
        return False if len(seen) == 1 else real(self)

    monkeypatch.setattr(Checkpoint, "has_records", none_at_first)
    code, out, err = run_cli("run", job)
    assert code == 0, out + err
    assert len(seen) == 2 and sim.stats()["requests"] == 10  # the 4 answers were not asked for again


def test_duplicate_number_ids_are_found_as_the_run_writes_them(tmp_path):
    from batch.errors import ConfigError
    from batch.input.reader import InputTable

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [2.0, 3.0, 2.0], "text": ["a", "b", "c"]}), path)
    with pytest.raises(ConfigError) as found:
        InputTable(path, "id", ["text"], []).scan()
    assert str(found.value) == f"{path} row 3: duplicate id '2.0' in column 'id'"
