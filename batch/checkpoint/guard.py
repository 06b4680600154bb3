"""Guards around a checkpoint folder: one live run at a time, no resume under changed settings, and a
mark of the run in progress, so that a run that never finished (kill -9, a crash) is told apart."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import IO, Any

from batch.config import JobSpec
from batch.errors import ConfigError, LockedError, option
from batch.storage.locations import Location, delete_at, read_text_at, write_text_at

LOCK_NAME = "lock"
FINGERPRINT_NAME = "fingerprint.json"
RUN_NAME = "run.json"  # the run in progress, or one that did not end: removed once its summary is saved


class RunLock:
    """An flock on a file in the checkpoint folder: the kernel drops it when its holder dies, even by kill -9.

    Each RunLock opens the file anew, so two in one process exclude each other as two processes do. One RunLock
    may be taken again by its holder (run_frame holds it from before it writes the input, and its run takes it
    again): it is let go at the last release."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self._file: IO[str] | None = None
        self._taken = 0

    def acquire(self) -> None:
        if self._file is not None:
            self._taken += 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            where = f"pid {holder}" + (": this process" if holder == str(os.getpid()) else "")
            raise LockedError(f"{self.path.parent}: another run of this job is alive ({where}); "
                              "wait for it or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        self._taken = 1

    def release(self) -> None:
        if self._file is None:
            return
        self._taken -= 1
        if self._taken == 0:
            self._file.close()  # closing drops the flock; the file stays, harmless
            self._file = None

    def holder(self) -> int | None:
        """The pid of a live holder, or None. It only reads (a shared flock needs no write access): `status` writes
        nothing, and answers on a folder it cannot write."""
        try:
            handle = open(self.path, encoding="utf-8")
        except OSError:  # no lock file: no run yet; one that cannot be read: no run can hold it either
            return None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = handle.read().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None


def fingerprint(spec: JobSpec) -> dict[str, Any]:
    """What shapes the requests, as stored (JSON's values): a resume under different values would mix two jobs in
    one output. Taken by the preflight, once: the run compares and stores the Plan's."""
    return json.loads(json.dumps({
        "model": spec.model.name,
        "params": spec.model.params,
        "system": spec.prompt.system,
        "template": spec.prompt.template,
        "messages_column": spec.prompt.messages_column,
        "input": str(spec.input.path.resolve()),
        "id_column": spec.input.id_column,
        # None without a schema, as in checkpoints made before it existed. A schema file by what it says, so an
        # edited file is a change like an edited inline schema.
        "json_schema": _schema_of(spec.output.json_schema),
        "schema_via": spec.output.schema_via,
    }, default=str))


def _schema_of(schema: Any) -> Any:
    if isinstance(schema, Path):
        try:
            return json.loads(schema.read_text(encoding="utf-8-sig"))  # as batch.replies.schema reads it
        except (OSError, ValueError):  # the preflight reports a missing or bad file; compare what can be read
            return str(schema)
    return schema


def compare_fingerprint(folder: Location, current: dict[str, Any], job_file: Path) -> None:
    """Refuse a resume whose settings (`current`: fingerprint()) differ from the ones the checkpoint in `folder` was
    made with."""
    stored = stored_fingerprint(folder / FINGERPRINT_NAME)
    if stored is None:
        return
    changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if changed:
        details = "; ".join(f"{k}: {_short(stored.get(k))} -> {_short(current.get(k))}" for k in changed)
        raise ConfigError(
            f"{job_file}: the checkpoint in {folder} was made with other settings ({details}); "
            f"run again with {option('force')} to resume anyway, or change output.path to start afresh"
        )


def check_fingerprint(folder: Location, current: dict[str, Any], job_file: Path, force: bool) -> None:
    """Store the fingerprint `current` on the first run; refuse a resume whose fingerprint differs, unless forced.

    The preflight compared it already; comparing again under the lock catches a run that stored one since.
    """
    path = folder / FINGERPRINT_NAME
    if not force and stored_fingerprint(path) is not None:
        compare_fingerprint(folder, current, job_file)
        return
    write_text_at(path, json.dumps(current, ensure_ascii=False, indent=2) + "\n")


def stored_fingerprint(path: Location) -> dict[str, Any] | None:
    """The fingerprint a checkpoint was made with (None before its first run). A damaged one is an error, not "no
    fingerprint": taken as absent, it would let a changed job mix its answers with the old ones unasked."""
    try:
        text = read_text_at(path)
        if text is None:
            return None
        stored = json.loads(text)
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc).splitlines()[0]
        raise ConfigError(f"{path} is damaged ({reason}): if the job's model, params, prompt and input are the "
                          f"ones the checkpoint was made with, run with {option('force')} to write it again; "
                          "otherwise change output.path to start afresh") from None
    return stored


def mark_running(folder: Location) -> None:
    """Note this run in the checkpoint; end_run() removes the note once the run's summary is saved."""
    write_text_at(folder / RUN_NAME, json.dumps({"pid": os.getpid(), "started_at": _now()}) + "\n")


def end_run(folder: Location, error: str | None = None, exit_code: int | None = None) -> None:
    """The run ended: with its summary saved (no error), or on an error the note now tells.
    Best effort: a folder that can no longer be written keeps the note as it was."""
    path = folder / RUN_NAME
    try:
        if error is None:
            delete_at(path)
        else:
            marked = read_run_mark(folder) or {}
            write_text_at(path, json.dumps({**marked, "ended_at": _now(), "exit_code": exit_code,
                                            "error": error}, ensure_ascii=False) + "\n")
    except OSError:
        pass


def read_run_mark(folder: Location) -> dict[str, Any] | None:
    """The note of a run that has not ended well ({} when unreadable), or None."""
    try:
        text = read_text_at(folder / RUN_NAME)
        if text is None:
            return None
        marked = json.loads(text)
    except (OSError, ValueError):
        return {}
    return marked if isinstance(marked, dict) else {}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
