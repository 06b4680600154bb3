"""The checkpoint's parts on the storage seam: only whole objects, each made once under a name never used before."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import checkpoint_of, record, states, wait_until
from hypothesis import given
from hypothesis import strategies as st

from batch.checkpoint.final import MADE_FROM_KEY
from batch.checkpoint.writer import MERGE_PARTS_ABOVE, Checkpoint, part_key, part_order
from batch.errors import CheckpointReadError, CheckpointWriteError
from batch.input.reader import hash_ids
from batch.records import RECORD_SCHEMA
from batch.storage.memory import Fault, MemoryStore


def resumed(checkpoint: Checkpoint, rows: int) -> dict[str, str | None]:
    """What a run resuming from `checkpoint` finds per row (input rows id0, id1, ...), damaged parts set aside."""
    checkpoint.open()
    ids = pa.array([f"id{i}" for i in range(rows)])
    found = checkpoint.row_states(rows, hash_ids(ids))
    codes, _ = found.last(0, ids)
    return {f"id{i}": found.name(int(code)) for i, code in enumerate(codes) if code}


def parts_of(store: MemoryStore) -> list[str]:
    return [e.key for e in store.list("part-") if part_order(e.key)]


def made_once_and_never_replaced(store: MemoryStore) -> None:
    """Every object the checkpoint wrote was made by an exclusive create, under a key no object had before."""
    created = [key for op, key in store.writes if op == "create"]
    assert [op for op, _ in store.writes if op == "replace"] == []
    assert len(created) == len(set(created)), created


def test_part_keys_order_by_number_then_generation() -> None:
    keys = [part_key(2), part_key(1, 3), part_key(10), part_key(1), part_key(1, 12), part_key(2, 1)]
    assert sorted(keys, key=part_order) == ["part-000001.parquet", "part-000001-3.parquet", "part-000001-12.parquet",
                                            "part-000002.parquet", "part-000002-1.parquet", "part-000010.parquet"]
    assert part_order("part-000001.parquet.damaged") is None and part_order("part-x.parquet") is None


def test_merging_makes_new_parts_and_deletes_the_old_after(tmp_path: Path) -> None:
    store = MemoryStore()
    ck = Checkpoint(tmp_path, rows_per_part=2, store=store)
    ck.open()
    for i in range(2 * (MERGE_PARTS_ABOVE + 3)):
        ck.append(record(i))
    before = parts_of(store)
    ck.close()
    (merged,) = parts_of(store)
    assert merged not in before and part_order(merged) == (part_order(before[-1])[0], 0, 1)
    deleted = [key for op, key in store.writes if op == "delete"]
    assert deleted == before  # each old part dropped only after the merged one was made
    assert store.writes.index(("create", merged)) < store.writes.index(("delete", before[0]))
    made_once_and_never_replaced(store)
    assert len(Checkpoint(tmp_path, store=store).read_all()) == 2 * (MERGE_PARTS_ABOVE + 3)


def test_two_writers_on_one_store_never_take_one_part_name(tmp_path: Path) -> None:
    """Two hosts (each its own log) writing into one store, as a zombie and its successor may: each part is made
    exclusively, so a writer whose next number was taken takes the one after, and no record is lost."""
    store = MemoryStore()
    first = Checkpoint(tmp_path / "host-a", rows_per_part=1, store=store)
    second = Checkpoint(tmp_path / "host-b", rows_per_part=1, store=store)
    first.open()
    second.open()
    for i in range(10):
        (first if i % 2 else second).append(record(i))
    first.close(merge=False)
    second.close(merge=False)
    assert len(parts_of(store)) == 10
    made_once_and_never_replaced(store)
    assert states(Checkpoint(tmp_path / "reader", store=store).answered()) == {f"id{i}": "ok" for i in range(10)}


def test_a_torn_part_is_set_aside_as_a_copy_and_its_readable_groups_kept_in_a_new_part(tmp_path: Path) -> None:
    store = MemoryStore([Fault("create", 2, "torn")])  # the second part is damaged as it is written
    ck = Checkpoint(tmp_path, rows_per_part=3, store=store)
    ck.open()
    for i in range(9):
        ck.append(record(i))
    ck.close(merge=False)
    again = Checkpoint(tmp_path, store=store)
    assert resumed(again, 9) == {f"id{i}": "ok" for i in (0, 1, 2, 6, 7, 8)}  # the torn part's rows: pending
    again.close(merge=False)
    keys = [e.key for e in store.list()]
    assert "part-000002.parquet" not in keys and "part-000002.parquet.damaged" in keys
    made_once_and_never_replaced(store)


def test_the_readable_row_groups_of_a_damaged_part_are_kept_right_after_it(tmp_path: Path) -> None:
    records = pa.Table.from_pylist([record(i, "failed") for i in range(20)], schema=RECORD_SCHEMA)
    store = MemoryStore()
    store.create(part_key(1), lambda sink: pq.write_table(records, sink, row_group_size=10))
    data = bytearray(store.read_bytes(part_key(1)))
    second = pq.ParquetFile(pa.BufferReader(bytes(data))).metadata.row_group(1).column(0).data_page_offset
    data[second:second + 64] = b"\xff" * 64
    store.delete(part_key(1))
    store.create(part_key(1), lambda sink: sink.write(bytes(data)))
    store.create(part_key(2), lambda sink: pq.write_table(
        pa.Table.from_pylist([record(0)], schema=RECORD_SCHEMA), sink))
    ck = Checkpoint(tmp_path, store=store)
    # Row 0 failed in the damaged part, was answered in part 2: the kept groups must come before part 2.
    assert resumed(ck, 20) == {**{f"id{i}": "server_error" for i in range(10)}, "id0": "ok"}
    ck.close(merge=False)
    assert parts_of(store) == ["part-000001-1.parquet", "part-000002.parquet"]
    assert store.read_bytes("part-000001.parquet.damaged") == bytes(data)
    again = Checkpoint(tmp_path, store=store)
    again.open()
    again.append(record(30))
    again.close(merge=False)
    assert parts_of(store)[-1] == "part-000003.parquet"  # one past every number, the damaged copy's included


def test_a_part_that_cannot_be_listed_or_read_is_a_store_failure_not_damage(tmp_path: Path) -> None:
    """An object store that does not answer is not a damaged part: nothing is set aside, the error is raised."""
    store = MemoryStore()
    ck = Checkpoint(tmp_path, rows_per_part=1, store=store)
    ck.open()
    ck.append(record(0))
    ck.close(merge=False)
    store.inject("open_read", store.calls["open_read"] + 1, "unavailable")
    with pytest.raises(CheckpointReadError, match="memory:part-000001.parquet: cannot read the checkpoint: .*injected"):
        Checkpoint(tmp_path, store=store).answered()
    assert parts_of(store) == ["part-000001.parquet"] and ("delete", "part-000001.parquet") not in store.writes


@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=40), file_rows=st.integers(1, 12),
       creates=st.integers(0, 20), deletes=st.integers(0, 80))
def test_a_merge_cut_short_anywhere_keeps_each_ids_last_record(tmp_path_factory, sizes, file_rows, creates,
                                                                deletes) -> None:
    """Parts of any sizes, merged into parts of any size, the merge cut short after any number of its creates and
    deletes (the store fails from then on, as a kill leaves it): every id's kept record is still the one the rule
    (answered.record_rank: an answer before a failure, then the last written) keeps."""
    folder = tmp_path_factory.mktemp("ck")
    store = MemoryStore()
    ck = Checkpoint(folder, rows_per_part=10**6, merge_batch_rows=3, merge_file_rows=file_rows, merge_parts_above=0,
                    store=store)
    ck.open()
    want: dict[str, str | None] = {}
    for at, size in enumerate(sizes):
        for i in range(size):
            status = "ok" if (at + i) % 3 else "failed"
            ck.append(record(i, status))
            if want.get(f"id{i}") != "ok":
                want[f"id{i}"] = "ok" if status == "ok" else "server_error"
        ck.compact()
    ck.close(merge=False)
    for op, allowed in (("create", creates), ("delete", deletes)):
        for nth in range(store.calls[op] + 1 + allowed, store.calls[op] + 200):
            store.inject(op, nth, "unavailable")
    try:
        ck.merge()
    except CheckpointWriteError:
        pass
    made_once_and_never_replaced(store)
    assert states(Checkpoint(folder, store=store).answered()) == want


def test_whether_the_final_file_is_current_comes_from_what_it_was_made_of_not_from_times(sim, make_job, run_cli,
                                                                                          tmp_path):
    job = make_job(sim, output={"checkpoint_rows": 5})
    assert run_cli("run", job)[0] == 0
    final = job.parent / "out" / "result.parquet"
    written = final.stat().st_mtime_ns
    assert run_cli("run", job)[0] == 0
    assert final.stat().st_mtime_ns == written  # a no-op: not written again
    assert run_cli("export", job, "--format", "csv", "--to", tmp_path / "out.csv")[0] == 0

    # A part put in place of another, with a time older than the final file's (restored from a backup, or an object
    # store's, which has no such time): its records may differ, so the final file is not current any more.
    first = checkpoint_of(job) / "part-000001.parquet"
    records = pq.read_table(first)
    first.unlink()
    pq.write_table(records, first)
    os.utime(first, ns=(written - 10**12, written - 10**12))
    code, out, err = run_cli("export", job, "--format", "csv", "--to", tmp_path / "again.csv")
    assert code == 2 and "not the one batch made from the job's records" in err, err
    assert run_cli("run", job)[0] == 0
    assert final.stat().st_mtime_ns != written and sim.stats()["requests"] == 12


def test_a_final_file_cut_short_by_another_program_keeping_its_footer_is_not_taken_for_batchs(sim, make_job,
                                                                                                run_cli, tmp_path):
    """pyarrow's write_table of a table read from the final file keeps its footer, batch's stamps and all: rows
    dropped that way must not be exported as the complete job, nor left in place by a rerun."""
    job = make_job(sim)
    assert run_cli("run", job)[0] == 0
    final = job.parent / "out" / "result.parquet"
    whole = pq.read_table(final)
    pq.write_table(whole.slice(0, whole.num_rows - 2), final)
    code, _, err = run_cli("export", job, "--format", "csv", "--to", tmp_path / "out.csv")
    assert code == 2 and "not the one batch made" in err, err
    assert not (tmp_path / "out.csv").exists()
    assert run_cli("run", job)[0] == 0
    assert pq.read_table(final).equals(whole)  # written again whole from the checkpoint
    assert sim.stats()["requests"] == whole.num_rows  # sending nothing


def test_a_final_file_written_before_it_recorded_what_it_was_made_from_is_written_again_once(sim, make_job,
                                                                                              run_cli):
    """The previous version's final file says its settings only: a rerun writes it again from the checkpoint,
    sending nothing, and the one after leaves it alone."""
    job = make_job(sim)
    assert run_cli("run", job)[0] == 0
    final = job.parent / "out" / "result.parquet"
    table = pq.read_table(final)
    older = {key: value for key, value in table.schema.metadata.items() if key != MADE_FROM_KEY}
    pq.write_table(table.replace_schema_metadata(older), final)
    assert MADE_FROM_KEY not in pq.read_metadata(final).metadata
    assert run_cli("run", job)[0] == 0
    assert MADE_FROM_KEY in pq.read_metadata(final).metadata
    written = final.stat().st_mtime_ns
    assert run_cli("run", job)[0] == 0
    assert final.stat().st_mtime_ns == written and sim.stats()["requests"] == 12


def test_a_part_write_that_does_not_return_is_told_while_the_run_waits_on_it(tmp_path: Path, caplog) -> None:
    """A part is written in the run's loop: a store that stopped answering (its library retrying for a minute and
    more) left the run silent meanwhile. A warning comes once the write has taken slow_write_s, the write going on."""
    store = MemoryStore([Fault("create", 1, "stalled")])
    ck = Checkpoint(tmp_path, rows_per_part=1, store=store)
    ck.slow_write_s = 0  # the write is stalled until the test resumes it, so it is slow whatever the threshold
    ck.open()
    writing = threading.Thread(target=ck.append, args=(record(1),))
    with caplog.at_level(logging.WARNING, logger="batch"):
        writing.start()
        try:
            wait_until(lambda: "has taken 0 s so far: its store is slow or does not answer" in caplog.text,
                       "the slow write told")
            assert writing.is_alive() and parts_of(store) == []
        finally:
            store.resume.set()
            writing.join(timeout=60)
    assert len(parts_of(store)) == 1 and caplog.text.count("so far") == 1
    ck.slow_write_s = 3600
    ck.append(record(2))  # a write that returns in time says nothing
    assert len(parts_of(store)) == 2 and caplog.text.count("so far") == 1
    ck.close()
