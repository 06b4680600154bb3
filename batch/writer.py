"""Checkpoints: the write-ahead log and the Parquet parts it is compacted into (final.py writes the output).

Every result goes to a write-ahead log the moment it arrives: a plain append survives kill -9,
and an fsync on a short timer covers power loss. The log is compacted into Parquet part files,
each written to a temp file, fsynced and renamed, so a resume never trusts a half-written file.
A record can sit in both a part and the log (a kill between rename and truncate): readers keep
the last record per id, and the two copies are identical.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.answered import Answered, RowStates

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
    # CRC-32 of the row's prompt values when it was sent (reader.prompt_hashes): a row whose values were
    # edited since is sent again. Null in checkpoints written before it existed: those are taken as unchanged.
    ("prompt_hash", pa.uint32()),
])
RESULT_FIELDS = RESULT_SCHEMA.names
WAL_NAME = "wal.jsonl"
MERGE_PARTS_ABOVE = 32
MERGE_BATCH_ROWS = 4096  # rows per row group of a merged part: the writer holds ~5x a row group
MERGE_FILE_ROWS = 64 * MERGE_BATCH_ROWS
STATE_COLUMNS = ["id", "status", "error_class"]
# Dictionary-encoded when written: the columns with a handful of distinct values. The others (ids, answers)
# are unique per row, and a dictionary builder per column held ~10 MB while it found that out.
DICTIONARY_COLUMNS = ["status", "finish_reason", "model", "error_class"]
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
        # Rows per row group of each part file, by name, as read or written: the final file and the merge
        # need them for every part, and parsing a thousand footers again cost 7 MB of peak RSS.
        self._group_rows: dict[str, list[int]] = {}

    # -- opening and reading ---------------------------------------------------------------
    def open(self) -> None:
        """Recover a previous run's log into a part, and start a new one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp"):
            stale.unlink()
        recovered = list(_read_wal(self.folder / WAL_NAME))
        if recovered:
            self._write_part(recovered)
        self._wal = open(self.folder / WAL_NAME, "w", encoding="utf-8")
        self._fsync_dir()

    def answered(self) -> Answered:
        """The last record per id in the part files (the log is in them after open() and close())."""
        return answered_of(self._read_parts(STATE_COLUMNS))

    def row_states(self, rows: int, row_hashes: np.ndarray | None, row_prompts: np.ndarray | None = None,
                   with_log: bool = False) -> RowStates:
        """The last record of each of the input's rows (its ids' and prompts' hashes from the scan: None when
        there are no records). `with_log`: the log's records too, read without touching it (a run may be alive)."""
        states = RowStates(rows, row_hashes, row_prompts)
        columns = ["id", "seq", "status", "error_class", "prompt_hash"]
        bunches = _bunches(self._parts(), columns, self._group_rows)
        if with_log:
            logged = pa.Table.from_pylist(list(_read_wal(self.folder / WAL_NAME)), schema=RESULT_SCHEMA)
            bunches = itertools.chain(bunches, [logged.select(columns).combine_chunks()])
        for records in bunches:
            if records.num_rows:
                states.add(*(records.column(c).chunk(0) for c in columns))
        states.settle()
        return states

    def spent(self, states: RowStates) -> tuple[float, int]:
        """What the job has paid so far: (cost, tokens) summed over each id's last record, which holds the sum
        over all that id's answers; answers taken from the cache cost no tokens. Read a bunch of parts at a time."""
        last = states.last_records()
        cost, tokens, at = 0.0, 0, 0
        for records in _bunches(self._parts(), ["cost", "total_tokens", "cache_hit"], self._group_rows):
            mine = pa.array(last[at:at + records.num_rows])
            at += records.num_rows
            cost += pc.sum(records.column("cost").filter(mine)).as_py() or 0.0
            sent = pc.and_(mine, pc.invert(pc.fill_null(records.column("cache_hit"), False)))
            tokens += pc.sum(records.column("total_tokens").filter(sent)).as_py() or 0
        return cost, tokens

    def has_records(self) -> bool:
        """Whether a previous run left any record (a part, or a log not yet compacted)."""
        wal = self.folder / WAL_NAME
        return bool(self._parts()) or (wal.exists() and wal.stat().st_size > 0)

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def row_groups(self) -> RowGroups:
        """The part files as one table of records in write order, read a row group at a time."""
        return RowGroups(self._parts(), self._group_rows)

    def records(self, columns: list[str] | None = None) -> pa.Table:
        """Every record in the part files, in write order (several per id when a failure was retried)."""
        return self._read_parts(columns)

    def _read_parts(self, columns: list[str] | None = None) -> pa.Table:
        # File by file, not through pyarrow.dataset: 0.4 s for 900 parts where the dataset takes 0.7 s,
        # plus 0.6 s and 43 MB to import it.
        columns = columns or RESULT_FIELDS
        tables = [_conformed(part.read(columns=_present(part, columns)), columns) for part in self._part_files()]
        return pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table().select(columns)

    def _part_files(self) -> Iterator[pq.ParquetFile]:
        for path in self._parts():
            yield pq.ParquetFile(pa.OSFile(str(path)), pre_buffer=False)  # a native file: no filesystem lookup

    def newer_than(self, path: Path, source: Path) -> bool:
        """Whether any result on disk, or the `source` it was made from, is newer than `path` (or no `path` exists)."""
        if not path.exists():
            return True
        built = path.stat().st_mtime_ns
        return any(part.stat().st_mtime_ns > built for part in [source, *self._parts()])

    def results(self, columns: list[str] | None = None) -> pa.Table:
        """All results, the last one per id (a retried failure replaced by its new answer)."""
        return self._read_parts(columns).take(_sorted(self.answered().records))

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

    def close(self, merge: bool = True) -> None:
        if self._wal is None:
            return
        self.compact()
        self._wal.close()
        self._wal = None
        if merge:
            self.merge()

    def merge(self) -> None:
        """Many parts into a few (_merge_parts). At the end of a run, not at open: a resume reads a thousand
        small parts in a fraction of a second, while merging them first would delay its first request by seconds."""
        if len(self._parts()) > MERGE_PARTS_ABOVE:
            self._merge_parts()

    def _write_part(self, records: list[dict[str, Any]]) -> None:
        parts = self._parts()
        number = int(parts[-1].stem.split("-")[1]) + 1 if parts else 1
        table = pa.Table.from_pylist(records, schema=RESULT_SCHEMA)
        name = f"part-{number:06d}.parquet"
        _write_atomic(self.folder / name, lambda tmp: pq.write_table(table, tmp, row_group_size=len(records)))
        self._group_rows[name] = [len(records)]

    def _merge_parts(self) -> None:
        """Runs of consecutive parts into files of up to MERGE_FILE_ROWS records, streamed.

        Each merged file replaces the last part of its run, then the run's other parts are deleted:
        a kill in between leaves copies of records after their originals and before every later
        part, so the last record per id is still the right one. A file stays within MERGE_FILE_ROWS
        because the writer holds metadata for every row group until it closes (~30 KB each).
        """
        for run in _runs_of_parts(self._parts(), self._group_rows):
            if len(run) > 1:
                _write_atomic(run[-1], lambda tmp, run=run: _write_merged(run, tmp))
                for path in run:
                    self._group_rows.pop(path.name, None)
                for path in run[:-1]:
                    path.unlink()

    def _fsync_dir(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class RowGroups:
    """Records in write order across part files, read by position, a row group at a time.

    Only each row group's place is held, so the final file can take the records of one window of
    input rows without reading the others.
    """

    def __init__(self, paths: list[Path], known: dict[str, list[int]]) -> None:
        self.paths = paths
        groups = []  # (part number, row group, first record's position)
        position = 0
        for number, path in enumerate(paths):
            for group, rows in enumerate(_group_rows_of(path, known)):
                groups.append((number, group, position))
                position += rows
        self._groups = np.array(groups, np.int64).reshape(-1, 3)
        self._open: tuple[int, pq.ParquetFile] | None = None

    def take(self, positions: np.ndarray, columns: list[str]) -> pa.Table:
        """The records at these positions in write order (rows of one table across all parts)."""
        owner = np.searchsorted(self._groups[:, 2], positions, side="right") - 1
        pieces, placed = [], np.empty(len(positions), np.int64)
        done = 0
        for at in np.unique(owner):
            number, group, first = (int(v) for v in self._groups[at, :3])
            mine = np.flatnonzero(owner == at)
            pieces.append(self._read(number, group, columns).take(pa.array(positions[mine] - first)))
            placed[mine] = done + np.arange(len(mine))
            done += len(mine)
        table = pa.concat_tables(pieces) if pieces else RESULT_SCHEMA.empty_table().select(columns)
        return table.take(pa.array(placed))

    def _read(self, number: int, group: int, columns: list[str]) -> pa.Table:
        # The part last read stays open: a merged part's footer describes hundreds of row groups, and
        # parsing it again for every window of the final file cost time and ~10 MB of peak RSS at 1M rows.
        if self._open is None or self._open[0] != number:
            self._open = (number, pq.ParquetFile(pa.OSFile(str(self.paths[number])), pre_buffer=False))
        part = self._open[1]
        return _conformed(part.read_row_group(group, columns=_present(part, columns), use_threads=False), columns)


def _runs_of_parts(paths: list[Path], known: dict[str, list[int]]) -> list[list[Path]]:
    runs: list[list[Path]] = []
    rows = 0
    for path in paths:
        count = sum(_group_rows_of(path, known))
        if not runs or rows + count > MERGE_FILE_ROWS:
            runs.append([])
            rows = 0
        runs[-1].append(path)
        rows += count
    return runs


def _group_rows(meta: pq.FileMetaData) -> list[int]:
    return [meta.row_group(group).num_rows for group in range(meta.num_row_groups)]


def _group_rows_of(path: Path, known: dict[str, list[int]]) -> list[int]:
    if path.name not in known:
        known[path.name] = _group_rows(pq.ParquetFile(pa.OSFile(str(path))).metadata)
    return known[path.name]


def _write_merged(paths: list[Path], tmp: Path) -> None:
    with pq.ParquetWriter(tmp, RESULT_SCHEMA, use_dictionary=DICTIONARY_COLUMNS) as writer:
        for records in _bunches(paths, RESULT_FIELDS, {}):
            writer.write_table(records)


def _bunches(paths: list[Path], columns: list[str], known: dict[str, list[int]]) -> Iterator[pa.Table]:
    """The parts' records, in write order, as tables of MERGE_BATCH_ROWS or more (the last may be short),
    one chunk each. A killed run leaves many small parts: each is read whole, and they are handled in
    bunches, not one by one. Notes each part's row-group sizes in `known` on the way."""
    held: list[pa.Table] = []
    for path in paths:
        part = pq.ParquetFile(pa.OSFile(str(path)), pre_buffer=False)
        known[path.name] = _group_rows(part.metadata)
        present = _present(part, columns)
        if part.metadata.num_rows <= MERGE_BATCH_ROWS:
            tables: Iterator[pa.Table] = iter([part.read(columns=present, use_threads=False)])
        else:
            tables = (pa.Table.from_batches([b])
                      for b in part.iter_batches(MERGE_BATCH_ROWS, columns=present, use_threads=False))
        for table in tables:
            held.append(_conformed(table, columns))
            if sum(t.num_rows for t in held) >= MERGE_BATCH_ROWS:
                yield pa.concat_tables(held).combine_chunks()
                held = []
    if held:
        yield pa.concat_tables(held).combine_chunks()


def _present(part: pq.ParquetFile, columns: list[str]) -> list[str]:
    names = set(part.schema_arrow.names)
    return [c for c in columns if c in names]


def _conformed(table: pa.Table, columns: list[str]) -> pa.Table:
    """`table` as these RESULT_SCHEMA columns; a column a part was written without reads as nulls."""
    schema = pa.schema([RESULT_SCHEMA.field(c) for c in columns])
    return pa.table([table.column(c) if c in table.column_names else pa.nulls(table.num_rows, schema.field(c).type)
                     for c in columns], schema=schema)


def answered_of(table: pa.Table) -> Answered:
    """Per id, its last record's state, from a table of records (id, status, error_class) in write order."""
    return Answered(*(table.column(name) for name in STATE_COLUMNS))


def _last_per_id(table: pa.Table) -> pa.Table:
    return table.take(_sorted(answered_of(table).records))


def _sorted(positions: pa.Array) -> np.ndarray:
    return np.sort(positions.to_numpy())  # the kept records in the order they were written


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


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as written:
        os.fsync(written.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

