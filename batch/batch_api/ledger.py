"""The Batch API's ledger: which rows went into which file, and where each file is at the provider.

It lives in the checkpoint's store (batch.storage) as one object per step, `ledger/N.json` (the Nth,
made by an exclusive create and durable before the step it records is taken further: never an append to a
shared file, which an object store cannot do), beside `batches/`, which holds each file's rows (`file-N.rows.parquet`:
seq, id, custom_id, prompt_hash, submission, prompt_bound: what its worst case for the budget is made of)
and, until its batch exists, its request lines (`file-N.jsonl`). Both are written atomically before the
ledger names them. A file's number is claimed first (`file-N.claim`, an exclusive create): a run taken over while
paused and the run that took its lease over write one ledger, and never one number. The steps of a file:

    file      its rows and custom_ids are in the checkpoint (before anything is uploaded)
    uploaded  the upload returned this file id
    lost      the provider no longer knows that upload (confirmed by a second 404): it is uploaded again
    created   the batch create returned this batch id
    state     a poll saw a new state (for `status`)
    cancel    `batch cancel` asked the provider to cancel it
    merged    its results are in the checkpoint; its rows are no longer held (status "lost": the provider no
              longer knows its batch, and every row of it is pending again)
    cleaned   its files at the provider are deleted

A checkpoint written before the steps were objects holds them as lines of `batches.jsonl`: read first, never
written again.

A kill between two steps leaves the earlier one as the last word, and the next run takes the file on from
there: a file never recorded is built again, a file not recorded as uploaded is uploaded again (an
uploaded file costs nothing until a batch is made of it), and a batch whose id was lost between create
and its record is found with the list call by its metadata (the job's tag, the file's number) instead
of being created again. So a custom_id (file number + row id) is never in two batches.

This module has no network: a run reads it to hold the rows of live batches back from sending
(batch/checkpoint/answered.py SUBMITTED) whatever its mode; batch/batch_api/answerer.py drives the provider.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch.checkpoint.answered import Answered, RowStates
from batch.errors import CheckpointWriteError, ConfigError
from batch.plan import LEDGER_EVENTS_PREFIX as EVENTS_PREFIX
from batch.plan import LEDGER_NAME, Locations
from batch.storage.atomic import temp_path
from batch.storage.base import AlreadyExists, NotFound, Store
from batch.storage.local import LocalStore
from batch.wording import counted

log = logging.getLogger("batch")

_EVENT_KEY = re.compile(r"ledger/(\d+)\.json")
FILES_DIR = "batches"
_FILE_KEY = re.compile(r"batches/file-(\d+)\.[a-z.]+")  # a file's request lines, rows, output or errors
ROWS_SCHEMA = pa.schema([("seq", pa.int64()), ("id", pa.string()), ("custom_id", pa.string()),
                         ("prompt_hash", pa.uint32()), ("submission", pa.int32()), ("prompt_bound", pa.int64())])
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class BatchFile:
    """One input file of the job and its batch, as the ledger tells it."""

    number: int
    tag: str
    rows: int
    bytes: int
    records_before: int  # the checkpoint's record count when it was built: a later record of its row is its answer
    hold_cost: float
    hold_tokens: int
    built_at: float
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    cancel_asked: bool = False
    merged: bool = False
    cleaned: bool = False
    outcome: dict[str, Any] = field(default_factory=dict)
    # Where its rows sit in the input now, found by id (Ledger.place); -1 for a row no longer in the input.
    seqs: np.ndarray | None = field(default=None, repr=False)

    @property
    def live(self) -> bool:
        return not self.merged


def spool_path(folder: Path, key: str) -> Path:
    """A local file in the checkpoint `folder` where an object of `key` is written in steps (a file being built, a
    download) before it goes to the store whole (keep_spooled)."""
    path = temp_path(folder / key)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def keep_spooled(store: Store, key: str, spool: Path) -> None:
    """The spooled file, whole, as the object `key` (whatever was there: the ledger names it only after), and the
    spool gone."""
    def copy(sink: BinaryIO) -> None:
        with open(spool, "rb") as written:
            shutil.copyfileobj(written, sink)

    store.replace(key, copy)
    spool.unlink()


class RowsWriter:
    """A file's rows (ROWS_SCHEMA), written to a spool a slice at a time, never all held; `close` puts it in the
    store whole. Only the rows' positions are kept, 8 bytes a row, to hold them."""

    SLICE = 4096

    def __init__(self, store: Store, key: str, spool: Path) -> None:
        self.store, self.key = store, key
        self.tmp = spool
        self.seqs = array("q")
        self._writer = pq.ParquetWriter(self.tmp, ROWS_SCHEMA)
        self._columns: list[list[Any]] = [[] for _ in ROWS_SCHEMA.names]

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: int, row_id: str, cid: str, prompt_hash: int | None, submission: int, prompt_bound: int) -> None:
        for column, value in zip(self._columns, (seq, row_id, cid, prompt_hash, submission, prompt_bound)):
            column.append(value)
        self.seqs.append(seq)
        if len(self._columns[0]) >= self.SLICE:
            self._flush()

    def _flush(self) -> None:
        if self._columns[0]:
            self._writer.write_table(pa.table(dict(zip(ROWS_SCHEMA.names, self._columns)), schema=ROWS_SCHEMA))
            self._columns = [[] for _ in ROWS_SCHEMA.names]

    def close(self) -> None:
        self._flush()
        self._writer.close()
        keep_spooled(self.store, self.key, self.tmp)

    def abandon(self) -> None:
        """The file given up before the ledger named it: its spool deleted, nothing kept."""
        self._writer.close()
        self.tmp.unlink(missing_ok=True)


def job_tag(fingerprint: dict[str, Any], folder: Path) -> str:
    """The job's name at the provider (batch metadata, file names): its fingerprint (guard.fingerprint) and
    checkpoint folder."""
    source = json.dumps([fingerprint, str(folder.resolve())], sort_keys=True, default=str)
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def custom_id(number: int, row_id: str) -> str:
    """A row's custom_id in file `number`: from its id, deterministic, 6-64 characters, never in two files."""
    return f"f{number}-{hashlib.blake2b(row_id.encode(), digest_size=12).hexdigest()}"


def ledger_at(locations: Locations) -> Ledger:
    """A job's ledger: its steps in the checkpoint's store, its files built in the job's local folder."""
    return Ledger(locations.local_dir, locations.checkpoint_store())


class Ledger:
    def __init__(self, folder: Path, store: Store | None = None) -> None:
        """`folder`: the checkpoint folder; `store`: where the steps are kept (by default, that folder)."""
        self.folder = folder
        self.store = store if store is not None else LocalStore(folder)
        self.files: dict[int, BatchFile] = {}
        self._claimed: set[int] = set()  # file numbers this process claimed (claim_number)
        self._next_event = 1
        self._read_lines()
        self._read_events()

    def event_keys(self) -> list[str]:
        """The steps' objects, in the order they were taken."""
        found = [(int(match[1]), entry.key) for entry in self.store.list(EVENTS_PREFIX)
                 if (match := _EVENT_KEY.fullmatch(entry.key))]
        return [key for _, key in sorted(found)]

    def _read_lines(self) -> None:
        """The steps an older batch appended to batches.jsonl."""
        try:
            data = self.store.read_bytes(LEDGER_NAME)
        except NotFound:
            return
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(keepends=True), 1):
            # A last line cut short by a kill is a step not taken.
            self._take(line, f"{self.store.where(LEDGER_NAME)} line {number}", warn=line.endswith("\n"))

    def _read_events(self) -> None:
        for key in self.event_keys():
            self._take(self.store.read_bytes(key).decode("utf-8", "replace"), self.store.where(key), warn=True)
            self._next_event = int(_EVENT_KEY.fullmatch(key)[1]) + 1  # type: ignore[index]

    def _take(self, text: str, where: str, warn: bool) -> None:
        try:
            self._apply(json.loads(text))
        except (ValueError, KeyError, TypeError):
            if warn:
                log.warning("%s is damaged: skipped", where)

    def _apply(self, event: dict[str, Any]) -> None:
        kind, number = event["event"], int(event["file"])
        if kind == "file":
            self.files[number] = BatchFile(number, event["tag"], event["rows"], event["bytes"],
                                           event["records_before"], event["hold_cost"], event["hold_tokens"],
                                           event["at"])
            return
        entry = self.files[number]
        if kind == "uploaded":
            entry.file_id = event["file_id"]
        elif kind == "lost":  # the provider no longer knows the upload: it is uploaded again
            entry.file_id = None
        elif kind == "created":
            entry.batch_id = event["batch_id"]
        elif kind == "state":
            entry.status, entry.counts = event["status"], event.get("counts") or {}
        elif kind == "cancel":
            entry.cancel_asked = True
        elif kind == "merged":
            entry.merged, entry.status, entry.outcome = True, event["status"], event.get("outcome") or {}
        elif kind == "cleaned":
            entry.cleaned = True

    def note(self, kind: str, number: int, **values: Any) -> None:
        """Record a step, durable before the caller goes on: the next event's object, made exclusively (a step
        another process recorded under that number is read by the next run in its place; this one takes the next)."""
        event = {"event": kind, "file": number, **values, "at": round(time.time(), 3)}
        data = (json.dumps(event, ensure_ascii=False) + "\n").encode("utf-8")
        while True:
            key = f"{EVENTS_PREFIX}{self._next_event:08d}.json"
            self._next_event += 1
            if self._create(key, data):
                break
        self._apply(event)

    def _create(self, key: str, data: bytes) -> bool:
        """Make the object `key` exclusively: False when it exists (another process made it)."""
        try:
            self.store.create(key, lambda sink: sink.write(data))
        except AlreadyExists:
            return False
        except OSError as exc:
            raise CheckpointWriteError(f"{self.store.where(key)}: cannot write the Batch API ledger: "
                                       f"{exc.strerror or exc}; the run stopped (run the job again once it can "
                                       "be written)") from None
        return True

    def live(self) -> list[BatchFile]:
        return [entry for entry in self.files.values() if entry.live]

    def clean_up(self) -> None:
        """What a run killed mid-step left, removed by the next run before it takes a step (it holds the lock, or
        the lease, and read the ledger after taking it): the spools of files being built or downloaded (local,
        even with the checkpoint on a URL), the store's half-written objects, and the objects of a file written
        before the ledger named it. A file never named is built again from its rows, never uploaded as it was."""
        LocalStore(self.folder).clean_up(f"{FILES_DIR}/")
        for folder in (EVENTS_PREFIX, f"{FILES_DIR}/"):
            self.store.clean_up(folder)
        for entry in self.store.list(f"{FILES_DIR}/"):
            named = _FILE_KEY.fullmatch(entry.key)
            if named is not None and int(named[1]) not in self.files:
                self.store.delete(entry.key)

    def claim_number(self) -> int:
        """The number of a new file, this process's own: claimed by the exclusive create of `batches/file-N.claim`,
        so two processes writing one ledger (a holder paused past its lease, and the run that took the lease over)
        never build files of one number, whose rows and custom_ids would be taken for each other's. A number
        claimed and not used yet (the budget cut a file short) is this process's next one; a number claimed by
        another process, or by a run killed before it recorded its file, is skipped."""
        number = max(self.files, default=0) + 1
        while number not in self._claimed:
            if self._create(self.claim_key(number), b""):
                self._claimed.add(number)
            else:
                number += 1
        return number

    # -- the files of a batch, in the checkpoint's store ------------------------------------------
    def claim_key(self, number: int) -> str:
        return f"{FILES_DIR}/file-{number:06d}.claim"

    def rows_key(self, number: int) -> str:
        return f"{FILES_DIR}/file-{number:06d}.rows.parquet"

    def requests_key(self, number: int) -> str:
        return f"{FILES_DIR}/file-{number:06d}.jsonl"

    def results_key(self, number: int, which: str) -> str:
        return f"{FILES_DIR}/file-{number:06d}.{which}.jsonl"

    def spool(self, key: str) -> Path:
        return spool_path(self.folder, key)

    def rows_writer(self, number: int) -> RowsWriter:
        key = self.rows_key(number)
        return RowsWriter(self.store, key, self.spool(key))

    def rows_of(self, number: int, columns: list[str] | None = None) -> pa.Table:
        key = self.rows_key(number)
        try:
            with self.store.open_read(key) as stream:
                return pq.read_table(stream, columns=columns)
        except (OSError, pa.ArrowInvalid) as exc:  # deleted or damaged by hand: the ledger wrote it before naming it
            reason = "it is missing" if isinstance(exc, FileNotFoundError) else str(exc)
            raise ConfigError(f"{self.store.where(key)}: the rows of Batch API file {number}, which the Batch API "
                              "ledger names, "
                              f"cannot be read ({reason}); restore the checkpoint folder from a backup") from None

    # -- what a run needs before it sends anything ---------------------------------------------
    def hold(self, states: RowStates, id_batches: Callable[[], Iterable[pa.Array]]) -> int:
        """Hold the rows of live batches back (SUBMITTED in `states`), found in the input by id; returns how many
        are held."""
        self.place(id_batches)
        held = 0
        for entry in self.live():
            assert entry.seqs is not None
            held += len(states.hold(entry.seqs[entry.seqs >= 0], entry.records_before))
        return held

    def place(self, id_batches: Callable[[], Iterable[pa.Array]]) -> None:
        """Find each live file's rows in the input (`id_batches`: its ids, in order) by id, as `entry.seqs`: the
        input may have lost, gained or reordered rows since the file was built, and a position recorded then
        would name another row now."""
        live = self.live()
        if not live:
            return
        of_file = [self.rows_of(entry.number, ["id"]).column("id").combine_chunks() for entry in live]
        ids = pa.chunked_array(of_file, pa.string())
        # Answered is the checkpoint's index of ids (binary search on hashes, hits confirmed on the ids); the
        # states it also keeps are not needed here.
        unknown = pa.chunked_array([pa.nulls(len(ids), pa.string())])
        index = Answered(ids, unknown, unknown)
        seqs = np.full(len(ids), -1, np.int64)
        start = 0
        for batch in id_batches():
            at = index.index(batch)
            found = at.is_valid().to_numpy(zero_copy_only=False)
            seqs[index.last_positions.take(at.filter(found)).to_numpy()] = start + np.flatnonzero(found)
            start += len(batch)
        offset = 0
        for entry, file_ids in zip(live, of_file):
            # Each file's rows as its rows file holds them, which the merge reads beside them: a rows file written
            # over (by a run of an older batch taken over while paused) never shifts the rows of the files after it.
            if len(file_ids) != entry.rows:
                log.warning("%s holds %s where the ledger recorded %d: written over by another run; its batch's "
                            "lines are merged for the rows it names, the others are skipped with a warning",
                            self.store.where(self.rows_key(entry.number)), counted(len(file_ids), "row"), entry.rows)
            entry.seqs = seqs[offset:offset + len(file_ids)]
            offset += len(file_ids)

    def count_batch_requests(self, states: RowStates) -> None:
        """Count in `states` (batch_requests) the batches each input row was put in since its last record: the
        requests its next record adds to `attempts`. A live file's rows are where `hold` found them by id."""
        written = states.written
        for entry in self.files.values():
            seqs = entry.seqs
            if seqs is None:
                seqs = self.rows_of(entry.number, ["seq"]).column("seq").to_numpy()
            seqs = seqs[(seqs >= 0) & (seqs < len(written))]
            # Built after the row's last record (written is 1 + its position): sent since, and not answered yet.
            np.add.at(states.batch_requests, seqs[written[seqs].astype(np.int64) <= entry.records_before], 1)

    def submissions(self, rows: int) -> np.ndarray:
        """How many times each input row was put in a batch (for `attempts`)."""
        counts = np.zeros(rows, np.int32)
        for entry in self.files.values():
            seqs = self.rows_of(entry.number, ["seq"]).column("seq").to_numpy()
            np.add.at(counts, seqs[seqs < rows], 1)
        return counts


def describe(entry: BatchFile, now: float | None = None) -> dict[str, Any]:
    """A batch as `status` and the run's summary show it."""
    age = (now or time.time()) - entry.built_at
    state = entry.status or ("created" if entry.batch_id else "uploaded" if entry.file_id else "built")
    return {"file": entry.number, "batch_id": entry.batch_id, "state": state, "rows": entry.rows,
            "counts": entry.counts, "age_s": round(age, 1), "merged": entry.merged, **entry.outcome}


def format_batch(batch: dict[str, Any]) -> str:
    counts = batch["counts"] or {}
    done = f", {counts.get('completed', 0)} completed, {counts.get('failed', 0)} failed" if counts else ""
    minutes = batch["age_s"] / 60
    age = f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"
    return (f"batch {batch['batch_id'] or '(not created yet)'} (file {batch['file']}): {batch['state']}, "
            f"{counted(batch['rows'], 'row')}{done}, age {age}")
