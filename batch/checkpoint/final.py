"""The final output: every input row once, in input order, beside its last record.

The checkpoint is never read whole. The input streams in windows of rows; RowStates says where
each row's last record was written, and only the row groups holding a window's records are read.
With parse_json, the replies' keys are found in one streaming pass first (batch.replies), and each
window's reply columns are made from the records read for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.checkpoint.answered import RowStates, with_paid_in_all
from batch.checkpoint.writer import Checkpoint, RowGroups
from batch.records import DICTIONARY_FIELDS, OUTPUT_FIELDS, RECORD_FIELDS, RECORD_SCHEMA
from batch.replies.columns import ReplyColumns
from batch.shard import shard_of
from batch.storage.locations import input_version, object_at

if TYPE_CHECKING:
    from batch.plan import OutputSettings, Settings

WINDOW_ROWS = 4096  # input rows per read of the checkpoint: its records arrive a row group at a time
# Rows per row group of the output. The writer holds ~30 KB of metadata per row group until it closes
# (7 MB at a million rows in 4,096-row groups), and the rows of one group until it is written.
ROW_GROUP_ROWS = 16_384
# The final file's footer keys: the settings it was written with (output_settings), and what it was made from
# (made_from).
SETTINGS_KEY = b"batch.output_settings"
MADE_FROM_KEY = b"batch.made_from"
# The rows written, set as the writer closes: a file cut short or filtered by another program that keeps the footer
# (pyarrow's write_table of a table read from it does) has another count, so it is not taken for batch's.
ROWS_KEY = b"batch.rows"


def output_settings(out: OutputSettings, schema: dict[str, Any] | None) -> str:
    """What shapes the final file beside the records and the input, as JSON text: its id and kept columns, and
    the reply columns (`schema`: output.json_schema as read, which a --force resume may have changed)."""
    return json.dumps({"id_column": out.id_column, "keep_columns": out.keep_columns, "parse_json": out.parse_json,
                       "json_columns": out.json_columns, "json_schema": schema},
                      ensure_ascii=False, sort_keys=True, default=str)


def made_from(checkpoint: Checkpoint, source: Path) -> str:
    """What a final file written now is made of, as JSON text: the checkpoint's parts as they are (records_version)
    and the version of the input file `source` (an edit, or another file put in its place, changes it)."""
    return json.dumps({"records": checkpoint.records_version(), "input": input_version(source)})


def output_footer(settings: str, made_of: str) -> dict[bytes, bytes]:
    """The final file's footer: its settings (output_settings) and what it was made from (made_from)."""
    return {SETTINGS_KEY: settings.encode("utf-8"), MADE_FROM_KEY: made_of.encode("utf-8")}


def merged_footer(whole: Settings, checkpoints: Iterable[Checkpoint]) -> dict[bytes, bytes]:
    """The footer of the job's output merged from the shards' `checkpoints` (in shard order) as they are now: an
    output with this footer is the one `batch merge` would write from them."""
    made = json.dumps([made_from(checkpoint, whole.locations.input) for checkpoint in checkpoints])
    return output_footer(output_settings(whole.output, whole.schema), made)


def is_current(path: Path, footer: dict[bytes, bytes]) -> bool:
    """Whether the final file at `path` is what writing it now would give: its footer is `footer` (output_footer),
    and it holds the rows batch wrote. A file written before the footer said these is written again, once."""
    store, key = object_at(path)
    try:
        with store.open_read(key) as stream:
            meta = pq.read_metadata(stream)
    except (OSError, pa.ArrowException):  # none, or unreadable: written again
        return False
    found = meta.metadata or {}
    return (found.get(ROWS_KEY) == str(meta.num_rows).encode()
            and all(found.get(name) == value for name, value in footer.items()))


def reply_columns(out: OutputSettings, schema: dict[str, Any] | None, replies: Iterable[pa.Table]
                  ) -> ReplyColumns | None:
    """The reply columns of a parse_json job (None without), from each id's last status and response."""
    if not out.parse_json:
        return None
    wanted = list(out.json_columns) if out.json_columns is not None else None
    return ReplyColumns(replies, wanted, {out.id_column, *out.keep_columns, *RECORD_FIELDS}, schema)


class LastRecords:
    """Each input row's last record, read a window of rows at a time.

    `groups` holds every record in write order (None: no parts); `states` where each row's last one is.
    """

    def __init__(self, groups: RowGroups | None, states: RowStates) -> None:
        self.groups = groups
        self.states = states

    def answers(self, ids: pa.Array, start: int) -> pa.Table:
        """The output fields of the last record of each of `ids` (input rows start, start+1, ...); nulls when none."""
        written = self.states.last(start, ids)[1]
        known = np.flatnonzero(written >= 0)
        pick = np.full(len(ids), -1, np.int64)
        if self.groups is None or len(known) == 0:
            return RECORD_SCHEMA.empty_table().select(OUTPUT_FIELDS).take(pa.array(pick, mask=pick < 0))
        found = self.groups.take(written[known], ["id", *OUTPUT_FIELDS])
        if not pc.all(pc.equal(found.column("id"), ids.take(pa.array(known)))).as_py():
            # Two ids with one 64-bit hash: a record paired with the wrong row. Never seen; refuse rather than guess.
            raise RuntimeError("a checkpoint record was matched to the wrong input row (hash collision); "
                               "please report this")
        found = with_paid_in_all(found, *self.states.paid_at(written[known]))
        pick[known] = np.arange(len(known))
        return found.select(OUTPUT_FIELDS).take(pa.array(pick, mask=pick < 0))


class ShardRecords:
    """Each input row's last record in the checkpoint of the shard the row belongs to (batch/shard.py): the records
    `batch merge` writes, read as LastRecords reads one checkpoint. `shards[k]` is shard k's LastRecords, whose rows
    are numbered among the shard's own, in input order: the i-th row of the input that shard k selects is its row i.
    """

    def __init__(self, shards: list[LastRecords]) -> None:
        self.shards = shards
        self._next_row = [0] * len(shards)  # each shard's first row in the next window
        self._next_start = 0

    def answers(self, ids: pa.Array, start: int) -> pa.Table:
        """As LastRecords.answers, for input rows start, start+1, ... (asked for in input order, window by window)."""
        assert start == self._next_start, "windows asked for out of input order"
        self._next_start += len(ids)
        which = shard_of(ids, len(self.shards))
        pieces, placed = [], []
        for index, records in enumerate(self.shards):
            rows = np.flatnonzero(which == index)
            if len(rows):
                pieces.append(records.answers(ids.take(pa.array(rows)), self._next_row[index]))
                self._next_row[index] += len(rows)
                placed.append(rows)
        if not pieces:
            return RECORD_SCHEMA.empty_table().select(OUTPUT_FIELDS)
        order = np.empty(len(ids), np.int64)  # where each input row's answer sits among the pieces
        order[np.concatenate(placed)] = np.arange(len(ids))
        return pa.concat_tables([piece.cast(pieces[0].schema) for piece in pieces]).take(pa.array(order))


def write_final(path: Path, input_batches: Iterator[tuple[pa.RecordBatch, pa.Array]], id_out: str,
                keep_columns: list[str], records: LastRecords | ShardRecords, replies: ReplyColumns | None = None,
                window_rows: int = WINDOW_ROWS, footer: dict[bytes, bytes] | None = None) -> int:
    """Every input row once, in input order, beside its last record (and its reply's columns, with `replies`),
    reading the checkpoint for `window_rows` input rows at a time; `footer` (output_footer) in its footer.

    Written as one whole object (batch.storage): a failed write leaves nothing that looks like output.
    """
    written = 0

    def write(sink: BinaryIO) -> None:
        nonlocal written
        written = _write_rows(sink, _windows(input_batches, window_rows), id_out, keep_columns, records, replies,
                              footer or {})

    store, key = object_at(path)
    store.replace(key, write)
    return written


def _write_rows(sink: BinaryIO, windows: Iterator[list[tuple[pa.RecordBatch, pa.Array]]], id_out: str,
                keep_columns: list[str], records: LastRecords | ShardRecords, replies: ReplyColumns | None,
                footer: dict[bytes, bytes]) -> int:
    writer = None
    written = flushed = 0  # rows read, rows written out
    held: list[pa.Table] = []
    # The store closes the file, failed write or not (a full disk), and deletes it: its space is free at once.
    try:
        for window in windows:
            ids = pa.concat_arrays([i for _, i in window])
            answers = records.answers(ids, written)
            parsed = replies.columns(answers) if replies is not None else []
            at = 0
            for batch, batch_ids in window:
                columns = {id_out: batch_ids, **{c: batch.column(c) for c in keep_columns if c != id_out}}
                columns.update(zip(OUTPUT_FIELDS, answers.slice(at, batch.num_rows).columns))
                columns.update((name, values.slice(at, batch.num_rows)) for name, values in parsed)
                at += batch.num_rows
                held.append(_table(columns, replies))
            written += len(ids)
            if written - flushed >= ROW_GROUP_ROWS:
                writer = _write_group(writer, sink, held, footer)
                held, flushed = [], written
        if held:
            writer = _write_group(writer, sink, held, footer)
        if writer is not None:
            writer.add_key_value_metadata({ROWS_KEY: str(written).encode()})
    finally:
        if writer is not None:
            writer.close()
    return written


def _table(columns: dict[str, pa.Array], replies: ReplyColumns | None) -> pa.Table:
    """The window's columns as a table, the reply columns with their fields' metadata (which say JSON text)."""
    fields = {field.name: field for field in replies.fields} if replies is not None else {}
    return pa.table(columns, schema=pa.schema([fields.get(name) or pa.field(name, values.type)
                                               for name, values in columns.items()]))


def _write_group(writer: pq.ParquetWriter | None, sink: BinaryIO, tables: list[pa.Table],
                 footer: dict[bytes, bytes]) -> pq.ParquetWriter:
    """One row group, whatever size the input's batches are."""
    table = pa.concat_tables(tables)
    if writer is None:
        writer = pq.ParquetWriter(sink, table.schema.with_metadata(footer), use_dictionary=DICTIONARY_FIELDS)
    writer.write_table(table)
    return writer


def _windows(batches: Iterator[tuple[pa.RecordBatch, pa.Array]],
             window_rows: int) -> Iterator[list[tuple[pa.RecordBatch, pa.Array]]]:
    window: list[tuple[pa.RecordBatch, pa.Array]] = []
    rows = 0
    for batch, ids in batches:
        window.append((batch, ids))
        rows += batch.num_rows
        if rows >= window_rows:
            yield window
            window, rows = [], 0
    if window:
        yield window

