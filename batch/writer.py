"""Checkpoints and the final output.

Every result goes to a write-ahead log the moment it arrives: a plain append survives kill -9,
and an fsync on a short timer covers power loss. The log is compacted into Parquet part files,
each written to a temp file, fsynced and renamed, so a resume never trusts a half-written file.
A record can sit in both a part and the log (a kill between rename and truncate): readers keep
the last record per id, and the two copies are identical.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

RESULT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("seq", pa.int64()),
    ("status", pa.string()),
    ("response", pa.string()),
    ("reasoning_content", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("total_tokens", pa.int64()),
    ("cost", pa.float64()),
    ("model", pa.string()),
    ("request_id", pa.string()),
    ("latency_s", pa.float64()),
    ("attempts", pa.int32()),
    ("error_class", pa.string()),
    ("error", pa.string()),
    ("cache_hit", pa.bool_()),
])
RESULT_FIELDS = RESULT_SCHEMA.names
WAL_NAME = "wal.jsonl"
MERGE_PARTS_ABOVE = 32
FSYNC_EVERY_S = 1.0


class Checkpoint:
    def __init__(self, folder: Path, rows_per_part: int = 1000, seconds_per_part: float = 10.0) -> None:
        self.folder = folder
        self.rows_per_part = rows_per_part
        self.seconds_per_part = seconds_per_part
        self._pending: list[dict[str, Any]] = []
        self._wal: Any = None
        self._last_compact = time.monotonic()
        self._last_fsync = time.monotonic()
        self._dirty = False
        self.appended = 0

    # -- opening and reading ---------------------------------------------------------------
    def open(self) -> dict[str, str]:
        """Recover a previous run's log; returns, per id answered so far, "ok" or its failure's error_class."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp"):
            stale.unlink()
        recovered = list(_read_wal(self.folder / WAL_NAME))
        if recovered:
            self._write_part(recovered)
        if len(self._parts()) > MERGE_PARTS_ABOVE:
            self._merge_parts()
        self._wal = open(self.folder / WAL_NAME, "w", encoding="utf-8")
        self._fsync_dir()
        return states_of(self._read_parts(["id", "status", "error_class"]))

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def _read_parts(self, columns: list[str] | None = None) -> pa.Table:
        tables = [pq.read_table(p, columns=columns, schema=RESULT_SCHEMA) for p in self._parts()]
        if not tables:
            return RESULT_SCHEMA.empty_table().select(columns or RESULT_FIELDS)
        return pa.concat_tables(tables)

    def newer_than(self, path: Path) -> bool:
        """Whether any result on disk is newer than `path` (or `path` does not exist)."""
        if not path.exists():
            return True
        built = path.stat().st_mtime_ns
        return any(part.stat().st_mtime_ns > built for part in self._parts())

    def results(self) -> pa.Table:
        """All results, the last one per id (a retried failure replaced by its new answer)."""
        return _last_per_id(self._read_parts())

    def snapshot(self) -> pa.Table:
        """Results so far, log included, read without touching the folder: safe while a run is alive."""
        if not self.folder.is_dir():
            return RESULT_SCHEMA.empty_table()
        logged = pa.Table.from_pylist(list(_read_wal(self.folder / WAL_NAME)), schema=RESULT_SCHEMA)
        return _last_per_id(pa.concat_tables([self._read_parts(), logged]))

    # -- writing ---------------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> None:
        self._wal.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._wal.flush()  # Into the OS now: survives the death of this process.
        self._pending.append(record)
        self._dirty = True
        self.appended += 1
        if len(self._pending) >= self.rows_per_part:
            self.compact()

    def tick(self) -> None:
        """Called on a timer: fsync the log, and compact when the last part is old enough."""
        now = time.monotonic()
        if self._dirty and now - self._last_fsync >= FSYNC_EVERY_S:
            os.fsync(self._wal.fileno())
            self._dirty = False
            self._last_fsync = now
        if self._pending and now - self._last_compact >= self.seconds_per_part:
            self.compact()

    def compact(self) -> None:
        if self._pending:
            self._write_part(self._pending)
            self._pending = []
            self._wal.seek(0)
            self._wal.truncate()
            self._dirty = False
        self._last_compact = time.monotonic()

    def close(self) -> None:
        if self._wal is None:
            return
        self.compact()
        self._wal.close()
        self._wal = None

    def _write_part(self, records: list[dict[str, Any]]) -> None:
        parts = self._parts()
        number = int(parts[-1].stem.split("-")[1]) + 1 if parts else 1
        table = pa.Table.from_pylist(records, schema=RESULT_SCHEMA)
        _write_atomic(table, self.folder / f"part-{number:06d}.parquet")

    def _merge_parts(self) -> None:
        old = self._parts()
        merged = pa.concat_tables([pq.read_table(p, schema=RESULT_SCHEMA) for p in old])
        number = int(old[-1].stem.split("-")[1]) + 1
        _write_atomic(merged, self.folder / f"part-{number:06d}.parquet")
        for path in old:
            path.unlink()

    def _fsync_dir(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def states_of(table: pa.Table) -> dict[str, str]:
    """Per id: "ok", or the error_class of its failure (the last record per id wins)."""
    states = pc.if_else(pc.equal(table.column("status"), "ok"), "ok", table.column("error_class"))
    return dict(zip(table.column("id").to_pylist(), states.to_pylist()))


def _last_per_id(table: pa.Table) -> pa.Table:
    if table.num_rows == 0:
        return table
    table = table.append_column("_order", pa.array(range(table.num_rows), pa.int64()))
    last = table.group_by("id", use_threads=False).aggregate([("_order", "max")]).column("_order_max")
    return table.take(pc.take(last, pc.sort_indices(last))).drop_columns(["_order"])


def _read_wal(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # The tail of a write cut by a kill: that answer was still in flight.
            if isinstance(record, dict) and record.get("id") is not None:
                yield record


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as written:
        os.fsync(written.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_final(path: Path, input_batches: Iterator[pa.RecordBatch], row_ids: Iterator[str], id_out: str,
                keep_columns: list[str], results: pa.Table, extra: Any = None) -> int:
    """Every input row once, in input order, beside its result (and `extra`, a DataFrame by id)."""
    import pandas as pd

    extra_schema = pa.Schema.from_pandas(extra, preserve_index=False) if extra is not None else pa.schema([])
    by_id = results.drop_columns(["seq"]).to_pandas().set_index("id")
    result_columns = [c for c in RESULT_FIELDS if c not in ("id", "seq")]
    writer = None
    written = 0
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        for batch in input_batches:
            ids = [next(row_ids) for _ in range(batch.num_rows)]
            frame = pd.DataFrame({id_out: ids})
            for column in keep_columns:
                if column != id_out:
                    frame[column] = batch.column(column).to_pandas()
            answers = by_id.reindex(ids)
            for column in result_columns:
                frame[column] = answers[column].to_numpy()
            if extra is not None:
                parsed = extra.reindex(ids)
                for column in extra.columns:
                    frame[column] = parsed[column].to_numpy()
            table = pa.Table.from_pandas(frame, preserve_index=False)
            table = table.cast(_final_schema(table.schema, id_out, keep_columns, batch.schema, extra_schema))
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            written += table.num_rows
        if writer is not None:
            writer.close()
            writer = None
        with open(tmp, "rb") as done:
            os.fsync(done.fileno())
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing that looks like output
    return written


def _final_schema(schema: pa.Schema, id_out: str, keep_columns: list[str], input_schema: pa.Schema,
                  extra_schema: pa.Schema) -> pa.Schema:
    fields = []
    for field in schema:
        if field.name in extra_schema.names:
            fields.append(extra_schema.field(field.name))
        elif field.name == id_out:
            fields.append(pa.field(id_out, pa.string()))
        elif field.name in RESULT_FIELDS:
            fields.append(RESULT_SCHEMA.field(field.name))
        elif field.name in input_schema.names:
            fields.append(input_schema.field(field.name))
        else:
            fields.append(field)
    return pa.schema(fields)
