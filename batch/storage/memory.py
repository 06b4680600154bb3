"""The storage seam in memory, with faults a test injects: the failures an object store has, on demand.

`inject(op, nth, kind)` makes the `nth` call of `op` (counted from the store's making, 1 first; `calls` holds
the counts so far) go wrong:

    unavailable  the call fails with Unavailable and does nothing (the store could not be reached)
    lost_reply   the call takes effect, then fails with Unavailable (an object store's reply lost after a
                 PUT or DELETE: the caller cannot tell it from `unavailable` without reading again)
    torn         create/replace only: the object keeps just the first half of what was written, and the call
                 returns as if all was well (a damaged object, as a disk or a buggy writer leaves one)
    stalled      the call waits until the test sets `resume`, then goes as asked (a store that stopped
                 answering while its library retries)

Versions count up per store and are never reused. `writes` lists every write that took effect, in order, as
(op, key): what a test checks a writer did (never a replace of a part, a key never made twice).
"""

from __future__ import annotations

import io
import threading
from collections import Counter
from collections.abc import Callable
from typing import BinaryIO, Literal, NamedTuple, TypeVar

from batch.storage.base import (
    AlreadyExists,
    Entry,
    NotFound,
    PreconditionFailed,
    Store,
    Unavailable,
    Write,
    check_folder,
    check_key,
    check_prefix,
)

Op = Literal["open_read", "create", "replace", "list", "delete"]
FaultKind = Literal["unavailable", "lost_reply", "torn", "stalled"]
T = TypeVar("T")


class Fault(NamedTuple):
    op: Op
    nth: int
    kind: FaultKind


class _Object(NamedTuple):
    data: bytes
    version: str


class MemoryStore(Store):
    def __init__(self, faults: list[Fault] | None = None) -> None:
        self._objects: dict[str, _Object] = {}
        self._versions = 0
        self._lock = threading.Lock()  # the checkpoint writes from worker threads too
        self._faults: list[Fault] = []
        self.calls: Counter[str] = Counter()
        self.resume = threading.Event()  # what a stalled call waits for
        self.writes: list[tuple[Op, str]] = []
        for fault in faults or []:
            self.inject(*fault)

    def inject(self, op: Op, nth: int, kind: FaultKind = "unavailable") -> None:
        if kind == "torn" and op not in ("create", "replace"):
            raise ValueError("only a write can be torn")
        self._faults.append(Fault(op, nth, kind))

    def where(self, key: str) -> str:
        return f"memory:{check_key(key)}"

    def clean_up(self, folder: str = "") -> int:
        check_folder(folder)
        return 0  # a write here is whole or absent: nothing is left half done

    def open_read(self, key: str) -> BinaryIO:
        def read() -> BinaryIO:
            return io.BytesIO(self._get(key).data)
        return self._call("open_read", key, read)

    def create(self, key: str, write: Write) -> str:
        check_key(key)
        data = _written(write)

        def create() -> str:
            if key in self._objects:
                raise AlreadyExists(key)
            return self._put(key, data)
        return self._call("create", key, create)

    def replace(self, key: str, write: Write, if_version: str | None = None) -> str:
        check_key(key)
        data = _written(write)

        def replace() -> str:
            if if_version is not None:
                found = self._objects.get(key)
                if found is None or found.version != if_version:
                    raise PreconditionFailed(key, if_version, found and found.version)
            return self._put(key, data)
        return self._call("replace", key, replace)

    def list(self, prefix: str = "") -> list[Entry]:
        check_prefix(prefix)

        def listed() -> list[Entry]:
            return sorted(Entry(key, len(o.data), o.version) for key, o in self._objects.items()
                          if key.startswith(prefix))
        return self._call("list", prefix, listed)

    def delete(self, key: str) -> None:
        check_key(key)

        def delete() -> None:
            self._objects.pop(key, None)
        self._call("delete", key, delete)

    def _get(self, key: str) -> _Object:
        check_key(key)
        try:
            return self._objects[key]
        except KeyError:
            raise NotFound(key) from None

    def _put(self, key: str, data: bytes) -> str:
        self._versions += 1
        version = f"v{self._versions}"
        self._objects[key] = _Object(data, version)
        return version

    def _call(self, op: Op, key: str, act: Callable[[], T]) -> T:
        """`act` under the store's lock, as this call's fault (if one is injected for it) has it go."""
        with self._lock:
            self.calls[op] += 1
            nth = self.calls[op]
            fault = next((f.kind for f in self._faults if f.op == op and f.nth == nth), None)
        if fault == "stalled":  # outside the lock: the store's other calls go on meanwhile
            self.resume.wait()
        with self._lock:
            if fault == "unavailable":
                raise Unavailable(key, f"injected: call {nth} of {op} failed")
            result = act()
            if op in ("create", "replace", "delete"):
                self.writes.append((op, key))
            if fault == "torn":
                whole = self._objects[key]
                self._objects[key] = whole._replace(data=whole.data[:len(whole.data) // 2])
            elif fault == "lost_reply":
                raise Unavailable(key, f"injected: the reply to call {nth} of {op} was lost")
            return result


def _written(write: Write) -> bytes:
    """What `write` puts in a file, taken before the store is touched (a `write` that raises leaves no trace)."""
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()
