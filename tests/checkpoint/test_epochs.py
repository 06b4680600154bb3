"""Two holders of one checkpoint (a zombie whose lease was taken over while it still wrote, and the run that took it
over): their parts' names carry their epochs and never collide, every record of both is kept, and of an id's records
one is its answer by one rule (answered.record_rank: an answer before a failure, then the highest epoch, then the
last written), while the row's cost, tokens and requests add up every answer either holder paid for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from helpers import record
from hypothesis import given
from hypothesis import strategies as st

from batch.checkpoint.answered import record_rank, record_rank_one
from batch.checkpoint.final import LastRecords
from batch.checkpoint.writer import Checkpoint, part_key, part_order
from batch.input.reader import hash_ids
from batch.records import CARRIED_FIELDS, RECORD_SCHEMA, carry
from batch.storage.local import LocalStore
from batch.storage.memory import MemoryStore


def holder(folder: Path, store: Any, epoch: int | None) -> Checkpoint:
    """One holder's checkpoint: its own local folder (its log), the shared store (its parts), its lease's epoch."""
    checkpoint = Checkpoint(folder, rows_per_part=10**6, store=store)
    checkpoint.epoch = epoch
    checkpoint.open()
    return checkpoint


def answer(row: int, ok: bool, own: int, name: str, before: dict[str, Any] | None) -> dict:
    """A record of row `row`: one answer that cost `own` (ok or a paid failure), adding up `before` (the row's record
    this holder carried, as the runner's recorder does)."""
    made = record(row, "ok" if ok else "failed")
    made.update(response=name, cost=float(own), prompt_tokens=own, completion_tokens=0, total_tokens=own, attempts=1)
    carry(made, before)
    return made


def paid(made: dict) -> dict[str, Any]:
    return {name: made[name] for name in CARRIED_FIELDS}


def test_each_holders_parts_carry_its_epoch_and_never_take_the_others_names(tmp_path: Path) -> None:
    store = MemoryStore()
    zombie, taker = holder(tmp_path / "a", store, 1), holder(tmp_path / "b", store, 2)
    for row in range(3):  # both write, turn about, under the same part numbers
        for checkpoint in (zombie, taker):
            checkpoint.append(record(row))
            checkpoint.compact()
    parts = [e.key for e in store.list("part-") if part_order(e.key)]
    # B numbered its first part past A's first; from then on both take the same numbers, under their own epochs.
    assert parts == [part_key(1, epoch=1), part_key(2, epoch=1), part_key(2, epoch=2), part_key(3, epoch=1),
                     part_key(3, epoch=2), part_key(4, epoch=2)]
    assert parts[1:3] == ["part-000002-e1.parquet", "part-000002-e2.parquet"]
    # Every part made by the first exclusive create it tried: neither holder's write was refused for the other's.
    assert sorted(key for op, key in store.writes if op == "create") == sorted(parts)
    assert part_order("part-000007-e12-3.parquet") == (7, 12, 3) and part_order("part-000007-3.parquet") == (7, 0, 3)
    records = Checkpoint(tmp_path / "reader", store=store).read_all()
    assert sorted(records.column("epoch").to_pylist()) == [1, 1, 1, 2, 2, 2]


def test_a_checkpoint_written_before_epochs_resumes_and_pays_nothing_twice(tmp_path: Path) -> None:
    """Parts named as before (part-N.parquet), without the epoch and carried columns, read as they did: each id's
    last record, which holds everything its row paid; a run with a lease then adds to them."""
    store = LocalStore(tmp_path / "ck")
    old_schema = pa.schema([f for f in RECORD_SCHEMA if f.name not in ("epoch", "carried")])
    first = answer(0, False, 2, "a1", None)
    then = answer(0, True, 3, "a2", paid(first))  # the same row retried: 5 in all
    other = answer(1, False, 4, "b1", None)
    for number, made in enumerate((first, other, then), 1):
        table = pa.Table.from_pylist([{k: v for k, v in made.items() if k in old_schema.names}], schema=old_schema)
        store.create(part_key(number), lambda sink, table=table: pq.write_table(table, sink))
    resumed = holder(tmp_path / "local", store, 3)  # a run on a URL now: it holds the lease's third epoch
    ids = pa.array(["id0", "id1"])
    states = resumed.row_states(2, hash_ids(ids))
    assert resumed.spent(states, lambda: [ids]).cost == 9.0  # 5 + 4: the old records' sums, never both of a row
    retried = answer(1, True, 6, "b2", paid(other))  # the failed row sent again, carrying its record
    resumed.append(retried)
    resumed.close(merge=False)
    assert [e.key for e in store.list("part-")][-1] == "part-000004-e3.parquet"
    reader = Checkpoint(tmp_path / "reader", store=store)
    states = reader.row_states(2, hash_ids(ids))
    answers = LastRecords(reader.row_groups(), states).answers(ids, 0)
    assert answers.column("response").to_pylist() == ["a2", "b2"]
    assert answers.column("cost").to_pylist() == [5.0, 10.0]
    assert reader.spent(states, lambda: [ids]).cost == 15.0


# One row's answers by one holder: (ok, what it cost), failures first; an answer ends the chain.
chains = st.lists(st.tuples(st.just(False), st.integers(1, 9)), max_size=2).flatmap(
    lambda failures: st.one_of(st.just(failures), st.integers(1, 9).map(lambda own: [*failures, (True, own)])))


@given(data=st.data(), rows=st.integers(1, 5))
def test_any_interleaving_of_two_holders_records_keeps_one_record_per_id_by_the_rule_and_sums_what_was_paid(
        tmp_path_factory, data, rows) -> None:
    """Holder A (epoch 1) answers rows; B takes the lease over (epoch 2) having read what A had written by then, and
    sends the rows not answered in that view, each adding up the record it saw; A, a zombie, goes on writing the
    answers it had in flight. Their parts interleave in any order. Read back: each id has one record, the one the
    rule keeps, and the row's cost, tokens and requests are what A and B paid for it, counted once each."""
    folder = tmp_path_factory.mktemp("zombie")
    store = MemoryStore()
    a_chains = [data.draw(chains, f"A's answers to row {row}") for row in range(rows)]
    # A's records in the order it wrote them: each row's own in order, the rows interleaved any way.
    a_order = data.draw(st.permutations([row for row in range(rows) for _ in a_chains[row]]), "A's write order")
    own_paid: list[list[int]] = [[] for _ in range(rows)]  # what each answer to each row cost, A's and B's
    a_records, a_before, a_next = [], [None] * rows, [0] * rows
    for row in a_order:
        ok, own = a_chains[row][a_next[row]]
        own_paid[row].append(own)
        made = answer(row, ok, own, f"A{row}.{a_next[row]}", a_before[row])
        a_next[row] += 1
        a_before[row] = paid(made)
        a_records.append(made)
    seen = data.draw(st.integers(0, len(a_records)), "A's records written when B took over")
    # What B read: each row's kept record then (A's, one chain: answered, or its last failure).
    view: list[dict | None] = [None] * rows
    for made in a_records[:seen]:
        if view[made["seq"]] is None or view[made["seq"]]["status"] != "ok":
            view[made["seq"]] = made
    b_records = []
    for row in range(rows):
        if view[row] is not None and view[row]["status"] == "ok":
            continue  # answered in B's view: B never sends it
        before = paid(view[row]) if view[row] is not None else None
        for n, (ok, own) in enumerate(data.draw(chains, f"B's answers to row {row}")):
            made = answer(row, ok, own, f"B{row}.{n}", before)
            own_paid[row].append(own)
            before = paid(made)
            b_records.append(made)
    late = a_records[seen:]
    turns = data.draw(st.permutations(["A"] * len(late) + ["B"] * len(b_records)), "late A and B interleaved")

    zombie = holder(folder / "a", store, 1)
    for made in a_records[:seen]:
        zombie.append(made)
        zombie.compact()
    taker = holder(folder / "b", store, 2)
    queues = {"A": iter(late), "B": iter(b_records)}
    for turn in turns:
        writer = zombie if turn == "A" else taker
        writer.append(next(queues[turn]))
        writer.compact()
    zombie.close(merge=False)
    taker.close(merge=False)

    every = a_records + b_records
    # Read back as it was written, or after the input was edited: rows added before them and their order changed,
    # so records sit at other rows than the ones holding their ids now (kept aside by id) and are matched by id.
    added = data.draw(st.integers(0, 2), "rows added to the input")
    order = data.draw(st.permutations(range(rows)), "the rows' order in the edited input") if added else range(rows)
    now = pa.array([f"new{i}" for i in range(added)] + [f"id{row}" for row in order])
    reader = Checkpoint(folder / "reader", store=store)
    states = reader.row_states(len(now), hash_ids(now))
    states_now = states.last(0, now)[0]
    answers = LastRecords(reader.row_groups(), states).answers(now, 0)
    assert answers.slice(0, added).column("status").null_count == added  # the rows added have no record
    for at, row in enumerate(order, added):
        mine = [made for made in every if made["seq"] == row]
        kept = answers.slice(at, 1).to_pylist()[0]
        if not mine:
            assert kept["status"] is None
            continue
        # The rule: an answer before a failure, then B's (the higher epoch), then the last the holder wrote.
        best = max(mine, key=lambda made: (made["status"] == "ok", made["epoch"], every.index(made)))
        assert kept["response"] == best["response"], (row, mine)
        assert kept["cost"] == sum(own_paid[row]), (row, mine)
        assert kept["prompt_tokens"] == sum(own_paid[row])
        assert kept["attempts"] == len(own_paid[row])
    spent = reader.spent(states, lambda: [now])
    assert spent.cost == sum(map(sum, own_paid)) and spent.prompt_tokens == sum(map(sum, own_paid))
    assert np.array_equal(states_now != 0, np.array([False] * added + [any(m["seq"] == r for m in every)
                                                                       for r in order]))


@given(st.lists(st.tuples(st.booleans(), st.integers(-5, 2**40), st.integers(0, 2**32 - 1)), min_size=1, max_size=30))
def test_a_record_ranked_as_it_comes_ranks_as_records_read_back(records):
    """The run ranks each answer alone (record_rank_one), resume ranks records by the array (record_rank): one rule,
    for any epoch (negative and past 31 bits clipped alike) and any write position."""
    ok, epoch, written = (np.array(column) for column in zip(*records))
    assert record_rank(ok, epoch, written).tolist() == [record_rank_one(*each) for each in records]
