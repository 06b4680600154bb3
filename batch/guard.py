"""Guards around a checkpoint folder: one live run at a time, and no resume under changed settings."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO, Any

from batch.config import JobSpec
from batch.errors import ConfigError, LockedError

LOCK_NAME = "lock"
FINGERPRINT_NAME = "fingerprint.json"


class RunLock:
    """An flock on a file in the checkpoint folder: the kernel drops it when its holder dies, even by kill -9."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise LockedError(f"{self.path.parent}: another run of this job is alive (pid {holder}); "
                              "wait for it or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock; the file stays, harmless
            self._file = None

    def holder(self) -> int | None:
        """The pid of a live holder, or None."""
        if not self.path.exists():
            return None
        with open(self.path, "a+", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                text = handle.read().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None


def fingerprint(spec: JobSpec) -> dict[str, Any]:
    """What shapes the requests: a resume under different values would mix two jobs in one output."""
    return {
        "model": spec.model.name,
        "params": spec.model.params,
        "system": spec.prompt.system,
        "template": spec.prompt.template,
        "messages_column": spec.prompt.messages_column,
        "input": str(spec.input.path.resolve()),
        "id_column": spec.input.id_column,
    }


def compare_fingerprint(spec: JobSpec) -> None:
    """Refuse a resume whose settings differ from the ones the checkpoint was made with."""
    path = spec.checkpoint_dir / FINGERPRINT_NAME
    if not path.exists():
        return
    current = json.loads(json.dumps(fingerprint(spec), default=str))
    stored = json.loads(path.read_text(encoding="utf-8"))
    changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if changed:
        details = "; ".join(f"{k}: {_short(stored.get(k))} -> {_short(current.get(k))}" for k in changed)
        raise ConfigError(
            f"{spec.job_path}: the checkpoint in {spec.checkpoint_dir} was made with other settings ({details}); "
            "rerun with --force to resume anyway, or change output.path to start afresh"
        )


def check_fingerprint(spec: JobSpec, force: bool) -> None:
    """Store the fingerprint on the first run; refuse a resume whose fingerprint differs, unless forced.

    The preflight compared it already; comparing again under the lock catches a run that stored one since.
    """
    path = spec.checkpoint_dir / FINGERPRINT_NAME
    if path.exists() and not force:
        compare_fingerprint(spec)
        return
    current = json.loads(json.dumps(fingerprint(spec), default=str))
    spec.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(current, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
