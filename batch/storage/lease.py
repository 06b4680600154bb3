"""One holder per checkpoint, across hosts: a lease object (`_LEASE`) in the checkpoint's store.

Built on the seam's two conditional writes alone, so it works on every store (a local folder, memory, S3):
- taken by an exclusive `create` (epoch 1, or above the epochs the store's work already names); two takers racing,
  one wins;
- renewed by a compare-and-swap on the version the holder last wrote (S3: If-Match on the ETag), every ttl/3;
  a swap refused means another holder took the lease over: this one is a zombie and must stop (LeaseLost);
- a lease not renewed for `ttl` seconds is expired, and taken over by a compare-and-swap with epoch + 1, so two
  takers of an expired lease cannot both win either;
- released by writing it expired (a swap too: a release never clears a lease someone else holds).

The epoch names a holding: work a holder writes can carry it, so a zombie's writes never collide with the next
holder's. Expiry is a wall-clock time written in the lease: hosts' clocks must agree to well within the ttl
(NTP does); the clock is a parameter, so tests move it by hand.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batch.storage.base import AlreadyExists, NotFound, PreconditionFailed, Store, marker_object

LEASE_KEY = "_LEASE"
DEFAULT_TTL_S = 30.0  # the job file's output.checkpoint_lease_s unless it sets one


@dataclass(frozen=True)
class LeaseState:
    holder: str
    epoch: int
    expires_at: float  # seconds since the epoch, by the holder's clock

    def encoded(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    def alive(self, now: float) -> bool:
        """Whether its holder may still be writing: not expired (nor released, which writes it expired)."""
        return self.expires_at > now


class LeaseHeld(Exception):
    """Another holder's lease is live: this one may not take it."""

    def __init__(self, state: LeaseState, now: float) -> None:
        super().__init__(f"held by {state.holder} (epoch {state.epoch}) for {max(state.expires_at - now, 0):.0f} s "
                         "more unless it renews it")
        self.state = state


class LeaseLost(Exception):
    """The lease was taken over (or is gone) since this holder last renewed it: it must stop writing."""


class Lease:
    """`holder` (unique to this process) holding the lease in `store`, for `ttl` seconds at a time."""

    def __init__(self, store: Store, holder: str, ttl: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.holder, self.ttl, self.clock = store, holder, ttl, clock
        self.epoch = 0  # 0 until taken
        self.expires_at = 0.0  # when the lease last written by this holder runs out, by its clock
        self._version: str | None = None
        # One write at a time: a renewal on a timer (in a thread) and one asked for at once must not both swap from
        # the same version, or the second would take the first's success for a take-over.
        self._writing = threading.Lock()

    @property
    def renew_every(self) -> float:
        return self.ttl / 3

    def expired(self) -> bool:
        """Whether this holder's lease has run out unrenewed (a pause, a store that did not answer): another may
        have taken it over by now, so the holder sends nothing more until a renewal says it is still its own."""
        return self.clock() >= self.expires_at

    def acquire(self, gone: Callable[[str], bool] = lambda holder: False, above: int = 0) -> int:
        """Take the lease (LeaseHeld while another holder's is live); returns this holding's epoch. `gone(holder)`
        says a holder is known to have ended (a process of this host whose local lock is now ours): its lease is
        taken over at once, with the next epoch, instead of after its ttl. `above`: the highest epoch the store's
        work names (the checkpoint's parts): a lease lost or damaged (read as epoch 0) no longer tells which epochs
        the holders before it used, and the new holding's must be above all of them."""
        while True:
            try:
                return self._write(above + 1, create=True)
            except AlreadyExists:
                pass
            found = self._read()
            if found is None:  # released by deletion between our create and our read: create again
                continue
            state, version = found
            now = self.clock()
            ours = state.holder == self.holder  # ours already (a create whose reply was lost): go on holding it
            if not ours and state.expires_at > now and not gone(state.holder):
                raise LeaseHeld(state, now)
            try:
                return self._swap(state.epoch if ours else max(state.epoch, above) + 1, version)
            except (PreconditionFailed, NotFound):  # it changed since it was read (another taker swapped): again
                continue

    def renew(self) -> None:
        """Extend the lease by ttl from now; LeaseLost when another holder has it now."""
        assert self._version is not None, "renew before acquire"
        with self._writing:
            try:
                self._swap(self.epoch, self._version)
                return
            except (PreconditionFailed, NotFound):
                pass
            # A renewal of ours that took effect while its reply was lost (an Unavailable the runner tried again
            # after) moved the lease past the version held: a lease naming this holder and epoch is still ours
            # (holders are unique; a take-over or a release writes another holder or epoch), so swap from there.
            found = self._read()
            if found is not None and (found[0].holder, found[0].epoch) == (self.holder, self.epoch):
                try:
                    self._swap(self.epoch, found[1])
                    return
                except (PreconditionFailed, NotFound):
                    pass
        raise LeaseLost(f"the lease in {self.store.where(LEASE_KEY)} was taken over since epoch {self.epoch}: "
                        "another process holds this checkpoint now")

    def release(self) -> None:
        """Leave the lease expired, so the next taker need not wait out the ttl; a lease lost meanwhile is left be."""
        if self._version is None:
            return
        try:
            with self._writing:
                self.store.replace(LEASE_KEY, _bytes(LeaseState(self.holder, self.epoch, 0.0)),
                                   if_version=self._version)
        except (PreconditionFailed, NotFound):
            pass
        self._version = None

    def _swap(self, epoch: int, version: str) -> int:
        return self._write(epoch, if_version=version)

    def _write(self, epoch: int, create: bool = False, if_version: str | None = None) -> int:
        state = LeaseState(self.holder, epoch, self.clock() + self.ttl)
        if create:
            self._version = self.store.create(LEASE_KEY, _bytes(state))
        else:
            self._version = self.store.replace(LEASE_KEY, _bytes(state), if_version=if_version)
        self.epoch, self.expires_at = epoch, state.expires_at
        return epoch

    def _read(self) -> tuple[LeaseState, str] | None:
        return read_lease(self.store)


def holder_prefix(local_dir: Path) -> str:
    """How a run names itself as a lease holder, up to its pid: this host and its local folder (HOST:FOLDER:). A
    holder named so, while that folder's run lock is free, is a run that ended here without releasing the lease
    (killed -9): the next run here takes it over at once, and `status` says it is not running."""
    return f"{socket.gethostname()}:{hashlib.sha256(str(local_dir.resolve()).encode()).hexdigest()[:8]}:"


def read_lease(store: Store) -> tuple[LeaseState, str] | None:
    """The lease in `store` as it is and the version it is at; None when there is none. A lease that is not one
    (damaged) reads as expired at epoch 0, so it is taken over rather than blocking every run."""
    listed = store.list(LEASE_KEY)
    entry = next((e for e in listed if e.key == LEASE_KEY), None)
    if entry is None:
        return None
    try:
        state = _lease_of(marker_object(store.read_bytes(LEASE_KEY)))
    except NotFound:
        return None
    except (ValueError, KeyError, TypeError):
        state = LeaseState("(damaged)", 0, 0.0)
    return state, entry.version


def _lease_of(data: Any) -> LeaseState:
    """The lease the JSON `data` is (as LeaseState.encoded writes it); ValueError, KeyError or TypeError when it is
    none: an epoch that is no whole number from 0 up, or an expiry that is no finite time (one never expiring would
    block every run)."""
    holder, epoch, expires_at = data["holder"], data["epoch"], data["expires_at"]
    if not isinstance(holder, str) or type(epoch) is not int or epoch < 0:
        raise ValueError("not a lease's holder and epoch")
    if type(expires_at) not in (int, float) or not math.isfinite(expires_at):
        raise ValueError("not a lease's expiry")
    return LeaseState(holder, epoch, float(expires_at))


def _bytes(state: LeaseState) -> Callable[..., object]:
    data = state.encoded()
    return lambda sink: sink.write(data)
