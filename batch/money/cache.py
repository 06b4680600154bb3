"""Answers kept by request, so an identical request is paid for once.

Within a job, rows whose requests are identical (same model, params and messages) are sent once:
the first row carries the answer's cost, the others copy its answer at cost 0 and are marked
`cache_hit` (batch.records.cached_record, from the CACHED_FIELDS kept here). The answers live in
SQLite (one file, safe across processes, memory stays flat on large jobs): by default
`answers.sqlite` in the checkpoint folder; with `cache: {path: ...}` a file that later jobs share,
so re-asking the same thing pays nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from batch.errors import ConfigError
from batch.records import CACHED_FIELDS, Record, cached_fields

SAVE_EVERY_ANSWERS = 256
SAVE_EVERY_S = 1.0


def request_key(url: str, body: bytes) -> str:
    """The key of a request: the endpoint and the body (model, params and messages, serialized with sorted keys).

    The endpoint too: a local model served as "glm-4-flash" must not answer a Zhipu job from a shared cache."""
    return hashlib.sha256(url.encode() + b"\n" + body).hexdigest()


class AnswerCache:
    def __init__(self, path: Path, exclusive: bool = False) -> None:
        """`exclusive`: one process only (the checkpoint's own cache, under the run's lock). SQLite's WAL
        mode then keeps its index in memory, not in a shared-memory file mapped into the process."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        if exclusive:
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self._db.execute("PRAGMA journal_mode=WAL")
        # No fsync per answer: a cache entry lost to a power cut costs one request again, while an
        # fsync per insert would block the event loop on the disk for every row.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, record TEXT NOT NULL)")
        try:
            _check_table(self._db, path)
        except ConfigError:
            self._db.close()
            raise
        self._in_flight: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        # Answers are saved a batch per transaction: a transaction per answer cost more CPU than
        # the request itself. What a kill loses is only a cache entry; the row's answer is in the checkpoint.
        self._unsaved: dict[str, dict[str, Any]] = {}
        self._saved_at = time.monotonic()

    def get(self, key: str) -> dict[str, Any] | None:
        if key in self._unsaved:
            return self._unsaved[key]
        found = self._db.execute("SELECT record FROM answers WHERE key = ?", (key,)).fetchone()
        if found is None:
            return None
        try:
            kept = json.loads(found[0])
        except (TypeError, ValueError):
            kept = None
        # A damaged entry is a miss: the row is sent again. So is one an older batch wrote before a field was kept
        # (tool_calls): it is not the whole answer, and a hit would be an `ok` row with what it lacks left out.
        return kept if isinstance(kept, dict) and all(name in kept for name in CACHED_FIELDS) else None

    def put(self, key: str, record: Record) -> None:
        self._unsaved[key] = cached_fields(record)
        if len(self._unsaved) >= SAVE_EVERY_ANSWERS or time.monotonic() - self._saved_at >= SAVE_EVERY_S:
            self.save()

    def save(self) -> None:
        if not self._unsaved:
            return
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?)",
                                 [(key, json.dumps(kept, ensure_ascii=False)) for key, kept in self._unsaved.items()])
        self._unsaved.clear()
        self._saved_at = time.monotonic()

    async def answer_of(self, key: str) -> dict[str, Any] | None:
        """A kept answer, or the answer of an identical request in flight now; None: send it yourself."""
        kept = self.get(key)
        if kept is None and key in self._in_flight:
            kept = await asyncio.shield(self._in_flight[key])
        return kept

    def sending(self, key: str) -> asyncio.Future[dict[str, Any] | None]:
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._in_flight.setdefault(key, future)
        return future

    def sent(self, key: str, future: asyncio.Future[dict[str, Any] | None], record: Record | None) -> None:
        answered = record if record is not None and record["status"] == "ok" else None
        if answered is not None:
            self.put(key, answered)
        if self._in_flight.get(key) is future:
            del self._in_flight[key]
        if not future.done():
            future.set_result(answered)

    def close(self) -> None:
        try:
            self.save()
        finally:
            self._db.close()


def check_answer_cache(path: Path) -> None:
    """The checks that opening the cache makes (AnswerCache), made without writing anything: a file that is not
    SQLite, is damaged, or is another tool's database is refused before a run writes or sends anything.

    Opened immutable: nothing is created beside it, no lock is taken or waited for (a live run holds the
    checkpoint's own cache exclusively), and its write-ahead log is not read, so a table still only there
    counts as none yet, which the run creates."""
    if not path.exists():
        return
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True)
        try:
            _check_table(db, path, created=False)
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise open_error(path, exc) from None


def open_error(path: Path, exc: sqlite3.Error | OSError) -> ConfigError:
    return ConfigError(f"{path}: cannot open the answer cache: {exc} (if it is damaged, delete it: it only keeps "
                       "identical requests from being paid twice)")


def _check_table(db: sqlite3.Connection, path: Path, created: bool = True) -> None:
    """ConfigError when the table 'answers' is not ours (another tool's database: its lookups would fail mid-run);
    `created`: it must exist."""
    columns = [column[1] for column in db.execute("PRAGMA table_info(answers)")]
    if columns != ["key", "record"] and (columns or created):
        raise ConfigError(f"{path}: not an answer cache of batch: its table 'answers' has the columns "
                          f"{', '.join(columns) or 'none'}; point cache.path at a new file")

