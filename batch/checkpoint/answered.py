"""What the checkpoint holds per id, looked up a batch of ids at a time, and the one rule (record_rank) by which one
of an id's records is its answer.

A Python dict of a million ids costs ~100 MB and seconds to build. Here the ids stay in Arrow,
ordered by their 64-bit hash, beside those hashes in numpy: a batch is looked up by binary search
on the hashes, and every hit is confirmed by comparing the ids themselves, so two ids that share a
hash are never taken for one another.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.input.reader import hash_ids
from batch.records import CARRIED_FIELDS, RECORD_SCHEMA

# A failed row of these classes may succeed when sent again later (`--retry-failed`); the others
# (content_filter, prompt_too_long, bad_request, bad_prompt) would fail the same way.
RETRYABLE_LATER = {"rate_limited", "server_error", "timeout", "connection", "bad_response", "bad_json",
                   "batch_expired", "batch_failed", "batch_cancelled"}  # a cancel is over once asked: not the row's


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


def record_rank(ok: np.ndarray, epoch: np.ndarray, written: np.ndarray) -> np.ndarray:
    """THE rule by which one of an id's records is its answer, wherever records meet (resume, status, export, the
    final file, `batch merge`; the records of one holder, of several runs, or of a zombie holder and the one that took
    its lease over): the record of highest rank. An answer (`ok`: "ok", to the prompt the row holds now) before a
    failure; then the highest lease epoch (the holder that took the checkpoint last, so a zombie's late record never
    hides the new holder's); then the last written (`written`: its write position + 1; 0: no record).

    As one unsigned number per record (ok in the top bit, the epoch in the next 31, then the position), so numpy
    compares many at once. Whatever record wins, what the row paid is the sum over every holder's answers
    (RowStates.sum_own)."""
    epoch = np.clip(np.asarray(epoch, np.int64), 0, _EPOCH_TOP).astype(np.uint64)
    return (np.asarray(ok, bool).astype(np.uint64) << np.uint64(63)) | (epoch << np.uint64(32)) | \
        np.asarray(written).astype(np.uint64)


_EPOCH_TOP = 2**31 - 1


def record_rank_one(ok: bool, epoch: int, written: int) -> int:
    """record_rank of one record, in Python's integers: a run ranks each answer as it comes, where building numpy
    arrays for one value cost more than the rest of the answer's bookkeeping (0.2 ms a row, profiled)."""
    return (bool(ok) << 63) | (min(max(epoch, 0), _EPOCH_TOP) << 32) | written


class Answered:
    """The kept record per id (record_rank) among the records given (Arrow arrays id, status, error_class and
    epoch, in the order written)."""

    def __init__(self, ids: pa.ChunkedArray, status: pa.ChunkedArray, error_class: pa.ChunkedArray,
                 epoch: pa.ChunkedArray | None = None) -> None:
        # "ok", or the failure's error_class; as a dictionary: a handful of distinct states, 4 bytes a record.
        states = _flat(_state(status, error_class)).dictionary_encode()
        hashes = _hashes(ids.chunks)
        # Whether each record is an answer, from the handful of distinct states (never a string per record).
        ok = np.zeros(len(hashes), bool)
        if len(states.dictionary):
            answers = _numpy(pc.fill_null(pc.equal(states.dictionary, "ok"), False))
            ok = answers[_numpy(pc.fill_null(states.indices, 0))] & _numpy(states.indices.is_valid())
        rank = record_rank(ok, _epochs(epoch, len(hashes)), np.arange(1, len(hashes) + 1))
        # Sorted by hash, and of one id's records the kept one (highest rank) first.
        order = np.lexsort((~rank, hashes))
        hashes, ids = hashes[order], _flat(ids).take(order)
        first = np.ones(len(hashes), dtype=bool)  # the first (kept) record of its id
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
    """Within a run of equal hashes starting at `start`, keep only the first (kept) record of each id."""
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
_CARRIED_SCHEMA = pa.schema([RECORD_SCHEMA.field(name) for name in CARRIED_FIELDS])


class RowCounts(NamedTuple):
    ok: int
    failed: int
    changed: int  # answered, but for prompt values the row no longer holds: pending again
    not_in_input: int  # ids in the checkpoint that no input row holds now (rows deleted from the input)


class RowStates:
    """Per input row: the state of its kept record (record_rank: with one holder, its last), and where that record
    was written.

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
        # The lease epoch that wrote each row's record (0: none, or no lease): made at the first record written under a
        # lease, so a local checkpoint's rows cost no more than before.
        self._epochs: np.ndarray | None = None
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
        self._moved_epochs = np.empty(0, np.int64)
        self._moved_seen = np.empty(0, bool)  # which records kept aside an input row has claimed (counts)
        self._moved_mixed = np.empty(0, np.int64)  # the hashes of ids kept aside whose records are not one chain
        self._kept_by_id: list[int] = []  # write positions of this run's records for ids no longer in the input
        # Rows whose records are not one chain ending in the kept one (several epochs: runs, or a zombie holder and
        # the one after it; or a kept record before a later one): what they paid is summed over them (sum_own).
        self._mixed: list[np.ndarray] = []
        # The hashes of the ids whose records are summed (sums_wanted: those rows', and ids kept aside by id whose
        # records are not one chain either), sorted.
        self._summed_ids = np.empty(0, np.int64)
        self._paid_positions = np.empty(0, np.int64)  # where the kept record of an id summed may be, sorted
        self._paid = _CARRIED_SCHEMA.empty_table()  # what that id paid in all, one row per position

    def add(self, ids: pa.Array, seqs: pa.Array, status: pa.Array, error_class: pa.Array,
            prompt_hash: pa.Array | None = None, epoch: pa.Array | None = None) -> None:
        """A batch of records from the checkpoint, in the order they were written."""
        first = self._reserve(len(ids))
        positions = np.arange(first, first + len(ids), dtype=np.int64)
        home, rows = self.home_rows(ids, seqs)
        prompts = _prompts(prompt_hash, len(ids))
        epochs = _epochs(epoch, len(ids))
        rows, at, record_epochs = rows[home], (positions[home] + 1).astype(np.uint32), epochs[home]
        codes = self._codes(_state(status, error_class))[home]
        if self.row_prompts is not None:
            codes[_changed(prompts[home], self.row_prompts[rows])] = self._code(PROMPT_CHANGED)
        if len(rows):
            self._keep(rows, at, codes, record_epochs)
        if not home.all():
            away = pa.array(~home)
            self._moved_parts.append(pa.table({"id": ids.filter(away), "status": status.filter(away),
                                               "error_class": error_class.filter(away),
                                               "position": pa.array(positions[~home]),
                                               "prompt": pa.array(prompts[~home]),
                                               "epoch": pa.array(epochs[~home])}))

    def home_rows(self, ids: pa.Array, seqs: pa.Array, hashes: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Which records (`ids`, `seqs`; `hashes`: the ids' hashes, when known) sit at the input row they were sent
        from (its id hashes like theirs), and that row (0 where not)."""
        assert self.row_hashes is not None, "RowStates built without the input's hashes"
        seq = _numpy(pc.fill_null(seqs, -1)).astype(np.int64, copy=False)
        inside = (seq >= 0) & (seq < len(self.codes))
        rows = np.where(inside, seq, 0)
        return inside & (self.row_hashes[rows] == (hash_ids(ids) if hashes is None else hashes)), rows

    def _keep(self, rows: np.ndarray, at: np.ndarray, codes: np.ndarray, epochs: np.ndarray) -> None:
        """Records of input `rows` (in write order: `at`, position + 1): each row keeps, of them and its record so
        far, the one record_rank puts first; a row whose records are not one holder's chain ending in the kept one
        is noted to have what it paid summed (sum_own)."""
        ok = self._code("ok")
        rank = record_rank(codes == ok, epochs, at)
        order = np.lexsort((rank, rows))  # by row, its best record last
        sorted_rows = rows[order]
        starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
        ends = np.r_[starts[1:], len(order)] - 1
        best, touched = order[ends], sorted_rows[ends]
        before = self.written[touched] > 0
        current = record_rank(self.codes[touched] == ok, self.epochs_of(touched), self.written[touched])
        wins = rank[best] > current
        latest = np.maximum.reduceat(order, starts)  # each row's last written record of the batch
        low, high = np.minimum.reduceat(epochs[order], starts), np.maximum.reduceat(epochs[order], starts)
        mixed = (low != high) | (best != latest) | (before & (~wins | (self.epochs_of(touched) != low)))
        if mixed.any():
            self._mixed.append(touched[mixed])
        won, chosen = touched[wins], best[wins]
        self.written[won], self.codes[won] = at[chosen], codes[chosen]
        self._set_epochs(won, epochs[chosen])

    def epochs_of(self, rows: np.ndarray | slice) -> np.ndarray:
        """The lease epoch of these rows' records (0: none, or written without a lease)."""
        if self._epochs is None:
            return np.zeros(len(self.codes[rows]), np.int32)
        return self._epochs[rows]

    def _epoch_of(self, seq: int) -> int:
        """epochs_of one row, as an int."""
        return 0 if self._epochs is None else int(self._epochs[seq])

    def _set_epoch(self, seq: int, epoch: int) -> None:
        """_set_epochs of one row (an answer as it comes: no arrays)."""
        if self._epochs is None and epoch:
            self._epochs = np.zeros(len(self.codes), np.int32)
        if self._epochs is not None:
            self._epochs[seq] = epoch

    def _set_epochs(self, rows: np.ndarray | slice, epochs: np.ndarray) -> None:
        if self._epochs is None:
            if not np.any(epochs):
                return
            self._epochs = np.zeros(len(self.codes), np.int32)
        self._epochs[rows] = epochs

    def sums_wanted(self) -> bool:
        """Find the ids whose records are not one holder's chain ending in the kept one, whatever input row they sit
        at: the rows noted so (_keep), the ids kept aside by id whose records are not one chain (several epochs, or
        the kept one before a later one), and the ids with records both at their row and kept aside (an input
        edited between runs: the row's chain went on at its new place). Once, after the checkpoint's last batch;
        True when there are any, whose records sum_own is then given (summed_records picks them)."""
        self._index_moved()
        if self.row_hashes is None:  # no record was read
            return False
        wanted = [self.row_hashes[np.concatenate(self._mixed)]] if self._mixed else []
        if self._moved is not None:
            wanted.append(self._moved_mixed)
            answered = np.flatnonzero(self.written)  # rows with a record at their own place
            at = np.minimum(np.searchsorted(self._moved.hashes, self.row_hashes[answered]), len(self._moved) - 1)
            wanted.append(self._moved.hashes[at[self._moved.hashes[at] == self.row_hashes[answered]]])
        self._summed_ids = np.unique(np.concatenate(wanted)) if wanted else np.empty(0, np.int64)
        return len(self._summed_ids) > 0

    def summed_records(self, ids: pa.Array, seqs: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Of records (`ids`, `seqs`, in write order), which sum_own needs (sums_wanted's ids'), and each one's row
        (-1: kept aside by id)."""
        hashes = hash_ids(ids)
        home, rows = self.home_rows(ids, seqs, hashes)
        at = np.minimum(np.searchsorted(self._summed_ids, hashes), max(len(self._summed_ids) - 1, 0))
        wanted = self._summed_ids[at] == hashes if len(self._summed_ids) else np.zeros(len(ids), bool)
        return wanted, np.where(home, rows, -1)

    def sum_own(self, records: pa.Table) -> None:
        """What each id of sums_wanted paid in all, from every one of its records (`records`: columns id, row (-1:
        kept aside by id), position, epoch, carried and CARRIED_FIELDS, in any order).

        One holder's records of an id are one chain: each adds up the one before (records.carry), so its last holds
        the chain's answers and what its first carried from before. An id paid, summed over the holders (epochs)
        that wrote it, each one's last record less what its first carried: with one holder, that is its last record;
        with a zombie holder and the one that took its lease over, which each carried what it saw, every answer
        counts once, whichever record is kept, at its row or kept aside. A record written before `carried` was
        recorded carried nothing."""
        keys = hash_ids(records.column("id").combine_chunks())  # the id, as sums_wanted knows it
        records = records.append_column("key", pa.array(keys))
        table = records.sort_by([("key", "ascending"), ("epoch", "ascending"), ("position", "ascending")])
        keys, epochs = _numpy(table.column("key").combine_chunks()), _numpy(table.column("epoch").combine_chunks())
        if not len(keys):
            return
        group = np.r_[True, (keys[1:] != keys[:-1]) | (epochs[1:] != epochs[:-1])]
        firsts = np.flatnonzero(group)
        lasts = np.r_[firsts[1:], len(keys)] - 1
        carried = [json.loads(text) if text else {} for text in table.column("carried").take(pa.array(firsts))
                   .to_pylist()]
        key_of_group = keys[firsts]
        id_starts = np.flatnonzero(np.r_[True, key_of_group[1:] != key_of_group[:-1]])
        totals = {}
        for name in CARRIED_FIELDS:
            last = table.column(name).combine_chunks().take(pa.array(lasts))
            known = _numpy(last.is_valid())
            values = _numpy(pc.fill_null(last, 0)).astype(np.float64)
            values -= np.array([float(before.get(name) or 0) for before in carried])
            summed = np.add.reduceat(values * known, id_starts)
            any_known = np.logical_or.reduceat(known, id_starts)
            kind = RECORD_SCHEMA.field(name).type
            totals[name] = pa.array(summed if pa.types.is_floating(kind) else np.rint(summed).astype(np.int64),
                                    mask=~any_known).cast(kind)
        paid = pa.table(totals, schema=_CARRIED_SCHEMA)
        # Where each id's kept record may be, whichever last() keeps: its row's kept record, and its record kept
        # aside by id. A position is one record's: one id's sum each.
        key_of_id = key_of_group[id_starts]
        row_of_id = np.maximum.reduceat(_numpy(table.column("row").combine_chunks()), np.flatnonzero(
            np.r_[True, keys[1:] != keys[:-1]]))
        at_row = np.flatnonzero(row_of_id >= 0)
        positions, which = [self.written[row_of_id[at_row]].astype(np.int64) - 1], [at_row]
        if self._moved is not None:
            at = np.minimum(np.searchsorted(self._moved.hashes, key_of_id), len(self._moved) - 1)
            aside = np.flatnonzero(self._moved.hashes[at] == key_of_id)
            positions.append(self._moved_written[at[aside]])
            which.append(aside)
        found, of = np.concatenate(positions), np.concatenate(which)
        order = np.argsort(found, kind="stable")
        self._paid_positions, self._paid = found[order], paid.take(pa.array(of[order]))

    def paid_at(self, positions: np.ndarray) -> tuple[np.ndarray, pa.Table]:
        """Of the records at write `positions` (ids' kept records: last_record_mask's, last()'s), which (indices into
        `positions`) are of ids whose records several holders wrote (sum_own), and what each of those ids paid in all
        (CARRIED_FIELDS, one row each, in that order)."""
        if not len(self._paid_positions) or not len(positions):
            return np.empty(0, np.int64), self._paid.slice(0, 0)
        positions = np.asarray(positions, np.int64)
        at = np.minimum(np.searchsorted(self._paid_positions, positions), len(self._paid_positions) - 1)
        which = np.flatnonzero(self._paid_positions[at] == positions)
        return which, self._paid.take(pa.array(at[which]))

    def add_one(self, seq: int, state: str | None, prompt_hash: int | None = None, epoch: int | None = None) -> None:
        """A record this run wrote for input row `seq` (once per answer: no arrays built here); seq -1: for an id no
        longer in the input (a Batch API answer that came after its row was deleted), kept as the id's last record.
        Judged as `add` judges a record read back: an answer made from other prompt values than the row holds now (a
        Batch API row edited while its batch was live) is PROMPT_CHANGED, pending again, never the row's answer.
        `epoch`: this run's lease epoch (None: no lease). Kept by record_rank, as records read back are."""
        position = self._reserve(1)
        if seq < 0:
            self._kept_by_id.append(position)
            return
        self.batch_requests[seq] = 0
        if self.row_prompts is not None and prompt_hash is not None and prompt_hash != self.row_prompts[seq]:
            state = PROMPT_CHANGED
        code, ok = self._code(state), self._code("ok")
        kept = record_rank_one(self.codes[seq] == ok, self._epoch_of(seq), int(self.written[seq]))
        if record_rank_one(code == ok, epoch or 0, position + 1) > kept:
            self.written[seq], self.codes[seq] = position + 1, code
            self._set_epoch(seq, epoch or 0)

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

    def all_held(self, seqs: np.ndarray) -> bool:
        """Whether every one of the rows `seqs` sits in a live Batch API batch (SUBMITTED)."""
        return bool((self.codes[seqs] == self._code(SUBMITTED)).all())

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
        """Once, after the checkpoint's last batch (and sum_own): the records kept aside by id indexed, the input's
        hashes let go. `keep_prompts`: the rows' prompt hashes stay (4 bytes a row) to judge the answers this run adds
        (add_one)."""
        self._index_moved()
        self.row_hashes = None
        if self._moved is None and not keep_prompts:
            self.row_prompts = None

    def _index_moved(self) -> None:
        """Index the records kept aside by id (once): each id's kept one (record_rank), and the ids whose records
        kept aside are not one chain ending in it (several epochs, or a later record than the kept one)."""
        if not self._moved_parts:
            return
        moved = pa.concat_tables(self._moved_parts)
        self._moved_parts = []
        self._moved = Answered(moved.column("id"), moved.column("status"), moved.column("error_class"),
                               moved.column("epoch"))
        self._moved_written = _numpy(moved.column("position").take(self._moved.last_positions))
        self._moved_codes = self._codes(self._moved.states.dictionary_decode())
        self._moved_prompts = _numpy(moved.column("prompt").take(self._moved.last_positions))
        self._moved_epochs = _numpy(moved.column("epoch").take(self._moved.last_positions))
        self._moved_seen = np.zeros(len(self._moved), bool)
        hashes, epochs = _hashes(moved.column("id").chunks), _numpy(moved.column("epoch").combine_chunks())
        positions = _numpy(moved.column("position").combine_chunks())
        order = np.lexsort((positions, hashes))
        hashes, epochs, positions = hashes[order], epochs[order], positions[order]
        starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
        several = (np.minimum.reduceat(epochs, starts) != np.maximum.reduceat(epochs, starts))
        at = np.searchsorted(self._moved.hashes, hashes[starts])  # each id's kept record (one per hash)
        before_last = self._moved_written[np.minimum(at, len(self._moved) - 1)] != np.maximum.reduceat(positions,
                                                                                                         starts)
        self._moved_mixed = hashes[starts][several | before_last]

    def last(self, start: int, ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """For input rows start, start+1, ... holding `ids`: each one's state code (0: none) and
        its record's write position (-1: none)."""
        stop = start + len(ids)
        codes, written = self.codes[start:stop].copy(), self.written[start:stop].astype(np.int64) - 1
        if self._moved is not None:
            at = self._moved.index(ids)
            found = _numpy(at.is_valid())
            where = _numpy(at.fill_null(0))
            moved_codes = self._moved_codes[where]
            if self.row_prompts is not None:
                moved_codes = np.where(_changed(self._moved_prompts[where], self.row_prompts[start:stop]),
                                       self._code(PROMPT_CHANGED), moved_codes)
            ok = self._code("ok")
            kept = record_rank(moved_codes == ok, self._moved_epochs[where], self._moved_written[where] + 1) > \
                record_rank(codes == ok, self.epochs_of(slice(start, stop)), written + 1)
            kept &= found
            codes[kept] = moved_codes[kept]
            written[kept] = self._moved_written[where[kept]]
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
        if not sending.any():  # none (a shard with no rows of the input among them, too)
            return len(sending)
        return int(sending.argmax())

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


def _epochs(epoch: pa.Array | pa.ChunkedArray | None, count: int) -> np.ndarray:
    """Records' lease epochs as int64, 0 where none was recorded (no lease, or written before epochs were)."""
    if epoch is None:
        return np.zeros(count, np.int64)
    if isinstance(epoch, pa.ChunkedArray):
        epoch = _flat(epoch)
    return _numpy(pc.fill_null(epoch, 0).cast(pa.int64())).astype(np.int64, copy=False)


def _state(status: pa.Array, error_class: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(status, "ok"), "ok", error_class)


def with_paid_in_all(records: pa.Table, rows: np.ndarray, paid: pa.Table) -> pa.Table:
    """`records` with what its rows `rows` paid in all (`paid`: RowStates.paid_at) in its paid
    columns: a row several holders answered costs what every holder paid, whichever holder's record is kept."""
    if not len(rows):
        return records
    mask = pa.array(np.isin(np.arange(records.num_rows), rows))
    for name in paid.column_names:
        if name in records.column_names:
            column = records.column(name).combine_chunks()
            summed = paid.column(name).combine_chunks().cast(column.type)
            records = records.set_column(records.schema.get_field_index(name), name,
                                         pc.replace_with_mask(column, mask, summed))
    return records
