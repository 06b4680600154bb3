"""Checkpoints: the write-ahead log and the Parquet parts it is compacted into (final.py writes the output).

The records are batch.records' layout. Nothing reads the checkpoint whole: row_states reads its
states a bunch of parts at a time, kept_records each id's kept record (the row's answer, and what it
paid), and row_groups takes records by position.

Every result goes to a write-ahead log the moment it arrives: a plain append survives kill -9,
and an fsync on a short timer covers power loss. The log is a local file; everything else lives in
a store (batch.storage: a local folder, the checkpoint's own by default) as whole objects.
The log is compacted into Parquet parts, each an object made by an exclusive create, so a resume
never trusts a half-written part and two writers never take one name. A record can sit in both a
part and the log (a kill between the part and the truncate): readers keep the last record per id,
and the two copies are identical.

Which parts there are, and their order, is in their names (part_key): `part-N.parquet` for the
log's Nth compaction, `part-N-G.parquet` for a part rewritten from others (a merge, or what could be
read of a damaged part), read right after `part-N-(G-1)`. A checkpoint on a URL is held by a lease
(batch/storage/lease.py), and its holder's parts carry the lease's epoch E: `part-N-eE.parquet`,
`part-N-eE-G.parquet`, read after the same number's parts of lower epochs. A name is never used
twice: a new part number is one past every number any part (or a damaged copy) ever had, and a
rewrite takes the next generation; each is created exclusively, so a writer racing another takes
the next one, and a zombie holder (its lease taken over while it still writes) never takes a name
the new holder wants: their epochs differ. Every record carries its epoch too, and of an id's
records the one kept is chosen by one rule (answered.record_rank), not by where it sits.

A damaged checkpoint never stops a resume: a log line that is not JSON is skipped, a record whose
fields have the wrong types is kept field by field, and a part that cannot be read is set aside
(copied to `NAME.damaged`, its readable row groups kept in a new part). What is lost is pending
again, and one warning names the file.
A write that fails stops the run (CheckpointWriteError): an answer that cannot be kept is not paid for again and again.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.checkpoint.answered import Answered, RowStates, with_paid_in_all
from batch.errors import CheckpointDamagedError, CheckpointReadError, CheckpointWriteError, os_reason
from batch.records import CARRIED_FIELDS, DICTIONARY_FIELDS, RECORD_FIELDS, RECORD_SCHEMA, TOKEN_FIELDS, Record
from batch.storage.atomic import fsync_dir
from batch.storage.base import AlreadyExists, Entry, StorageError, Store, Write
from batch.storage.local import LocalStore
from batch.wording import counted

if TYPE_CHECKING:
    from batch.plan import Locations

log = logging.getLogger("batch")

WAL_NAME = "wal.jsonl"
DAMAGED_SUFFIX = ".damaged"  # a damaged file moved aside keeps its name plus this
PART_PREFIX = "part-"
_PART_KEY = re.compile(r"part-(\d+)(?:-e(\d+))?(?:-(\d+))?\.parquet")
_NUMBERED_KEY = re.compile(r"part-(\d+)")  # a part, or a damaged part's copy
MERGE_PARTS_ABOVE = 32
MERGE_BATCH_ROWS = 4096  # rows per row group of a merged part: the writer holds ~5x a row group
MERGE_FILE_ROWS = 64 * MERGE_BATCH_ROWS
STATE_COLUMNS = ["id", "status", "error_class", "epoch"]
FSYNC_EVERY_S = 1.0
SLOW_WRITE_S = 10.0  # a part's write taking longer is told: the run waits on it (a store slow, or not answering)


class Spent(NamedTuple):
    """What the answers in a checkpoint cost: tokens count only answers the server sent (not the cache's)."""

    cost: float
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # What the budget counted beyond those for answers that came without usage, at their worst case.
    worst_case_cost: float = 0.0
    worst_case_tokens: int = 0

    @property
    def budget_cost(self) -> float:
        """What the budget counts as spent: the known cost, and the worst case of the answers without usage."""
        return self.cost + self.worst_case_cost

    @property
    def budget_tokens(self) -> int:
        return self.total_tokens + self.worst_case_tokens


def part_key(number: int, generation: int = 0, epoch: int | None = None) -> str:
    """The key of the log's `number`th part, or of its `generation`th rewrite (read right after the one before),
    written under the lease's `epoch` (None: no lease, a local checkpoint)."""
    held = f"-e{epoch}" if epoch else ""
    return f"part-{number:06d}{held}.parquet" if generation == 0 else f"part-{number:06d}{held}-{generation}.parquet"


class PartOrder(NamedTuple):
    """Where a part's records are read, from its key: by number, then epoch, then generation."""

    number: int
    epoch: int  # the lease epoch of the run that wrote it (0: none)
    generation: int  # 0: a compaction of the log; more: a part rewritten from others


def part_order(key: str) -> PartOrder | None:
    """(number, epoch, generation) of a part's key, by which parts are read; None for a key that is not a part's."""
    found = _PART_KEY.fullmatch(key)
    return PartOrder(int(found[1]), int(found[2] or 0), int(found[3] or 0)) if found else None


def checkpoint_at(locations: Locations, rows_per_part: int = 1000, seconds_per_part: float = 10.0) -> Checkpoint:
    """A job's checkpoint: its log in the job's local folder, its parts in its store (a folder, or a bucket)."""
    return Checkpoint(locations.local_dir, rows_per_part, seconds_per_part, store=locations.checkpoint_store())


class Checkpoint:
    def __init__(self, folder: Path, rows_per_part: int = 1000, seconds_per_part: float = 10.0, *,
                 merge_batch_rows: int = MERGE_BATCH_ROWS, merge_file_rows: int = MERGE_FILE_ROWS,
                 merge_parts_above: int = MERGE_PARTS_ABOVE, store: Store | None = None) -> None:
        """`folder` holds the log (a local file); `store` the parts (by default, the same folder)."""
        self.folder = folder
        self.store = store if store is not None else LocalStore(folder)
        self.rows_per_part = rows_per_part
        self.seconds_per_part = seconds_per_part
        # Records read and merged at once, at most per merged file, and the parts that call for a merge (tests
        # shrink them to cross their edges).
        self.merge_batch_rows = merge_batch_rows
        self.merge_file_rows = merge_file_rows
        self.merge_parts_above = merge_parts_above
        self._pending: list[Record] = []
        self._wal: Any = None
        self._last_compact = time.monotonic()
        self._last_fsync = time.monotonic()
        self._dirty = False
        self._failed: CheckpointWriteError | None = None  # the first write that failed: every later one fails too
        self._owned = False  # opened by a run holding the lock: it may move damaged parts aside
        self._set_aside_numbers: set[int] = set()
        # The parts a run under a lease reads: those there at its open and those it made. A zombie holder (a run
        # paused while this one took the lease over) writes its answers in flight as parts of its own epoch, which
        # may land among this run's mid-run: read, they would shift every later record from the place the run's
        # row states gave it. They are the next reader's (a rerun, merge, status). None: every part (a reader).
        self._known: set[str] | None = None
        self._next_number: int | None = None  # the next new part's number, once the parts were listed
        # How long a part's write may take before the run says it waits on it (tests: 0).
        self.slow_write_s = SLOW_WRITE_S
        # The lease epoch of the run writing it (batch/storage/lease.py): in its parts' names and on each record it
        # writes. None: no lease (a local checkpoint, which its run lock keeps to one writer).
        self.epoch: int | None = None
        self._warned: set[str] = set()  # status reads a damaged file twice: one warning is enough
        # For a reader that leaves the folder alone: each damaged part's readable row groups, read in its place
        # by every later pass, so the record positions row_states handed out stay right.
        self._instead: dict[str, list[pa.Table]] = {}
        self._logged_table: pa.Table | None = None
        self.appended = 0
        # Rows per row group of each part file, by name, as read or written: the final file and the merge
        # need them for every part, and parsing a thousand footers again cost 7 MB of peak RSS.
        self._group_rows: dict[str, list[int]] = {}

    # -- opening and reading ---------------------------------------------------------------
    def open(self) -> None:
        """Recover a previous run's log into a part, and start a new one (the run holds the lock)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        # What a killed run left half written, through the seam: its temp files here (the local folder) and in the
        # store (the same folder, or a bucket: its multipart uploads never completed).
        for store in (LocalStore(self.folder), self.store):
            store.clean_up()
        wal = self.folder / WAL_NAME
        recovered = _wal_table(wal, self._warn_once, keep_damaged=True)
        if recovered.num_rows:
            self._write_part(recovered)
        self._wal = open(wal, "w", encoding="utf-8")
        fsync_dir(self.folder)
        self._owned = True
        if self.epoch is not None:
            self._known = {entry.key for entry in self._listed()}

    def answered(self) -> Answered:
        """The last record per id in the part files (the log is in them after open() and close())."""
        table = self._read_parts(STATE_COLUMNS)
        return Answered(*(table.column(name) for name in STATE_COLUMNS))

    def row_states(self, rows: int, row_hashes: np.ndarray | None, row_prompts: np.ndarray | None = None,
                   with_log: bool = False, keep_prompts: bool = False) -> RowStates:
        """The last record of each of the input's rows (its ids' and prompts' hashes from the scan: None when
        there are no records). `with_log`: the log's records too, read without touching it (a run may be alive).

        A damaged part is moved aside by the run (its lost rows are then pending) and the states read again;
        status and estimate, which leave the folder alone, count the row groups of it that can be read.
        """
        columns = ["id", "seq", "status", "error_class", "prompt_hash", "epoch"]
        while True:
            states = RowStates(rows, row_hashes, row_prompts)
            try:
                for records in self._records(columns, with_log):
                    if records.num_rows:
                        states.add(*(records.column(c).chunk(0) for c in columns))
                if states.sums_wanted():
                    states.sum_own(self._summed_records(states, with_log))
            except DamagedPart as damaged:
                if self._owned:
                    self._set_aside(damaged)
                else:
                    self._instead[damaged.key] = self._left_out(damaged)
                continue
            states.settle(keep_prompts)
            return states

    def _records(self, columns: list[str], with_log: bool) -> Iterator[pa.Table]:
        """`columns` of every record, in write order, a bunch of parts at a time (with_log: the log's last)."""
        bunches = _bunches(self.store, self._parts(), columns, self._group_rows, self.merge_batch_rows, self._instead)
        if with_log:
            bunches = itertools.chain(bunches, [self._logged().select(columns).combine_chunks()])
        return bunches

    def _summed_records(self, states: RowStates, with_log: bool) -> pa.Table:
        """What every record of the ids whose records several holders wrote holds of what was paid (RowStates.sum_own),
        with its row and write position: read only for those ids (RowStates.summed_records), at their rows or kept
        aside by id."""
        columns = ["id", "seq", "epoch", "carried", *CARRIED_FIELDS]
        found, at = [RECORD_SCHEMA.empty_table().select(columns).drop_columns(["seq"]).append_column(
            "row", pa.array([], pa.int64())).append_column("position", pa.array([], pa.int64()))], 0
        for records in self._records(columns, with_log):
            wanted, rows = states.summed_records(records.column("id").chunk(0), records.column("seq").chunk(0))
            if wanted.any():
                picked = records.filter(pa.array(wanted)).drop_columns(["seq"])
                found.append(picked.append_column("row", pa.array(rows[wanted]))
                             .append_column("position", pa.array(at + np.flatnonzero(wanted))))
            at += records.num_rows
        return pa.concat_tables(found)

    def kept_records(self, states: RowStates, id_batches: Callable[[], Iterable[pa.Array]], columns: list[str],
                     with_log: bool = False) -> Iterator[pa.Table]:
        """`columns` of each id's kept record (RowStates.last_record_mask: ids no longer in the input included; the
        input's ids, `id_batches`, are read only when records were kept aside by id), in write order, read a bunch of
        parts at a time: never the whole checkpoint at once. Their paid columns hold what the row paid in all
        (RowStates.sum_own: summed over the holders that wrote it), whichever record is kept: every reader of what
        was paid (spent, the estimate's answers so far, the results so far) counts it by this one rule.
        `with_log`: the log's records too, as row_states read them."""
        chosen = states.last_record_mask(id_batches)
        bunches = _bunches(self.store, self._parts(), columns, self._group_rows, self.merge_batch_rows, self._instead)
        if with_log:
            bunches = itertools.chain(bunches, [self._logged().select(columns).combine_chunks()])
        at = 0
        try:
            for records in bunches:
                # Records a live run wrote after `chosen` was made are past its end: not counted.
                mine = np.zeros(records.num_rows, bool)
                within = chosen[at:at + records.num_rows]
                mine[:len(within)] = within
                picked = with_paid_in_all(records.filter(pa.array(mine)), *states.paid_at(at + np.flatnonzero(mine)))
                at += records.num_rows
                yield picked
        except DamagedPart as damaged:  # damage in columns row_states does not read
            self._damaged_mid_run(damaged)

    def spent(self, states: RowStates, id_batches: Callable[[], Iterable[pa.Array]], with_log: bool = False) -> Spent:
        """What the job has paid so far, summed over each id's kept record (kept_records); answers taken from the cache
        cost no tokens."""
        cost, tokens = 0.0, dict.fromkeys((*TOKEN_FIELDS, "worst_case_tokens"), 0)
        worst_case_cost = 0.0
        columns = ["cost", "worst_case_cost", *tokens, "cache_hit"]
        for records in self.kept_records(states, id_batches, columns, with_log):
            cost += pc.sum(records.column("cost")).as_py() or 0.0
            worst_case_cost += pc.sum(records.column("worst_case_cost")).as_py() or 0.0
            sent = records.filter(pc.invert(pc.fill_null(records.column("cache_hit"), False)))
            for name in tokens:
                tokens[name] += pc.sum(sent.column(name)).as_py() or 0
        return Spent(cost, worst_case_cost=worst_case_cost, **tokens)

    def has_records(self) -> bool:
        """Whether a previous run left any record (a part, or a log not yet compacted)."""
        wal = self.folder / WAL_NAME
        return bool(self._parts()) or (wal.exists() and wal.stat().st_size > 0)

    def last_epoch(self) -> int:
        """The highest lease epoch the parts' names carry (0: none): every holder so far wrote under one at most it."""
        return max((order.epoch for entry in self.store.list(PART_PREFIX) if (order := part_order(entry.key))),
                   default=0)

    def _parts(self) -> list[str]:
        """The parts' keys, in the order their records were written (part_order)."""
        return [entry.key for entry in self._listed()]

    def _listed(self) -> list[Entry]:
        parts = [(order, entry) for entry in self.store.list(PART_PREFIX) if (order := part_order(entry.key))
                 and (self._known is None or entry.key in self._known)]
        return [entry for _, entry in sorted(parts)]

    def records_version(self) -> str:
        """What the parts hold, as one value: it changes when a part is written, merged or set aside (each part's
        key and version: an object store's ETag, a local file's inode and stamp). The final file records it."""
        listed = "\n".join(f"{entry.key} {entry.version}" for entry in self._listed())
        return hashlib.sha256(listed.encode("utf-8")).hexdigest()

    def row_groups(self) -> RowGroups:
        """The part files as one table of records in write order, read a row group at a time."""
        try:
            return RowGroups(self.store, self._parts(), self._group_rows, self._damaged_mid_run)
        except DamagedPart as damaged:
            self._damaged_mid_run(damaged)

    def read_all(self) -> pa.Table:
        """Every record in the part files, in write order (several per id when a failure was retried), whole:
        for tests and inspection. The commands stream (kept_records), a run reads by position (row_groups)."""
        return self._read_parts()

    def _read_parts(self, columns: list[str] | None = None) -> pa.Table:
        # File by file, not through pyarrow.dataset: 0.4 s for 900 parts where the dataset takes 0.7 s,
        # plus 0.6 s and 43 MB to import it.
        # A run stops on a part damaged now (its records may already count); status and estimate leave it out.
        columns = columns or RECORD_FIELDS
        tables = []
        for key in self._parts():
            try:
                with _reading(self.store, key):
                    part = _open_part(self.store, key)
                    tables.append(_conformed(part.read(columns=_present(part, columns)), columns))
            except DamagedPart as damaged:
                if self._owned:
                    self._damaged_mid_run(damaged)
                tables.extend(table.select(columns) for table in self._left_out(damaged))
        return pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table().select(columns)

    def _left_out(self, damaged: DamagedPart) -> list[pa.Table]:
        """For a reader that leaves the folder alone: a damaged part's readable row groups, and one warning."""
        readable = _readable_groups(self.store, damaged.key)
        self._warn_once(f"{damaged.where} is damaged ({damaged.reason}): {sum(t.num_rows for t in readable)} of its "
                        "records could be read; the next run moves it aside and does the rows of the others again")
        return readable

    def _logged(self) -> pa.Table:
        """The log's records, read once (status asks twice), without touching it."""
        if self._logged_table is None:
            self._logged_table = _wal_table(self.folder / WAL_NAME, self._warn_once, keep_damaged=False)
        return self._logged_table

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    # -- writing ---------------------------------------------------------------------------
    def append(self, record: Record) -> None:
        """Log one result; raises CheckpointWriteError when it cannot be kept (the run must stop)."""
        if self._failed is not None:
            raise self._failed
        record["epoch"] = self.epoch
        try:
            self._wal.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._wal.flush()  # Into the OS now: survives the death of this process.
            self._check_wal_linked()
        except OSError as exc:
            raise self._write_failed(self.folder / WAL_NAME, exc) from None
        self._pending.append(record)
        self._dirty = True
        self.appended += 1
        if len(self._pending) >= self.rows_per_part:
            self.compact()

    def tick(self) -> None:
        """Called on a timer: fsync the log, and compact when the last part is old enough."""
        now = time.monotonic()
        with self._writing(self.folder / WAL_NAME):
            self._check_wal_linked()
            if self._dirty and now - self._last_fsync >= FSYNC_EVERY_S:
                os.fsync(self._wal.fileno())
                self._dirty = False
                self._last_fsync = now
        if self._pending and now - self._last_compact >= self.seconds_per_part:
            self.compact()

    def compact(self) -> None:
        if self._pending:
            records, salvage = _records_table(self._pending)
            if salvage:  # an answer that slipped past the client's checks: never a reason to lose the others
                self._warn_once(f"{self.folder / WAL_NAME}: {salvage}")
            self._write_part(records)
            self._pending = []
            with self._writing(self.folder / WAL_NAME):
                self._wal.seek(0)
                self._wal.truncate()
            self._dirty = False
        self._last_compact = time.monotonic()

    def close(self, merge: bool = True) -> None:
        if self._wal is None:
            return
        try:
            if self._failed is None:
                self.compact()
        finally:
            wal, self._wal = self._wal, None
            if self._failed is None:
                wal.close()
            else:  # keep what the log holds; nothing more can be written
                with contextlib.suppress(OSError):
                    os.fsync(wal.fileno())
                with contextlib.suppress(OSError):
                    wal.close()  # its buffer's flush fails again
        if merge:
            self.merge()

    def merge(self) -> None:
        """Many parts into a few (_merge_parts). At the end of a run, not at open: a resume reads a thousand
        small parts in a fraction of a second, while merging them first would delay its first request by seconds."""
        if len(self._parts()) > self.merge_parts_above:
            try:
                self._merge_parts()
            except DamagedPart as damaged:  # its records count in the output already; its rows go again next run
                self._set_aside(damaged)

    @contextlib.contextmanager
    def _writing(self, path: Path | str) -> Iterator[None]:
        """OSErrors inside become the run-stopping CheckpointWriteError, naming `path`; once one
        write failed, every later one fails the same way."""
        if self._failed is not None:
            raise self._failed
        try:
            yield
        except OSError as exc:
            raise self._write_failed(path, exc) from None

    def _write_failed(self, path: Path | str, exc: OSError) -> CheckpointWriteError:
        kept = ("the answers in it are lost with it; a new run starts afresh" if isinstance(exc, _Deleted) else
                "answers written before are kept: run the job again once the folder can be written")
        self._failed = CheckpointWriteError(f"{path}: cannot write the checkpoint: {os_reason(exc)}; "
                                            f"the run stopped and sends no more requests ({kept})")
        return self._failed

    def _check_wal_linked(self) -> None:
        # Appends to the open log of a deleted folder succeed silently: a run would go on paying for
        # answers that are thrown away. One fstat per answer is cheap next to the request.
        if os.fstat(self._wal.fileno()).st_nlink == 0:
            raise _Deleted(2, "it was deleted while the run was writing it")

    def _write_part(self, table: pa.Table) -> None:
        if self._next_number is None:
            numbers = [int(found[1]) for entry in self.store.list(PART_PREFIX)
                       if (found := _NUMBERED_KEY.match(entry.key))]
            self._next_number = max(numbers, default=0) + 1
        key = self._create_new(lambda number: part_key(number, epoch=self.epoch), self._next_number,
                               _table_writer(table))
        self._next_number = part_order(key)[0] + 1  # type: ignore[index]
        self._group_rows[key] = [table.num_rows]

    def _create_new(self, key_of: Callable[[int], str], first: int, write: Write) -> str:
        """An object made under `key_of(first)`, or the first of `key_of(first + 1)`, ... that no object has (another
        writer may have taken one): never written over. Returns its key; a failure stops the run."""
        attempt = first
        while True:
            key = key_of(attempt)
            with self._writing(self.store.where(key)), _told_if_slow(self.store.where(key), self.slow_write_s):
                try:
                    self.store.create(key, write)
                    if self._known is not None:
                        self._known.add(key)
                    return key
                except AlreadyExists:
                    attempt += 1

    def _set_aside(self, damaged: DamagedPart) -> None:
        """Set a damaged part aside (a copy never deleted, `NAME.damaged`), keeping its readable row groups in a new
        part read in its place (part_order), so every later record keeps its place after them."""
        key = damaged.key
        number, epoch, generation = part_order(key) or (0, 0, 0)
        if number in self._set_aside_numbers:  # what was kept of it cannot be read either: never loop
            raise CheckpointDamagedError(f"{damaged.where} is damaged ({damaged.reason}) and could not be repaired; "
                                         "move it out of the folder and run the job again") from None
        self._set_aside_numbers.add(number)
        readable = _readable_groups(self.store, key)

        def copy(sink: BinaryIO) -> None:
            with self.store.open_read(key) as source:
                shutil.copyfileobj(source, sink)

        aside = self._create_new(lambda taken: f"{key}{DAMAGED_SUFFIX}" + (f".{taken}" if taken > 1 else ""), 1, copy)
        self._group_rows.pop(key, None)
        if readable:
            kept = pa.concat_tables(readable)
            kept_key = self._create_new(lambda g: part_key(number, g, epoch), generation + 1, _table_writer(kept))
            self._group_rows[kept_key] = [kept.num_rows]
        with self._writing(damaged.where):
            self.store.delete(key)
        kept_rows = sum(t.num_rows for t in readable)
        log.warning("%s is damaged (%s): moved aside to %s; %d of its records were read and kept, the rows "
                    "of any others are pending and will be sent again", damaged.where, damaged.reason, aside, kept_rows)

    def _damaged_mid_run(self, damaged: DamagedPart) -> NoReturn:
        """A part found damaged after the run counted its records: moved aside, and the run stops."""
        self._set_aside(damaged)
        raise CheckpointDamagedError(
            f"{damaged.where} is damaged ({damaged.reason}): moved aside, its readable records kept; "
            "run the job again to send the rows it held") from None

    def _merge_parts(self) -> None:
        """Runs of consecutive parts into parts of up to merge_file_rows records, streamed.

        Each merged part is read right after the last part of its run (the next generation of its number), then
        the run's parts are deleted: a kill in between leaves copies of records after their originals and before
        every later part, so the last record per id is still the right one. A part stays within merge_file_rows
        because the writer holds metadata for every row group until it closes (~30 KB each).
        """
        for run in _runs_of_parts(self.store, self._parts(), self._group_rows, self.merge_file_rows):
            if len(run) > 1:
                number, epoch, generation = part_order(run[-1])  # type: ignore[misc]
                self._create_new(lambda g, number=number, epoch=epoch: part_key(number, g, epoch), generation + 1,
                                 lambda sink, run=run: _write_merged(self.store, run, sink, self.merge_batch_rows))
                for key in run:
                    self._group_rows.pop(key, None)
                    with self._writing(self.store.where(key)):
                        self.store.delete(key)


class _Deleted(FileNotFoundError):
    """The log's file was unlinked under the run (its folder deleted)."""


class DamagedPart(Exception):
    """A part that cannot be read (zero bytes, truncated, corrupt); `where` names it for a person."""

    def __init__(self, key: str, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.key, self.where, self.reason = key, where, reason


@contextlib.contextmanager
def _reading(store: Store, key: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:  # gone, not damaged: a live run merged it away
        raise
    except StorageError as exc:  # the store did not give it: not the part's fault
        raise CheckpointReadError(f"{store.where(key)}: cannot read the checkpoint: {os_reason(exc)}; nothing was "
                                  "set aside: run the job again once it can be read") from None
    except (pa.ArrowException, OSError) as exc:
        raise DamagedPart(key, store.where(key), str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


@contextlib.contextmanager
def _told_if_slow(where: str, after_s: float) -> Iterator[None]:
    """A warning, from a timer's thread (in the caller's context, by which the run's batch.log is found), when the
    write in the block has not returned after `after_s`: the run waits on a part's write, and a store that stopped
    answering would leave it silent for as long as its library retries (a minute and more)."""
    timer = threading.Timer(after_s, contextvars.copy_context().run,
                            args=(log.warning, "writing %s has taken %.0f s so far: its store is slow or does not "
                                  "answer, and the run waits for it", where, after_s))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _open_part(store: Store, key: str) -> pq.ParquetFile:
    return pq.ParquetFile(store.open_read(key), pre_buffer=False)


def _table_writer(table: pa.Table) -> Write:
    """A part of `table`, as one row group."""
    return lambda sink: pq.write_table(table, sink, row_group_size=max(table.num_rows, 1))


def _readable_groups(store: Store, key: str) -> list[pa.Table]:
    """The row groups of a damaged part that can still be read whole; none when its footer is gone."""
    try:
        with _reading(store, key):
            part = _open_part(store, key)
            groups = part.metadata.num_row_groups
            present = _present(part, RECORD_FIELDS)
    except DamagedPart:
        return []
    readable = []
    for group in range(groups):
        with contextlib.suppress(DamagedPart), _reading(store, key):
            readable.append(_conformed(part.read_row_group(group, columns=present, use_threads=False), RECORD_FIELDS))
    return readable


class RowGroups:
    """Records in write order across part files, read by position, a row group at a time.

    Only each row group's place is held, so the final file can take the records of one window of
    input rows without reading the others.
    """

    def __init__(self, store: Store, keys: list[str], known: dict[str, list[int]],
                 on_damage: Callable[[DamagedPart], NoReturn]) -> None:
        self.store = store
        self.keys = keys
        self._on_damage = on_damage
        groups = []  # (part number, row group, first record's position)
        position = 0
        for number, key in enumerate(keys):
            for group, rows in enumerate(_group_rows_of(store, key, known)):
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
        table = pa.concat_tables(pieces) if pieces else RECORD_SCHEMA.empty_table().select(columns)
        return table.take(pa.array(placed))

    def _read(self, number: int, group: int, columns: list[str]) -> pa.Table:
        # The part last read stays open: a merged part's footer describes hundreds of row groups, and
        # parsing it again for every window of the final file cost time and ~10 MB of peak RSS at 1M rows.
        key = self.keys[number]
        try:
            with _reading(self.store, key):
                if self._open is None or self._open[0] != number:
                    self._open = (number, _open_part(self.store, key))
                part = self._open[1]
                read = part.read_row_group(group, columns=_present(part, columns), use_threads=False)
        except DamagedPart as damaged:
            self._open = None
            self._on_damage(damaged)
        return _conformed(read, columns)


def _runs_of_parts(store: Store, keys: list[str], known: dict[str, list[int]], file_rows: int) -> list[list[str]]:
    runs: list[list[str]] = []
    rows = 0
    for key in keys:
        count = sum(_group_rows_of(store, key, known))
        if not runs or rows + count > file_rows:
            runs.append([])
            rows = 0
        runs[-1].append(key)
        rows += count
    return runs


def _group_rows(meta: pq.FileMetaData) -> list[int]:
    return [meta.row_group(group).num_rows for group in range(meta.num_row_groups)]


def _group_rows_of(store: Store, key: str, known: dict[str, list[int]]) -> list[int]:
    if key not in known:
        with _reading(store, key):
            known[key] = _group_rows(_open_part(store, key).metadata)
    return known[key]


def _write_merged(store: Store, keys: list[str], sink: BinaryIO, batch_rows: int) -> None:
    with pq.ParquetWriter(sink, RECORD_SCHEMA, use_dictionary=DICTIONARY_FIELDS) as writer:
        for records in _bunches(store, keys, RECORD_FIELDS, {}, batch_rows):
            writer.write_table(records)


def _bunches(store: Store, keys: list[str], columns: list[str], known: dict[str, list[int]], batch_rows: int,
             instead: dict[str, list[pa.Table]] | None = None) -> Iterator[pa.Table]:
    """The parts' records, in write order, as tables of batch_rows or more (the last may be short),
    one chunk each. A killed run leaves many small parts: each is read whole, and they are handled in
    bunches, not one by one. Notes each part's row-group sizes in `known` on the way."""
    held: list[pa.Table] = []
    for key in keys:
        tables = (t.select(columns) for t in instead[key]) if instead and key in instead else \
            _part_tables(store, key, columns, known, batch_rows)
        for table in tables:
            held.append(table)
            if sum(t.num_rows for t in held) >= batch_rows:
                yield pa.concat_tables(held).combine_chunks()
                held = []
    if held:
        yield pa.concat_tables(held).combine_chunks()


def _part_tables(store: Store, key: str, columns: list[str], known: dict[str, list[int]],
                 batch_rows: int) -> Iterator[pa.Table]:
    """One part's records: whole when small, else batch_rows at a time. Raises DamagedPart."""
    with _reading(store, key):
        part = _open_part(store, key)
        known[key] = _group_rows(part.metadata)
        present = _present(part, columns)
        small = part.metadata.num_rows <= batch_rows
        whole = part.read(columns=present, use_threads=False) if small else None
    if whole is not None:
        yield _conformed(whole, columns)
        return
    batches = part.iter_batches(batch_rows, columns=present, use_threads=False)
    while True:
        with _reading(store, key):
            batch = next(batches, None)
        if batch is None:
            return
        yield _conformed(pa.Table.from_batches([batch]), columns)


def _present(part: pq.ParquetFile, columns: list[str]) -> list[str]:
    names = set(part.schema_arrow.names)
    return [c for c in columns if c in names]


def _conformed(table: pa.Table, columns: list[str]) -> pa.Table:
    """`table` as these RECORD_SCHEMA columns; a column a part was written without reads as nulls."""
    schema = pa.schema([RECORD_SCHEMA.field(c) for c in columns])
    return pa.table([table.column(c) if c in table.column_names else pa.nulls(table.num_rows, schema.field(c).type)
                     for c in columns], schema=schema)


def _wal_table(path: Path, warn: Callable[[str], None], keep_damaged: bool) -> pa.Table:
    """The log's records as a table. A line that is not a JSON record is skipped with a warning (and,
    when `keep_damaged`, copied to wal.jsonl.damaged), except a last line cut short by a kill: that
    answer was still in flight."""
    records: list[dict[str, Any]] = []
    damaged: list[tuple[int, str]] = []
    if path.exists():
        with open(path, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                    if not line.endswith("\n"):
                        continue
                if isinstance(record, dict) and record.get("id") is not None:
                    records.append(record)
                elif line.strip():
                    damaged.append((number, line))
    problems = []
    if damaged:
        where = ", ".join(str(n) for n, _ in damaged[:5]) + (", ..." if len(damaged) > 5 else "")
        kept = ""
        if keep_damaged:
            aside = path.with_name(path.name + DAMAGED_SUFFIX)
            with open(aside, "a", encoding="utf-8") as copy:
                copy.writelines(line for _, line in damaged)
            kept = f" (kept in {aside.name})"
        problems.append(f"{counted(len(damaged), 'line')} not a JSON record (line {where}){kept}")
    table, salvage = _records_table(records)
    if salvage:
        problems.append(salvage)
    if problems:
        warn(f"{path} is damaged: {'; '.join(problems)}; the rows of records lost are pending and will be sent again")
    return table


def _records_table(records: list[dict[str, Any]]) -> tuple[pa.Table, str | None]:
    """Records as RECORD_SCHEMA rows, and what was salvaged: a field of the wrong type (a count written as
    "3") is converted or emptied; a record without a readable id or status is dropped (its row is pending)."""
    try:
        return pa.Table.from_pylist(records, schema=RECORD_SCHEMA), None
    except (pa.ArrowException, OverflowError, ValueError, TypeError):
        pass
    kept, fields, dropped = [], set(), 0
    for record in records:
        salvaged = {f.name: _salvaged(record.get(f.name), f.type) for f in RECORD_SCHEMA}
        fields.update(f for f, value in salvaged.items() if value is _UNREADABLE or (
            value is not None and record.get(f) is not None and value != record.get(f)))
        salvaged = {f: None if value is _UNREADABLE else value for f, value in salvaged.items()}
        if isinstance(salvaged["id"], str) and salvaged["status"] in ("ok", "failed"):
            kept.append(salvaged)
        else:
            dropped += 1
    lost = f"; dropped {counted(dropped, 'record')} without a readable id or status" if dropped else ""
    salvage = f"fields of the wrong type ({', '.join(sorted(fields)) or 'none'}) were converted or emptied{lost}"
    return pa.Table.from_pylist(kept, schema=RECORD_SCHEMA), salvage


_UNREADABLE = object()


def _salvaged(value: Any, type_: pa.DataType) -> Any:
    """`value` as a `type_` value: the same, converted (3.0 or "3" for an integer), or _UNREADABLE."""
    if value is None:
        return None
    if pa.types.is_string(type_):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if pa.types.is_boolean(type_):
        return value if isinstance(value, bool) else _UNREADABLE
    if isinstance(value, bool):
        return _UNREADABLE
    try:
        number = float(value) if pa.types.is_floating(type_) else _integer(value)
    except (TypeError, ValueError, OverflowError):
        return _UNREADABLE
    if pa.types.is_integer(type_) and not _fits(number, type_):
        return _UNREADABLE
    return number


def _integer(value: Any) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(value)  # an int, or a string of digits


def _fits(number: int, type_: pa.DataType) -> bool:
    info = np.iinfo(type_.to_pandas_dtype())
    return info.min <= number <= info.max

