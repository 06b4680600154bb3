"""What the checkpoint holds per id, looked up a batch of ids at a time.

A Python dict of a million ids costs ~100 MB and seconds to build. Here the ids stay in Arrow,
ordered by their 64-bit hash, beside those hashes in numpy: a batch is looked up by binary search
on the hashes, and every hit is confirmed by comparing the ids themselves, so two ids that share a
hash are never taken for one another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.input.reader import hash_ids

# A failed row of these classes may succeed when sent again later (`--retry-failed`); the others
# (content_filter, prompt_too_long, bad_request, bad_prompt) would fail the same way.
RETRYABLE_LATER = {"rate_limited", "server_error", "timeout", "connection", "bad_response", "bad_json",
                   "batch_expired", "batch_failed"}


# The state of a row whose last record answered other prompt values than the row holds now (the input
# was edited): pending again. Its old record stays in the checkpoint.
PROMPT_CHANGED = "prompt_changed"

# The state of a row sitting in a live Batch API batch (batch/batch_api/ledger.py): neither sent online nor put in
# another batch until its batch's results are in. Held in memory only, never written as a record.
SUBMITTED = "submitted"


# The state of a row whose answers so far were paid for but judged failures (cut at a network_error, say) when the
# run's stop cut its retries short: pending again, its record kept for what those answers cost (and the requests).
INTERRUPTED = "interrupted"

# The states whose row is pending again, whatever --retry-failed says; each one's record is carried into the next.
PENDING_AGAIN = (PROMPT_CHANGED, INTERRUPTED)


def should_send(state: str | None, retry_failed: bool) -> bool:
    """Whether a row is sent, given its checkpoint state: None (pending), "ok", PENDING_AGAIN, SUBMITTED, or a
    failure's class."""
    return state is None or state in PENDING_AGAIN or (retry_failed and state in RETRYABLE_LATER)


class Answered:
    """The last record per id among the records given (Arrow arrays id, status, error_class, in the order written)."""

    def __init__(self, ids: pa.ChunkedArray, status: pa.ChunkedArray, error_class: pa.ChunkedArray) -> None:
        # "ok", or the failure's error_class; as a dictionary: a handful of distinct states, 4 bytes a record.
        states = _flat(_state(status, error_class)).dictionary_encode()
        hashes = _hashes(ids.chunks)
        # Stable sort of the records newest first: of one id's records, the last written comes first.
        order = np.argsort(hashes[::-1], kind="stable")
        np.subtract(len(order) - 1, order, out=order)  # positions counted from the newest, back to write order
        hashes, ids = hashes[order], _flat(ids).take(order)
        first = np.ones(len(hashes), dtype=bool)  # the first (newest) record of its id
        if len(hashes) > 1:
            same_hash = hashes[1:] == hashes[:-1]
            first[1:] = ~(same_hash & _numpy(pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))))
            for start in np.flatnonzero(same_hash & first[1:]):  # two ids, one hash: almost never
                _keep_newest_per_id(ids, hashes, first, int(start))
            del same_hash
        if not first.all():  # some id has older records: keep its newest only (no copies when none has)
            keep = np.flatnonzero(first)
            hashes, ids, order = hashes[keep], ids.take(keep), order[keep]
        self.hashes, self.ids = hashes, ids
        self.last_positions = pa.array(order)  # where each id's last record sits among all records
        self.states = states.take(self.last_positions)

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, ids: pa.Array) -> pa.Array:
        """Per id: its position among the answered ids, or null when it has no record."""
        wanted = _hashes([ids])
        if len(self.hashes) == 0:
            return pa.nulls(len(ids), pa.int64())
        # Looked up in sorted order: walking the big array in one direction is ~2.4x faster (cache misses).
        order = np.argsort(wanted)
        at = np.empty_like(order)
        at[order] = np.minimum(np.searchsorted(self.hashes, wanted[order]), len(self.hashes) - 1)
        same_hash = self.hashes[at] == wanted
        found = same_hash & _numpy(pc.equal(self.ids.take(at), ids))
        for i in np.flatnonzero(same_hash & ~found):  # another id with this hash came first: almost never
            at[i], found[i] = self._walk(ids[i].as_py(), int(at[i]))
        return pa.array(at, pa.int64(), mask=~found)

    def _walk(self, row_id: str, at: int) -> tuple[int, bool]:
        h = self.hashes[at]
        while at < len(self.hashes) and self.hashes[at] == h:
            if self.ids[at].as_py() == row_id:
                return at, True
            at += 1
        return 0, False

    def state(self, ids: pa.Array) -> pa.Array:
        """Per id: "ok", its failure's error_class, or null (no record: pending)."""
        return self.states.take(self.index(ids)).dictionary_decode()


def _hashes(chunks: Iterable[pa.Array]) -> np.ndarray:
    # A chunk at a time: only one chunk is ever Python strings.
    return np.concatenate([hash_ids(chunk) for chunk in chunks] or [np.empty(0, np.int64)])


def _flat(column: pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)


def _numpy(mask: pa.Array) -> np.ndarray:
    return mask.to_numpy(zero_copy_only=False)


def _keep_newest_per_id(ids: pa.Array, hashes: np.ndarray, first: np.ndarray, start: int) -> None:
    """Within a run of equal hashes starting at `start`, keep only the first (newest) record of each id."""
    while start > 0 and hashes[start - 1] == hashes[start]:
        start -= 1
    seen: set[str] = set()
    at = start
    while at < len(hashes) and hashes[at] == hashes[start]:
        row_id = ids[at].as_py()
        first[at] = row_id not in seen
        seen.add(row_id)
        at += 1


MAX_RECORDS = np.iinfo(np.uint32).max - 1  # write positions are held in 4 bytes a row


class RowCounts(NamedTuple):
    ok: int
    failed: int
    changed: int  # answered, but for prompt values the row no longer holds: pending again
    not_in_input: int  # ids in the checkpoint that no input row holds now (rows deleted from the input)


class RowStates:
    """Per input row: the state of its last record, and where that record was written.

    Almost every record sits at the input row it was sent from (its `seq`), so states are held by
    row position: a byte of state and the record's write position per row, flat in the input's
    length, whatever the checkpoint holds. Both start as zeros ("no record"), which the system
    hands out as untouched pages: a row costs memory only once it has a record. A record whose id is
    not the one now at its `seq` (an input edited and resumed with --force) is kept aside, by id; it
    counts for the row that now holds its id when it was written after that row's own record.

    A record is taken as a row's own when its id hashes like the row's id (64-bit SipHash, from
    the scan); the final file then confirms each pairing on the ids themselves. A row whose last
    record was made from other prompt values (its prompt_hash differs from the row's, from the scan)
    is PROMPT_CHANGED: pending again.
    """

    def __init__(self, rows: int, row_hashes: np.ndarray | None, row_prompts: np.ndarray | None = None) -> None:
        self.row_hashes = row_hashes  # needed only to read a checkpoint's records (add)
        self.row_prompts = row_prompts  # likewise, and for records kept aside (last)
        self.codes = np.zeros(rows, np.int8)  # 0: no record; else 1 + index into self.names
        self.written = np.zeros(rows, np.uint32)  # 0: no record; else 1 + the record's write position
        # Batch API batches each row was put in since its last record: requests its next record counts
        # (`attempts`), whatever answers it (batch/batch_api/ledger.py counts them, the Batch API adds each new one).
        self.batch_requests = np.zeros(rows, np.int32)
        self.names: list[str | None] = []  # "ok", or a failure's error_class
        self.record_count = 0  # records seen so far, in write order: the next one's position
        self._moved_parts: list[pa.Table] = []
        self._moved: Answered | None = None
        self._moved_written = np.empty(0, np.int64)
        self._moved_codes = np.empty(0, np.int8)
        self._moved_prompts = np.empty(0, np.int64)
        self._moved_seen = np.empty(0, bool)  # which records kept aside an input row has claimed (counts)
        self._kept_by_id: list[int] = []  # write positions of this run's records for ids no longer in the input

    def add(self, ids: pa.Array, seqs: pa.Array, status: pa.Array, error_class: pa.Array,
            prompt_hash: pa.Array | None = None) -> None:
        """A batch of records from the checkpoint, in the order they were written."""
        assert self.row_hashes is not None, "RowStates built without the input's hashes"
        first = self._reserve(len(ids))
        positions = np.arange(first, first + len(ids), dtype=np.int64)
        seq = _numpy(pc.fill_null(seqs, -1)).astype(np.int64, copy=False)
        inside = (seq >= 0) & (seq < len(self.codes))
        rows = np.where(inside, seq, 0)
        home = inside & (self.row_hashes[rows] == hash_ids(ids))
        prompts = _prompts(prompt_hash, len(ids))
        rows, at = rows[home], (positions[home] + 1).astype(np.uint32)
        np.maximum.at(self.written, rows, at)  # of a row's records in this batch, the last written wins
        won = self.written[rows] == at
        codes = self._codes(_state(status, error_class))[home]
        if self.row_prompts is not None:
            codes[_changed(prompts[home], self.row_prompts[rows])] = self._code(PROMPT_CHANGED)
        self.codes[rows[won]] = codes[won]
        if not home.all():
            away = pa.array(~home)
            self._moved_parts.append(pa.table({"id": ids.filter(away), "status": status.filter(away),
                                               "error_class": error_class.filter(away),
                                               "position": pa.array(positions[~home]),
                                               "prompt": pa.array(prompts[~home])}))

    def add_one(self, seq: int, state: str | None, prompt_hash: int | None = None) -> None:
        """A record this run wrote for input row `seq` (once per answer: no arrays built here); seq -1: for an id no
        longer in the input (a Batch API answer that came after its row was deleted), kept as the id's last record.
        Judged as `add` judges a record read back: an answer made from other prompt values than the row holds now (a
        Batch API row edited while its batch was live) is PROMPT_CHANGED, pending again, never the row's answer."""
        position = self._reserve(1)
        if seq < 0:
            self._kept_by_id.append(position)
            return
        self.written[seq] = position + 1
        self.batch_requests[seq] = 0
        if self.row_prompts is not None and prompt_hash is not None and prompt_hash != self.row_prompts[seq]:
            state = PROMPT_CHANGED
        self.codes[seq] = self._code(state)

    def hold(self, seqs: np.ndarray, answered_since: int) -> np.ndarray:
        """Mark the rows `seqs` of a live Batch API batch SUBMITTED (neither sent nor put in another batch), except
        those with a record written at or after position `answered_since`: the batch's answer to them is in (a merge
        was cut short). Returns the rows held."""
        held = seqs[self.written[seqs].astype(np.int64) <= answered_since]
        self.codes[held] = self._code(SUBMITTED)
        return held

    def sends_again(self, seq: int, retry_failed: bool) -> bool:
        """Whether input row `seq` (seq -1: none) is to be sent again, given its last record (should_send)."""
        return 0 <= seq < len(self.codes) and should_send(self.name(int(self.codes[seq])), retry_failed)

    def batch_requests_since_record(self, seq: int) -> int:
        """The Batch API requests sent for input row `seq` (seq -1: none known) since its last record."""
        return int(self.batch_requests[seq]) if 0 <= seq < len(self.batch_requests) else 0

    def release(self, seq: int) -> None:
        """A row of a batch that came back without an answer for it: pending again."""
        self.codes[seq] = 0

    def held(self) -> int:
        """How many rows sit in live Batch API batches."""
        return int((self.codes == self._code(SUBMITTED)).sum()) if SUBMITTED in self.names else 0

    def is_held(self, seq: int) -> bool:
        code = int(self.codes[seq])
        return code != 0 and self.names[code - 1] == SUBMITTED

    def _reserve(self, count: int) -> int:
        """Write positions for `count` more records: returns the first."""
        if self.record_count + count > MAX_RECORDS:
            raise ValueError(f"a checkpoint of more than {MAX_RECORDS} records")
        self.record_count += count
        return self.record_count - count

    def settle(self, keep_prompts: bool = False) -> None:
        """Index the records kept aside by id: once, after the checkpoint's last batch. `keep_prompts`: the rows'
        prompt hashes stay (4 bytes a row) to judge the answers this run adds (add_one)."""
        self.row_hashes = None
        if not self._moved_parts:
            if not keep_prompts:
                self.row_prompts = None
            return
        moved = pa.concat_tables(self._moved_parts)
        self._moved_parts = []
        self._moved = Answered(moved.column("id"), moved.column("status"), moved.column("error_class"))
        self._moved_written = _numpy(moved.column("position").take(self._moved.last_positions))
        self._moved_codes = self._codes(self._moved.states.dictionary_decode())
        self._moved_prompts = _numpy(moved.column("prompt").take(self._moved.last_positions))
        self._moved_seen = np.zeros(len(self._moved), bool)

    def last(self, start: int, ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """For input rows start, start+1, ... holding `ids`: each one's state code (0: none) and
        its record's write position (-1: none)."""
        stop = start + len(ids)
        codes, written = self.codes[start:stop].copy(), self.written[start:stop].astype(np.int64) - 1
        if self._moved is not None:
            at = self._moved.index(ids)
            found = _numpy(at.is_valid())
            where = _numpy(at.fill_null(0))
            newer = found & (self._moved_written[where] > written)
            codes[newer] = self._moved_codes[where[newer]]
            written[newer] = self._moved_written[where[newer]]
            if self.row_prompts is not None:
                changed = newer & _changed(self._moved_prompts[where], self.row_prompts[start:stop])
                codes[changed] = self._code(PROMPT_CHANGED)
            self._moved_seen[where[found]] = True
        return codes, written

    def name(self, code: int) -> str | None:
        return self.names[code - 1] if code else None

    def to_send(self, start: int, ids: pa.Array, retry_failed: bool) -> np.ndarray:
        """Which of these rows a run sends: should_send, asked once per distinct state."""
        return self._sends(retry_failed)[self.last(start, ids)[0]]

    def first_to_send(self, retry_failed: bool) -> int:
        """The first row a run may send (the row count when none): rows before it need not be read."""
        if self._moved is not None:  # a moved record can make any row answered: look at every row
            return 0
        sending = self._sends(retry_failed)[self.codes]
        first = int(sending.argmax())
        return first if len(sending) and sending[first] else len(sending)

    def resent_records(self, retry_failed: bool, id_batches: Callable[[], Iterable[pa.Array]]) -> np.ndarray:
        """(row, write position of its last record) of each row a run sends again although it has a record: the
        run adds what that record holds to the new one, so a row's last record holds the sum over all its answers.
        A row that moved has its last record among those kept aside by id: `id_batches` (the input's ids, in
        order) is read for them, only when there are some. Rows held in live Batch API batches count too (their
        answers may be merged in this run), and so do rows a batch gave back (pending again after a record)."""
        sends = self._sends(retry_failed)
        if SUBMITTED in self.names:
            sends[self._code(SUBMITTED)] = True
        if self._moved is None:
            rows = np.flatnonzero(sends[self.codes] & (self.written != 0))
            return np.stack([rows, self.written[rows].astype(np.int64) - 1], axis=1)
        found = [np.empty((0, 2), np.int64)]
        start = 0
        for ids in id_batches():
            codes, written = self.last(start, ids)
            rows = np.flatnonzero(sends[codes] & (written >= 0))
            found.append(np.stack([rows + start, written[rows]], axis=1))
            start += len(ids)
        return np.concatenate(found)

    def last_record_mask(self, id_batches: Callable[[], Iterable[pa.Array]]) -> np.ndarray:
        """A mask over write positions: the records that are some id's last, ids no longer in the input
        included. `id_batches` (the input's ids, in order) is read only when records were kept aside by id.

        They are also the records whose cost the job paid: each holds the sum over its row's answers (a row sent
        again adds its last record's, resent_records), so these sum to what the job spent (Checkpoint.spent)."""
        last = np.zeros(self.record_count, bool)
        last[self._kept_by_id] = True
        if self._moved is None:
            last[self.written[self.written > 0].astype(np.int64) - 1] = True
            return last
        self._moved_seen[:] = False
        start = 0
        for ids in id_batches():
            written = self.last(start, ids)[1]
            last[written[written >= 0]] = True
            start += len(ids)
        last[self._moved_written[~self._moved_seen]] = True  # the ids no input row holds now
        return last

    def _sends(self, retry_failed: bool) -> np.ndarray:
        return np.array([should_send(None, retry_failed)] + [should_send(n, retry_failed) for n in self.names])

    def counts(self, id_batches: Callable[[], Iterable[pa.Array]]) -> RowCounts:
        """The input rows' states; `id_batches` is read only when records were kept aside."""
        not_in_input = 0
        if self._moved is None:
            codes = self.codes
        else:
            codes = np.empty(len(self.codes), np.int8)
            self._moved_seen[:] = False
            start = 0
            for ids in id_batches():
                codes[start:start + len(ids)] = self.last(start, ids)[0]
                start += len(ids)
            not_in_input = int((~self._moved_seen).sum())
        not_in_input += len(self._kept_by_id)
        per_state = dict(zip(self.names, np.bincount(codes, minlength=len(self.names) + 1)[1:].tolist()))
        ok, changed = per_state.pop("ok", 0), per_state.pop(PROMPT_CHANGED, 0)
        per_state.pop(SUBMITTED, 0)  # pending, in a live Batch API batch
        per_state.pop(INTERRUPTED, 0)  # pending, what it paid for kept
        return RowCounts(ok, sum(per_state.values()), changed, not_in_input)

    def _code(self, state: str | None) -> int:
        if state not in self.names:
            if len(self.names) == np.iinfo(np.int8).max:
                raise ValueError("more than 127 distinct record states")
            self.names.append(state)
        return self.names.index(state) + 1

    def _codes(self, states: pa.Array) -> np.ndarray:
        encoded = states.dictionary_encode(null_encoding="encode")
        table = np.array([self._code(s) for s in encoded.dictionary.to_pylist()] or [0], np.int8)
        return table[_numpy(encoded.indices)]


def _prompts(prompt_hash: pa.Array | None, count: int) -> np.ndarray:
    """Records' prompt hashes as int64, -1 where none was recorded (checkpoints from before it existed)."""
    if prompt_hash is None:
        return np.full(count, -1, np.int64)
    return _numpy(pc.fill_null(prompt_hash.cast(pa.int64()), -1))


def _changed(recorded: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Which records were made from other prompt values than the rows hold now (none recorded: unchanged)."""
    return (recorded >= 0) & (recorded != current)


def _state(status: pa.Array, error_class: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(status, "ok"), "ok", error_class)
