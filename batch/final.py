"""The final output: every input row once, in input order, beside its last record.

The checkpoint is never read whole. The input streams in windows of rows, and for a window of
input positions [a, b) only the records whose `seq` lies in [a, b) are read: Parquet statistics
on `seq` skip every other row group. A row's record is found there when the row has not moved
since it was answered; a row that did move (an input edited and resumed with --force) is looked
up by its id among all records instead, which is slower but just as exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.answered import Answered
from batch.writer import RESULT_FIELDS, RESULT_SCHEMA, RowGroups

WINDOW_ROWS = 16_384  # input rows per read of the checkpoint: a few MB of records at a time
RESULT_COLUMNS = [c for c in RESULT_FIELDS if c not in ("id", "seq")]


class Records:
    """Where each input row's last record sits, and those records read a window of rows at a time.

    `groups` holds every record in write order (None: no parts), `answered` each id's last one,
    and `seqs` every record's `seq` (the input position it was sent from), in write order too.
    """

    def __init__(self, groups: RowGroups | None, answered: Answered, seqs: pa.ChunkedArray) -> None:
        self.groups = groups
        self.answered = answered
        # The input position of each id's last record: a row is found by position when it is still there.
        self.last_seq = _numpy(pa.chunked_array(seqs.chunks, pa.int64())).take(_numpy(answered.records))

    def answers(self, ids: pa.Array, start: int) -> pa.Table:
        """The result columns of the last record of each of `ids` (input rows start, start+1, ...); nulls when none."""
        n = len(ids)
        at = self.answered.index(ids)
        known = ~_numpy(at.is_null())
        where = np.where(known, _numpy(at.fill_null(0)), 0)
        in_place = known & (self.last_seq.take(where) == np.arange(start, start + n)) if len(self.last_seq) else known
        pick = np.full(n, -1, np.int64)  # per row: its record's position in `found`
        pieces = []
        found = self._window(ids, start)
        if found is not None:
            pieces.append(found.table)
            pick[in_place] = found.last[in_place]
        moved = np.flatnonzero(known & (pick < 0))  # rows not where they were answered: by id, among all records
        if len(moved):
            positions = _numpy(self.answered.records.take(pa.array(where[moved])))
            offset = sum(p.num_rows for p in pieces)
            pieces.append(self.groups.take(positions, RESULT_COLUMNS))  # type: ignore[union-attr]
            pick[moved] = offset + np.arange(len(moved))
        table = pa.concat_tables(pieces) if pieces else RESULT_SCHEMA.empty_table().select(RESULT_COLUMNS)
        return table.take(pa.array(pick, pa.int64(), mask=pick < 0))

    def _window(self, ids: pa.Array, start: int) -> _Found | None:
        if self.groups is None:
            return None
        table = self.groups.seq_range(start, start + len(ids), ["id", "seq", *RESULT_COLUMNS])
        offsets = _numpy(table.column("seq")) - start
        # A record counts for the row now at its position only if it carries that row's id.
        same = _numpy(pc.equal(table.column("id"), ids.take(pa.array(offsets))))
        last = np.full(len(ids), -1, np.int64)
        np.maximum.at(last, offsets[same], np.flatnonzero(same))  # written last wins
        return _Found(table.select(RESULT_COLUMNS), last)


class _Found:
    def __init__(self, table: pa.Table, last: np.ndarray) -> None:
        self.table, self.last = table, last


def write_final(path: Path, input_batches: Iterator[tuple[pa.RecordBatch, pa.Array]], id_out: str,
                keep_columns: list[str], records: Records, extra: Any = None) -> int:
    """Every input row once, in input order, beside its last record (and `extra`, a DataFrame by id).

    Written to a temp file, fsynced and renamed: a failed write leaves nothing that looks like output.
    """
    extra_schema = pa.Schema.from_pandas(extra, preserve_index=False) if extra is not None else None
    writer = None
    written = 0
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        for window in _windows(input_batches):
            ids = pa.concat_arrays([i for _, i in window])
            answers = records.answers(ids, written)
            at = 0
            for batch, batch_ids in window:  # one row group per input batch, as before
                columns = {id_out: batch_ids, **{c: batch.column(c) for c in keep_columns if c != id_out}}
                columns.update(zip(RESULT_COLUMNS, answers.slice(at, batch.num_rows).columns))
                at += batch.num_rows
                if extra is not None:
                    parsed = pa.Table.from_pandas(extra.reindex(batch_ids.to_pylist()), preserve_index=False)
                    columns.update((f.name, parsed.column(f.name).cast(f.type)) for f in extra_schema)
                table = pa.table(columns)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
            written += len(ids)
        if writer is not None:
            writer.close()
            writer = None
        with open(tmp, "rb") as done:
            os.fsync(done.fileno())
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return written


def _windows(batches: Iterator[tuple[pa.RecordBatch, pa.Array]]) -> Iterator[list[tuple[pa.RecordBatch, pa.Array]]]:
    window: list[tuple[pa.RecordBatch, pa.Array]] = []
    rows = 0
    for batch, ids in batches:
        window.append((batch, ids))
        rows += batch.num_rows
        if rows >= WINDOW_ROWS:
            yield window
            window, rows = [], 0
    if window:
        yield window


def _numpy(array: Any) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False) if not isinstance(array, pa.ChunkedArray)
                      else array.to_numpy())
