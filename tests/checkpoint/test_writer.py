"""The checkpoint on disk: torn log lines, leftover temp files, many parts, last record wins."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import opened, record, states

from batch.checkpoint.writer import MERGE_PARTS_ABOVE, WAL_NAME, Checkpoint
from batch.records import RECORD_SCHEMA


def test_log_survives_without_close_and_a_torn_last_line_is_ignored(tmp_path):
    folder = tmp_path / "ck"
    first = Checkpoint(folder, rows_per_part=100)
    first.open()
    for i in range(3):
        first.append(record(i))
    # No close(): the process "died". Its last write was cut mid-line.
    with open(folder / WAL_NAME, "a") as wal:
        wal.write('{"id": "id9", "status": "o')
    (folder / ".part-000099.parquet.tmp").write_bytes(b"half a file")

    second = Checkpoint(folder)
    done = states(opened(second))
    assert done == {"id0": "ok", "id1": "ok", "id2": "ok"}
    assert not list(folder.glob(".*.tmp"))
    assert (folder / WAL_NAME).read_text() == ""
    assert not (folder / (WAL_NAME + ".damaged")).exists()  # an answer in flight, not damage to keep aside
    second.close()


def test_parts_are_written_every_n_rows_and_merged_when_many(tmp_path):
    folder = tmp_path / "ck"
    ck = Checkpoint(folder, rows_per_part=2)
    ck.open()
    for i in range(2 * (MERGE_PARTS_ABOVE + 3)):
        ck.append(record(i))
    assert len(list(folder.glob("part-*.parquet"))) == MERGE_PARTS_ABOVE + 3  # as a killed run leaves them
    reopened = Checkpoint(folder)
    assert len(opened(reopened)) == 2 * (MERGE_PARTS_ABOVE + 3)  # read as they are, not merged first
    assert len(list(folder.glob("part-*.parquet"))) == MERGE_PARTS_ABOVE + 3
    reopened.close()
    parts = list(folder.glob("part-*.parquet"))
    assert len(parts) == 1
    assert pq.ParquetFile(parts[0]).metadata.num_rows == 2 * (MERGE_PARTS_ABOVE + 3)


def test_the_last_record_for_an_id_wins(tmp_path):
    folder = tmp_path / "ck"
    ck = Checkpoint(folder, rows_per_part=1)
    ck.open()
    ck.append(record(1, "failed"))
    ck.append(record(2))
    ck.append(record(1, "ok"))
    ck.close()
    assert states(Checkpoint(folder).answered()) == {"id1": "ok", "id2": "ok"}


def test_a_record_in_both_a_part_and_the_log_counts_once(tmp_path):
    folder = tmp_path / "ck"
    ck = Checkpoint(folder, rows_per_part=100)
    ck.open()
    ck.append(record(1))
    ck.close()  # compacted into a part
    # As if killed between the part's rename and the log's truncation:
    (folder / WAL_NAME).write_text(json.dumps(record(1)) + "\n")
    again = Checkpoint(folder)
    assert states(opened(again)) == {"id1": "ok"}
    assert len(again.answered()) == 1
    again.close()


def test_a_part_written_before_a_field_existed_reads_and_merges_with_nulls(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    old = pa.Table.from_pylist([record(0), record(1, "failed")], schema=RECORD_SCHEMA)
    pq.write_table(old.drop_columns(["cache_hit", "reasoning_content"]), folder / "part-000001.parquet")
    ck = Checkpoint(folder, rows_per_part=1)
    assert states(opened(ck)) == {"id0": "ok", "id1": "server_error"}
    for i in range(2, MERGE_PARTS_ABOVE + 3):
        ck.append(record(i))
    ck.close()  # merges the old part with the new ones
    (merged,) = folder.glob("part-*.parquet")
    table = pq.read_table(merged)
    assert table.schema == RECORD_SCHEMA
    assert table.column("cache_hit").to_pylist() == [None, None] + [False] * (MERGE_PARTS_ABOVE + 1)
    assert table.column("id").to_pylist() == [f"id{i}" for i in range(MERGE_PARTS_ABOVE + 3)]
