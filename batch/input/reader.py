"""The input table, streamed in record batches: the whole table is never in memory."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batch.errors import ConfigError, InputChangedError
from batch.shard import Shard, crc32_each
from batch.storage.locations import input_kind, input_version, is_url, open_input
from batch.wording import counted

BATCH_ROWS = 8192
# Arrow's CSV reader reads up to 32 blocks ahead of the consumer: 1 MB blocks held ~35 MB at a million
# rows (and only 10 MB at 100,000, the whole file); 256 KB blocks hold at most ~10 MB.
CSV_BLOCK_BYTES = 1 << 18
# A CSV record must fit in two blocks: a longer one makes the reader start again with blocks large enough
# (Arrow holds ~32 blocks ahead, so a file of long rows costs memory), up to rows of this size.
CSV_MAX_ROW_BYTES = 64 << 20
# Quoted values may span lines: the chunker must follow quotes to find where a record ends.
_CSV_PARSE = pacsv.ParseOptions(newlines_in_values=True)
# Arrow takes a quote still open at the end of the file for a value running to the end: every row after
# a stray quote would vanish into one value. A line of these after the file's last line shows whether
# the parse ended outside quotes: it comes back as a row of its own, or inside the open value.
_CSV_END_VALUE = "batch:end-of-input:5c0e7f"


@dataclass(slots=True)
class Row:
    seq: int  # position in the input, from 0
    id: str
    values: dict[str, Any]
    prompt_hash: int | None = None  # of its prompt values (prompt_hashes): a row edited since is sent again


@dataclass(slots=True)
class Skipped:
    count: int  # a run of consecutive rows the caller does not want


class InputTable:
    """One input file (.csv, .parquet, .jsonl) and the columns a job needs from it."""

    def __init__(self, path: Path, id_column: str | None, prompt_columns: list[str], keep_columns: list[str],
                 messages_column: str | None = None, *, shard: Shard | None = None, batch_rows: int = BATCH_ROWS,
                 csv_block_bytes: int = CSV_BLOCK_BYTES, csv_max_row_bytes: int = CSV_MAX_ROW_BYTES) -> None:
        self.path = path
        # A shard's rows only (batch/shard.py): every read below sees them alone, numbered from 0 in input order.
        self.shard = shard
        # Sizes of what is read at once (tests shrink them to cross their edges with small files).
        self.batch_rows = batch_rows
        self.csv_block_bytes = csv_block_bytes
        self.csv_max_row_bytes = csv_max_row_bytes
        self.messages_column = messages_column  # JSONL: read as JSON text, parsed row by row
        # A JSONL column's type, from its first value that is not null: a column empty on the first lines
        # still takes its values' type, and the reads after the scan use it from the first line.
        self._jsonl_types: dict[str, pa.DataType] = {}
        self.id_column = id_column
        self.prompt_columns = prompt_columns
        self.keep_columns = keep_columns
        self.format = path.suffix.lower().lstrip(".")
        kind = input_kind(path)
        if kind != "file":
            raise ConfigError(f"{path}: {'a folder, not a file' if kind == 'folder' else 'input file not found'}")
        self._version = input_version(path)  # the file every later read must still be (_check_unchanged)
        self.columns = self._column_names()
        self._check_columns()
        self.row_hashes: np.ndarray | None = None  # filled by scan(keep_hashes=True)
        self.row_prompts: np.ndarray | None = None  # likewise: each row's prompt_hashes

    def _parquet(self) -> pq.ParquetFile:
        """A reader of the Parquet input: a local file natively (no call back into Python), a URL's through fsspec."""
        source = open_input(self.path) if is_url(self.path) else pa.OSFile(str(self.path))
        return pq.ParquetFile(source, pre_buffer=False)

    def _column_names(self) -> list[str]:
        try:
            if self.format == "parquet":
                return list(self._parquet().schema_arrow.names)
            if self.format == "csv":
                return self._csv_header()
            first = next(self._jsonl_records(), None)
            if first is None:
                raise ConfigError(f"{self.path}: the input has no rows")
            return list(first[1])
        except (pa.ArrowInvalid, OSError) as exc:
            raise ConfigError(f"{self.path}: cannot read {self.format.upper()}: {_arrow_message(exc)}") from None
        except UnicodeDecodeError:  # column names that are not UTF-8
            raise ConfigError(f"{self.path}: cannot read {self.format.upper()}: "
                              "not UTF-8 text: save the file as UTF-8") from None

    def _separator_hint(self) -> str:
        """A CSV read as one column whose name holds a tab or a semicolon was separated by it, not by commas."""
        if self.format != "csv" or len(self.columns) != 1:
            return ""
        for separator, name in (("\t", "tabs"), (";", "semicolons")):
            if separator in self.columns[0]:
                return f": its header is one column holding {name}; batch reads CSV separated by commas"
        return ""

    def _check_columns(self) -> None:
        wanted = [("input.id_column", self.id_column)] if self.id_column else []
        wanted += [("prompt", c) for c in self.prompt_columns] + [("output.keep_columns", c) for c in self.keep_columns]
        for key, column in wanted:
            if column not in self.columns:
                raise ConfigError(
                    f"{self.path}: {key} names column '{column}', which is not in the input "
                    f"(columns: {', '.join(self.columns) or 'none'}){self._separator_hint()}"
                )
            if self.columns.count(column) > 1:
                raise ConfigError(f"{self.path}: {key} names column '{column}', which appears "
                                  f"{counted(self.columns.count(column), 'time')} in the input header")

    def batches(self, columns: list[str], first_group: int = 0) -> Iterator[pa.RecordBatch]:
        """Record batches holding just `columns`, in input order (Parquet: from row group `first_group`), their
        text columns as `string` whatever Arrow type they were written in (see plain_text).

        Each batch is given only once the file is seen to be the one first read (_check_unchanged): a row count,
        row hashes and prompt hashes from one version of the input never meet rows or kept columns of another.
        """
        try:
            for batch in self._read_batches(columns, first_group):
                self._check_unchanged()
                yield plain_text(batch)
        except (ConfigError, OSError):
            self._check_unchanged()  # a file changed mid-read can read as a broken one: the change is what to tell
            raise

    def _check_unchanged(self) -> None:
        """InputChangedError unless the file is the one first read: the same inode, size and modification time."""
        now = input_version(self.path)
        if now == self._version:
            return
        what = "was deleted or moved" if now is None else "was edited or replaced"
        raise InputChangedError(f"{self.path}: the input {what} while batch was reading it; nothing read from two "
                                "versions of it was used: run again to go on with the input as it is then (every "
                                "answer received so far is kept in the checkpoint)")

    def _read_batches(self, columns: list[str], first_group: int) -> Iterator[pa.RecordBatch]:
        columns = list(dict.fromkeys(columns)) or self.columns[:1]
        try:
            if self.format == "parquet":
                # pre_buffer (for object stores) would hold a whole row group's raw pages beside the decoded
                # ones: +20 MB of peak RSS at 100,000-row row groups, for no gain on a local disk. Arrow's
                # decoding threads allocate from their own glibc arenas, which keep what they free: threads
                # cost ~58 MB more peak RSS over a 1M-row final file (here and in writer.py), for no speed.
                # A reader per row group: one reader's buffers grew by ~1 MB with every row group it read.
                for group in range(first_group, self._parquet().metadata.num_row_groups):
                    parquet = self._parquet()
                    yield from parquet.iter_batches(self.batch_rows, [group], columns, use_threads=False)
            elif self.format == "csv":
                yield from self._csv_batches(columns)
            else:
                yield from self._jsonl_batches(columns)
        except pa.ArrowInvalid as exc:
            raise ConfigError(f"{self.path}: cannot read {self.format.upper()}: {_arrow_message(exc)}") from None

    def _csv_header(self) -> list[str]:
        """The header's names, by Python's csv module: Arrow would parse a first block of rows with it."""
        records = self._csv_records(strict_text=True)
        try:
            start, names = next(records, (1, []))
        finally:
            records.close()
        if not names:
            raise ConfigError(f"{self.path}: cannot read CSV: Empty CSV file (no header line)")
        if _first_multiline_field(names) is not None:
            raise ConfigError(f"{self.path} line {start}: a quoted column name runs past the end of the header "
                              "line (a stray '\"'?)")
        return names

    def _csv_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The file's rows, without the end line: a batch is held back until the next one shows it is not the last."""
        held: pa.RecordBatch | None = None
        try:
            for batch in self._csv_blocks(columns):
                if batch.num_rows:
                    if held is not None:
                        yield held
                    held = batch
        except pa.ArrowInvalid as exc:
            raise self._csv_error(exc) from None
        if held is None or not all(held.column(i)[-1].as_py() == _CSV_END_VALUE for i in range(held.num_columns)):
            raise ConfigError(self._csv_fault(unclosed=True) or f"{self.path}: a quoted value is never closed")
        if held.num_rows > 1:
            yield held.slice(0, held.num_rows - 1)

    def _csv_blocks(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The file and its end line, parsed; a record longer than two blocks starts the reading over with
        larger blocks, after the rows already given."""
        # Every CSV column as text: type inference per block can change its mind mid-file.
        convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, include_columns=columns,
                                       strings_can_be_null=False, quoted_strings_can_be_null=False)
        end_line = ("\n" + ",".join([_CSV_END_VALUE] * len(self.columns)) + "\n").encode()
        block, given = self.csv_block_bytes, 0
        while True:
            try:
                with open_input(self.path) as raw, pacsv.open_csv(
                        _WithEndLine(raw, end_line), read_options=pacsv.ReadOptions(block_size=block),
                        parse_options=_CSV_PARSE, convert_options=convert) as reader:
                    skip = given
                    for batch in reader:
                        if skip >= batch.num_rows:
                            skip -= batch.num_rows
                            continue
                        batch, skip = batch.slice(skip), 0
                        given += batch.num_rows
                        yield batch
                return
            except pa.ArrowInvalid as exc:
                if not _straddles(exc):
                    raise
                block = self._csv_block_for(given + 1, block)  # Arrow stops at the long record

    def _csv_block_for(self, row: int, block: int) -> int:
        """A block size for data row `row`, where Arrow stopped: a record that did not fit in two blocks of
        `block` bytes. An error if that record is a quote never closed, a ragged row, or over the limit.

        Only for such a record: it reads the raw file up to it (Python, ~1 s per million rows). Growing blocks
        blindly would let a stray quote early in a large file take ~32 blocks of up to the limit each (Arrow's
        read-ahead) before it was found."""
        records = self._csv_records()
        try:
            width = len(next(records)[1])
            start, fields = next(itertools.islice(records, row - 1, None), (0, []))
        finally:
            records.close()
        if fields and self._open_at_end(start):
            raise ConfigError(self._unclosed(start, fields))
        if fields and len(fields) != width:
            raise ConfigError(self._record_fault(start, fields, width))
        size = len("".join(fields).encode()) + 3 * len(fields)  # with its commas and quotes, about
        if size > self.csv_max_row_bytes:
            raise ConfigError(f"{self.path} row {row} (line {start}): a row of {size / (1 << 20):.0f} MB, longer "
                              f"than the {self.csv_max_row_bytes >> 20} MB a CSV row may hold "
                              "(Parquet and JSONL have no such limit)")
        if block >= self.csv_max_row_bytes:  # Python's csv module and Arrow disagree about this record
            raise ConfigError(f"{self.path}: cannot read CSV: no end found for row {row} (line {start})")
        block *= 4
        while block < size:
            block *= 4
        return block

    def _csv_error(self, exc: pa.ArrowInvalid) -> ConfigError:
        return ConfigError(self._csv_fault() or f"{self.path}: cannot read CSV: {_arrow_message(exc)}")

    def _csv_text(self, strict: bool = False) -> IO[str]:
        return io.TextIOWrapper(open_input(self.path), encoding="utf-8-sig", errors="strict" if strict else "replace",
                                newline="")

    def _csv_records(self, strict_text: bool = False) -> Iterator[tuple[int, list[str]]]:
        """The raw file's records, the header first, with the line each starts on (the header, and error paths:
        Python's csv module, ~1 s per million rows, where Arrow knows no line numbers)."""
        with _any_field_size(), self._csv_text(strict_text) as text:
            reader = csv.reader(text)
            start = 1
            for fields in reader:
                if fields:
                    yield start, fields
                start = reader.line_num + 1

    def _open_at_end(self, start: int) -> bool:
        """Whether the record starting on line `start` is a quoted value the file ends inside."""
        try:
            with _any_field_size(), self._csv_text() as text:
                next(csv.reader(itertools.islice(text, start - 1, None), strict=True), None)
        except csv.Error as exc:
            return "unexpected end of data" in str(exc)
        return False

    def _csv_fault(self, unclosed: bool = False) -> str | None:
        """Where a file Arrow refused (or read to its end inside quotes) stops making sense as CSV."""
        records = self._csv_records()
        header = next(records, None)  # its own faults were found when it was read
        if header is None:
            return None
        width = len(header[1])
        last = None
        for start, fields in records:
            if len(fields) != width:
                return self._record_fault(start, fields, width)
            last = start, fields
        return self._unclosed(*last) if unclosed and last is not None else None

    def _record_fault(self, start: int, fields: list[str], width: int) -> str:
        problem = f"{len(fields)} field{'' if len(fields) == 1 else 's'} where the header has {width}"
        spans = _first_multiline_field(fields)
        if spans is None:
            return f"{self.path} line {start}: {problem}"
        ends = start + sum(f.count("\n") for f in fields)
        return (f"{self.path} line {_quote_line(start, fields, spans)}: a quoted value opened here runs to "
                f"line {ends}, leaving {problem} (a stray '\"'?)")

    def _unclosed(self, start: int, fields: list[str]) -> str:
        """The last record of the file, `fields` starting on line `start`, ends inside its last value."""
        return (f"{self.path} line {_quote_line(start, fields, max(len(fields) - 1, 0))}: a quoted value opened "
                "here is never closed (a stray '\"'?)")

    def _jsonl_records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """Each line's object, with its line number."""
        try:
            # -sig: a BOM (Windows editors) is not an error
            with io.TextIOWrapper(open_input(self.path), encoding="utf-8-sig") as lines:
                for number, line in enumerate(lines, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{self.path} line {number}: not valid JSON: {exc.msg}") from None
                    if not isinstance(record, dict):
                        raise ConfigError(f"{self.path} line {number}: each line must be a JSON object")
                    yield number, record
        except UnicodeDecodeError:
            raise ConfigError(f"{self.path}: not UTF-8 text: save the file as UTF-8") from None

    def _jsonl_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        # The messages column may hold a list on one line and its JSON text on the next (or a bad value):
        # as text, every line reads, and each row's value is judged by the prompt builder.
        as_text = self.messages_column if self.messages_column in columns else None
        chunk: list[dict[str, Any]] = []
        numbers: list[int] = []
        for number, record in self._jsonl_records():
            values = {c: record.get(c) for c in columns}
            if as_text is not None:
                values[as_text] = _json_text(values[as_text])
            chunk.append(values)
            numbers.append(number)
            if len(chunk) == self.batch_rows:
                yield self._jsonl_batch(chunk, numbers)
                chunk, numbers = [], []
        if chunk:
            yield self._jsonl_batch(chunk, numbers)

    def _jsonl_batch(self, chunk: list[dict[str, Any]], numbers: list[int]) -> pa.RecordBatch:
        arrays = []
        for column in chunk[0]:
            values = [record[column] for record in chunk]
            known = self._jsonl_types.get(column)
            try:
                array = pa.array(values, known)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                raise ConfigError(self._type_change(column, values, numbers, known)
                                  or f"{self.path}: column '{column}' changes type between lines: "
                                  f"{_arrow_message(exc)}") from None
            if known is None and not pa.types.is_null(array.type):
                self._jsonl_types[column] = array.type
            arrays.append(array)
        return pa.RecordBatch.from_arrays(arrays, names=list(chunk[0]))

    def _type_change(self, column: str, values: list[Any], numbers: list[int], known: pa.DataType | None) -> str | None:
        """The first line whose value does not fit the type its column took before (error path only)."""
        good, bad = 0, len(values)  # values[:good] fit and values[:bad] do not: halve the gap
        while bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if _fits(values[:middle], known) else (good, middle)
        if _fits(values[:bad], known):
            return None
        value = json.dumps(values[bad - 1], ensure_ascii=False, default=str)
        return f"{self.path} line {numbers[bad - 1]}: column '{column}' changes type between lines (here {value[:60]})"

    def scan(self, keep_hashes: bool = False) -> int:
        """Read the job's columns once before any request: count rows, find bad ids and bad text early.

        With `keep_hashes`, keeps `row_hashes`: a hash of each row's id in input order, by which a
        resume finds each row's record (8 bytes a row, not the ids: value_counts over a million ids
        peaked at +190 MB), and `row_prompts`, each row's prompt_hashes, by which it finds the rows
        whose prompt changed since they were answered.
        """
        hashes = _Hashes(self._rows_known())
        prompts = _Hashes(self._rows_known(), np.uint32) if keep_hashes else None
        for batch, ids in self.id_batches(self._scanned_columns(keep_hashes)):
            if pc.any(pc.equal(ids, "")).as_py():
                raise ConfigError(f"{self.path} row {self._first_empty_id()}: empty id in column '{self.id_column}'")
            hashes.add(hash_ids(ids))
            if prompts is not None:
                prompts.add(self.prompt_hashes(batch))
        if hashes.count == 0 and (self.shard is None or next(self.id_batches([], every_row=True), None) is None):
            raise ConfigError(f"{self.path}: the input has no rows")  # a shard may have none: it is done at once
        every = hashes.joined()
        if keep_hashes:
            self.row_hashes = every
            self.row_prompts = prompts.joined()  # type: ignore[union-attr]
        if self.id_column:  # derived ids are unique by construction
            self._check_unique(np.sort(every) if keep_hashes else _sorted_in_place(every))
        return hashes.count

    def _first_empty_id(self) -> int:
        """The input row (from 1) of the first empty id, counting every row of the file (a shard's included)."""
        position = 0
        for _, ids in self.id_batches([], every_row=True):
            empty = pc.equal(ids, "")
            if pc.any(empty).as_py():
                return position + pc.index(empty, True).as_py() + 1
            position += len(ids)
        raise AssertionError("no empty id after all")  # the file was seen to be the same one (_check_unchanged)

    def _rows_known(self) -> int | None:
        if self.shard is not None:  # the file's count, not the shard's
            return None
        return self._parquet().metadata.num_rows if self.format == "parquet" else None

    def _scanned_columns(self, prompts: bool) -> list[str]:
        # Parquet values are typed and were checked when written: reading the text columns would find nothing,
        # for ~0.15 s per million rows, unless the prompts are compared with the checkpoint's. A CSV or JSONL
        # line can be malformed anywhere: read all of it.
        if self.format == "parquet" and self.id_column:
            return self.prompt_columns if prompts else []
        return self.prompt_columns + self.keep_columns

    def prompt_hashes(self, batch: pa.RecordBatch) -> np.ndarray:
        """A stable 32-bit hash (CRC-32) of each row's prompt values: the same values, the same hash, in
        any process. Recorded with each answer, so a resume sends again a row whose values were edited."""
        texts = [_as_text(batch.column(c)) for c in self.prompt_columns]
        joined = texts[0] if len(texts) == 1 else pc.binary_join_element_wise(
            *texts, "\x1f", null_handling="replace", null_replacement="\x00")
        return crc32_each(pc.fill_null(joined, "\x00"))

    def _id_texts(self, batch: pa.RecordBatch) -> pa.Array:
        return pc.utf8_trim_whitespace(batch.column(self.id_column).cast(pa.string()))

    def _check_unique(self, hashes: np.ndarray) -> None:
        """`hashes`: the ids' hashes, sorted."""
        repeated = hashes[1:][hashes[1:] == hashes[:-1]]
        if len(repeated) == 0:
            return
        # A repeated hash is a duplicate id or, once in billions, two ids that share a hash: read the
        # ids of just those rows again, in order, to find the first real second sighting.
        suspects = set(repeated.tolist())
        seen: set[str] = set()
        position = 0
        # The ids as they were hashed (a float id 2.0 is "2.0"); every row, for the row number (one id is one shard's).
        for _, texts in self.id_batches([], every_row=True):
            for at in np.flatnonzero(np.isin(hash_ids(texts), list(suspects))):
                row_id = texts[int(at)].as_py()
                if row_id in seen:
                    raise ConfigError(f"{self.path} row {position + int(at) + 1}: duplicate id '{row_id}' "
                                      f"in column '{self.id_column}'")
                seen.add(row_id)
            position += len(texts)

    def id_batches(self, columns: list[str], first_group: int = 0, *, every_row: bool = False
                   ) -> Iterator[tuple[pa.RecordBatch, pa.Array]]:
        """Record batches of `columns` in input order, each with its rows' ids as text: the shard's rows only, unless
        `every_row` (or no shard)."""
        batches = self._all_id_batches(columns, first_group)
        if self.shard is None or every_row:
            yield from batches
            return
        for batch, ids in batches:  # after the ids are made: a derived id numbers repeats over the whole file
            mine = pa.array(self.shard.selects(ids))
            if pc.any(mine).as_py():
                yield batch.filter(mine), ids.filter(mine)

    def _all_id_batches(self, columns: list[str], first_group: int) -> Iterator[tuple[pa.RecordBatch, pa.Array]]:
        derived = None if self.id_column else DerivedIds()
        source = [self.id_column] if self.id_column else self.prompt_columns  # a derived id needs the values
        for batch in self.batches(source + columns, first_group):
            if derived is None and pa.types.is_string(batch.schema.field(self.id_column).type):
                yield batch, pc.fill_null(self._id_texts(batch), "")  # text ids, trimmed in Arrow: no Python per row
                continue
            if derived is None:  # numbers and the like: their text as Python writes it (1.0 stays "1.0")
                ids = [_id_text(v) or "" for v in batch.column(self.id_column).to_pylist()]
            else:
                values = {c: batch.column(c).to_pylist() for c in self.prompt_columns}
                ids = [derived.next({c: v[i] for c, v in values.items()}) for i in range(batch.num_rows)]
            yield batch, pa.array(ids, pa.string())

    def rows(self, wanted: Callable[[int, pa.Array], np.ndarray] | None = None,
             start: int = 0) -> Iterator[Row | Skipped]:
        """Every row with its id and the values its prompt needs, in input order.

        `wanted` says, for a batch of ids and the input position of its first row, which rows to build;
        the others come as Skipped runs: resuming a mostly done job must not build a million rows only
        to skip them. Rows before `start` are not wanted: the Parquet row groups wholly before it are
        not even read.
        """
        first_group, seq = self._groups_before(start)
        if seq:
            yield Skipped(seq)
        for batch, ids in self.id_batches(self.prompt_columns, first_group):
            size = batch.num_rows
            built = np.flatnonzero(wanted(seq, ids)) if wanted else range(size)
            if len(built):
                values = {c: batch.column(c).to_pylist() for c in self.prompt_columns}
                row_ids = ids.to_pylist()
                prompts = self.prompt_hashes(batch)
            after = 0  # the first row of the batch not yielded yet
            for i in map(int, built):
                if i > after:
                    yield Skipped(i - after)
                yield Row(seq + i, row_ids[i], {c: v[i] for c, v in values.items()}, int(prompts[i]))
                after = i + 1
            if size > after:
                yield Skipped(size - after)
            seq += size

    def _groups_before(self, start: int) -> tuple[int, int]:
        """(row groups, rows) of a Parquet input that end at or before row `start`; (0, 0) otherwise.

        Derived ids number repeated content in input order, so every row must be read for them; a shard's rows are
        numbered among its own, so row groups say nothing of them."""
        if self.format != "parquet" or not self.id_column or self.shard is not None:
            return 0, 0
        meta = self._parquet().metadata
        group = rows = 0
        while group < meta.num_row_groups and rows + meta.row_group(group).num_rows <= start:
            rows += meta.row_group(group).num_rows
            group += 1
        return group, rows


class _WithEndLine:
    """A binary file read to its end, then `end_line`: what Arrow's CSV reader is given."""

    def __init__(self, raw: IO[bytes], end_line: bytes) -> None:
        self._raw = raw
        self._end_line = end_line
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data or not self._end_line:
            return data
        data, self._end_line = self._end_line, b""
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


@contextmanager
def _any_field_size() -> Iterator[None]:
    """Python's csv module refuses fields over 128 KB unless told otherwise (a process-wide setting)."""
    limit = csv.field_size_limit(sys.maxsize)
    try:
        yield
    finally:
        csv.field_size_limit(limit)


def _straddles(exc: pa.ArrowInvalid) -> bool:
    return "straddling object" in str(exc)  # a CSV record longer than two blocks


def _first_multiline_field(fields: list[str]) -> int | None:
    return next((i for i, field in enumerate(fields) if "\n" in field or "\r" in field), None)


def _quote_line(start: int, fields: list[str], field: int) -> int:
    """The line on which `fields[field]` of a record starting on line `start` opens."""
    return start + sum(f.count("\n") for f in fields[:field])


class _Hashes:
    """Per-batch hashes gathered into one array, never a list of pieces beside their concatenation.

    Sized up front when the row count is known (Parquet); otherwise grown by doubling with
    ndarray.resize, which glibc's realloc does in place (mremap) for arrays this large.
    """

    def __init__(self, rows: int | None, dtype: type = np.int64) -> None:
        self._array = np.empty(rows if rows is not None else 1 << 16, dtype)
        self.count = 0

    def add(self, piece: np.ndarray) -> None:
        end = self.count + len(piece)
        if end > len(self._array):
            self._array.resize(max(end, 2 * len(self._array)), refcheck=False)
        self._array[self.count:end] = piece
        self.count = end

    def joined(self) -> np.ndarray:
        self._array.resize(self.count, refcheck=False)  # hands back the unused part of the last doubling
        return self._array


def _sorted_in_place(array: np.ndarray) -> np.ndarray:
    array.sort()
    return array


class DerivedIds:
    """Stable ids from a row's prompt values; repeats of the same content get '-2', '-3', ..."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._repeats: dict[str, int] = {}

    def next(self, values: dict[str, Any]) -> str:
        content = json.dumps(values, ensure_ascii=False, sort_keys=True, default=str)
        digest = hashlib.sha256(content.encode()).hexdigest()[:16]
        if digest not in self._seen:
            self._seen.add(digest)
            return digest
        count = self._repeats.get(digest, 1) + 1
        self._repeats[digest] = count
        return f"{digest}-{count}"


def hash_ids(ids: pa.Array) -> np.ndarray:
    """Python's own 64-bit string hash (SipHash) of each id: equal ids, equal hashes, within one process."""
    return np.fromiter(map(hash, ids.to_pylist()), np.int64, len(ids))


def plain_text(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch` with its text columns as Arrow's `string`, whichever text type they came in.

    pandas 3 writes text as `large_string`, Polars as `string_view`, a categorical as dictionary-encoded
    text: Arrow's compute functions take no mix of these, and every reader of the input (ids, prompts and
    their hashes, kept columns) expects one. Done here, once, for every format."""
    if not any(_text_type(t) and t != pa.string() for t in batch.schema.types):
        return batch
    return pa.RecordBatch.from_arrays([_as_string(c) if _text_type(c.type) else c for c in batch.columns],
                                      names=batch.schema.names)


def _text_type(type_: pa.DataType) -> bool:
    if pa.types.is_dictionary(type_):
        return _text_type(type_.value_type)
    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_)


def _as_string(column: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(column.type):  # decoded by its values' type: Arrow cannot decode string_view values
        column = pa.DictionaryArray.from_arrays(column.indices, _as_string(column.dictionary))
    return column.cast(pa.string())


def _as_text(column: pa.Array) -> pa.Array:
    """A column's values as text, for hashing: lists and structs (a Parquet messages column) as JSON."""
    if pa.types.is_string(column.type):
        return column
    if pa.types.is_nested(column.type):
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)
                         for v in column.to_pylist()], pa.string())
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())


def _id_text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    return text or None


def _json_text(value: Any) -> Any:
    return value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _fits(values: list[Any], type_: pa.DataType | None) -> bool:
    try:
        pa.array(values, type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return False
    return True


def _arrow_message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "invalid UTF8" in text or "UTF-8" in text:
        return "not UTF-8 text: save the file as UTF-8"
    return text[:300]
