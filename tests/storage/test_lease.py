"""The lease (batch/storage/lease.py) on every store: one holder at a time, renewed, expired and taken over with
epoch + 1, released; a holder whose lease was taken over learns it at its next renewal. Time is a hand-moved clock."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_store import STORES, bucket_for, make_store

from batch.storage.base import Store
from batch.storage.lease import LEASE_KEY, Lease, LeaseHeld, LeaseLost, LeaseState, read_lease
from batch.storage.memory import MemoryStore

TTL = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return make_store(request.param, tmp_path / "checkpoint", bucket_for(request, request.param))


def test_a_live_lease_has_one_holder_and_an_expired_one_is_taken_over_with_the_next_epoch(store: Store) -> None:
    clock = Clock()
    first, second = Lease(store, "host-a:1", TTL, clock), Lease(store, "host-b:2", TTL, clock)
    assert first.acquire() == 1
    with pytest.raises(LeaseHeld, match="held by host-a:1 .epoch 1. for 30 s"):
        second.acquire()
    clock.now += TTL * 2 / 3
    first.renew()  # every ttl/3 in a run: still its own
    clock.now += TTL * 2 / 3  # past the first expiry, within the renewed one
    with pytest.raises(LeaseHeld):
        second.acquire()
    clock.now += TTL  # the first holder stopped renewing (killed, or cut off)
    assert second.acquire() == 2
    with pytest.raises(LeaseLost, match="another process holds this checkpoint"):
        first.renew()  # the zombie learns it at its next renewal, before it writes more
    second.renew()
    first.release()  # a lost lease's release leaves the new holder's alone
    with pytest.raises(LeaseHeld, match="host-b:2 .epoch 2."):
        Lease(store, "host-c:3", TTL, clock).acquire()


def test_a_live_lease_whose_holder_is_known_gone_is_taken_over_at_once(store: Store) -> None:
    clock = Clock()
    Lease(store, "host-a:folder-1:100", TTL, clock).acquire()  # then killed -9: never renewed nor released
    with pytest.raises(LeaseHeld):
        Lease(store, "host-b:folder-9:7", TTL, clock).acquire(gone=lambda holder: holder.startswith("host-b:"))
    restarted = Lease(store, "host-a:folder-1:101", TTL, clock)
    assert restarted.acquire(gone=lambda holder: holder.startswith("host-a:folder-1:")) == 2


def test_a_released_lease_is_taken_at_once(store: Store) -> None:
    clock = Clock()
    first = Lease(store, "host-a:1", TTL, clock)
    first.acquire()
    first.release()
    assert Lease(store, "host-b:2", TTL, clock).acquire() == 2


def race(store: Store, clock: Clock, takers: int, name: str) -> tuple[list[int], list[LeaseHeld]]:
    """`takers` threads taking the lease at once: the epochs won, and the refusals."""
    won: list[int] = []
    held: list[LeaseHeld] = []
    start = threading.Barrier(takers)

    def taker(n: int) -> None:
        lease = Lease(store, f"{name}-{n}", TTL, clock)
        start.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld as exc:
            held.append(exc)

    threads = [threading.Thread(target=taker, args=(n,)) for n in range(takers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won, held


def test_racing_takers_of_a_free_or_expired_lease_one_wins(store: Store) -> None:
    clock = Clock()
    won, held = race(store, clock, 6, "first")
    assert won == [1] and len(held) == 5
    clock.now += 2 * TTL  # the winner never renews: expired
    won, held = race(store, clock, 6, "second")
    assert won == [2] and len(held) == 5


def test_a_create_whose_reply_was_lost_is_found_to_be_ours() -> None:
    store = MemoryStore([("create", 1, "lost_reply")])
    lease = Lease(store, "host-a:1", TTL, Clock())
    with pytest.raises(OSError):
        lease.acquire()  # the store says it failed; it had written the lease
    assert lease.acquire() == 1  # taken again by the same holder: its own, not held against it
    lease.renew()


def test_a_renewal_whose_reply_was_lost_leaves_the_lease_ours_and_a_take_over_is_still_found() -> None:
    """The runner tries a failed renewal again at the next: a first one that had taken effect is no take-over (it
    was: exit 4 with the lease still ours, on OSS after one failed check, anywhere after a lost reply)."""
    store = MemoryStore([("replace", 1, "lost_reply")])
    clock = Clock()
    lease = Lease(store, "host-a:1", TTL, clock)
    lease.acquire()
    with pytest.raises(OSError):
        lease.renew()  # the store says it failed; it had written the lease
    clock.now += 5
    lease.renew()
    assert read_lease(store)[0] == LeaseState("host-a:1", 1, clock.now + TTL)
    clock.now += 2 * TTL  # expired: taken over by another holder
    assert Lease(store, "host-b:2", TTL, clock).acquire() == 2
    with pytest.raises(LeaseLost):
        lease.renew()


def test_a_damaged_lease_is_taken_over_not_obeyed(store: Store) -> None:
    store.create(LEASE_KEY, lambda sink: sink.write(b"not json"))
    assert Lease(store, "host-a:1", TTL, Clock()).acquire() == 1


@pytest.mark.parametrize("lease", [b"garbage", b'{"holder": "host-a:1", "epoch": 2, "expi', b"", None])
def test_a_lease_damaged_or_lost_is_taken_above_every_epoch_used_before(store: Store, lease: bytes | None) -> None:
    """The holders before may have written parts of epochs up to `above`: a lease that no longer says which (its
    bytes no lease, or the object gone) is taken above them, so the new holder's parts never share their epoch."""
    clock = Clock()
    if lease is not None:
        store.create(LEASE_KEY, lambda sink: sink.write(lease))
    assert Lease(store, "host-b:2", TTL, clock).acquire(above=3) == 4
    clock.now += 2 * TTL
    assert Lease(store, "host-c:3", TTL, clock).acquire(above=2) == 5  # a lease that says more than `above`: above it


VALUES = (st.none() | st.booleans() | st.integers(-2, 2**40) | st.floats(allow_nan=True, allow_infinity=True)
          | st.text(max_size=8))
# What a `_LEASE` may hold: any bytes, or a JSON object with a lease's keys and any values (a lease, or one damaged).
LEFT = st.binary(max_size=80) | st.fixed_dictionaries(
    {"holder": VALUES | st.just("host-a:1"), "epoch": VALUES, "expires_at": VALUES}).map(
    lambda data: json.dumps(data).encode())


@settings(max_examples=100)
@given(left=LEFT, above=st.integers(0, 2**31))
@example(left=b'{"holder": "host-a:1", "epoch": 1e400, "expires_at": 0}', above=1)  # an epoch of infinity
@example(left=b'{"holder": "host-a:1", "epoch": 1, "expires_at": 1e400}', above=1)  # a lease never expiring
@example(left=b'{"holder": "host-a:1", "epoch": true, "expires_at": 0}', above=1)
def test_whatever_a_lease_holds_it_is_obeyed_or_taken_above_every_epoch_used(left: bytes, above: int) -> None:
    """A live lease is obeyed; anything else left in `_LEASE` is taken over, above its epoch (a lease's) and above
    every epoch the store's work names: never an error, never an epoch used before."""
    store, clock = MemoryStore(), Clock()
    store.create(LEASE_KEY, lambda sink: sink.write(left))
    said = read_lease(store)[0]  # type: ignore[index]
    lease = Lease(store, "host-b:2", TTL, clock)
    try:
        epoch = lease.acquire(above=above)
    except LeaseHeld:
        assert said.alive(clock.now) and said.holder != "(damaged)" and math.isfinite(said.expires_at)
        return
    assert epoch == max(said.epoch, above) + 1 and epoch > above >= 0


@pytest.mark.parametrize("ttl", [0.5, 3601, "soon"])
def test_a_lease_ttl_out_of_range_is_refused_in_one_line_naming_the_key(sim, make_job, run_cli, ttl) -> None:
    job = make_job(sim, output={"checkpoint_lease_s": ttl})
    for command in ("validate", "run"):
        code, out, err = run_cli(command, job)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert "output.checkpoint_lease_s" in err and "Traceback" not in err
    assert sim.stats()["requests"] == 0 and not (job.parent / "out").exists()
