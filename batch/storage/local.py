"""The storage seam on a local folder, as durable as batch's checkpoint has always been.

Every object is written to a temp file beside its key (`.NAME.RANDOM.tmp`: two writers never share one),
fsynced, then put in place in one step: `os.link` for `create` (which fails when the name exists, so two
creators cannot both win) or `os.replace` for `replace`; then the folder is fsynced so the new name
survives a power cut. A kill leaves at most a temp file, which `list` never shows.

A version is the file's inode, modification time in nanoseconds and size. Every write makes a new inode,
but a freed inode number is soon handed out again, and the kernel stamps files with a clock that moves
only every few milliseconds, so two quick writes of one size could look alike (the ABA a compare-and-swap
must not be fooled by). Each write therefore stamps its file with `time.time_ns()` before it is placed:
inode, stamp and size together do not repeat. A content hash would need every file read whole to list it.

A compare-and-swap (and every replace or delete, so none slips between its compare and its swap) holds an
flock on the key's folder; readers and `create` take none.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

import pyarrow as pa

from batch.storage.atomic import fsync_dir
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
    is_temporary,
)


class LocalStore(Store):
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def where(self, key: str) -> str:
        return str(self._path(key))

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        with _failures(key):
            # A native file: pyarrow reads a Parquet footer and its columns without a call back into Python.
            return cast(BinaryIO, pa.OSFile(str(path), "r"))

    def create(self, key: str, write: Write) -> str:
        path = self._path(key)
        with self._placing(path, key, write) as (tmp, version):
            with _failures(key):
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise AlreadyExists(key) from None
        return version

    def replace(self, key: str, write: Write, if_version: str | None = None) -> str:
        path = self._path(key)
        with self._placing(path, key, write) as (tmp, version), _failures(key), _folder_locked(path.parent):
            if if_version is not None:
                found = _version_of(path)
                if found != if_version:
                    raise PreconditionFailed(key, if_version, found)
            os.replace(tmp, path)
        return version

    def list(self, prefix: str = "") -> list[Entry]:
        check_prefix(prefix)
        folder, _, start = prefix.rpartition("/")
        base = self.root / folder if folder else self.root
        found: list[Entry] = []
        with _failures(prefix):
            try:
                entries = list(os.scandir(base))
            except (FileNotFoundError, NotADirectoryError):
                return []
            for entry in entries:
                if entry.name.startswith(start):
                    _collect(entry, f"{folder}/{entry.name}" if folder else entry.name, found)
        return sorted(found)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _failures(key), contextlib.suppress(FileNotFoundError):  # no object (nor its folder): nothing to do
            with _folder_locked(path.parent):
                path.unlink()
                fsync_dir(path.parent)

    def clean_up(self, folder: str = "") -> int:
        base = self.root / check_folder(folder) if folder else self.root
        removed = 0
        with _failures(folder or "."):
            try:
                entries = list(os.scandir(base))
            except (FileNotFoundError, NotADirectoryError):
                return 0
            for entry in entries:
                if is_temporary(entry.name) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        return removed

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextlib.contextmanager
    def _placing(self, path: Path, key: str, write: Write) -> Iterator[tuple[Path, str]]:
        """A temp file beside `path` filled by `write`, fsynced and stamped, with its version; the body puts it in
        place. The temp file is gone afterwards whatever happened; the folder is fsynced when the body succeeded.
        What `write` raises is raised as it was (an OSError from the disk under it included)."""
        with _failures(key):
            _make_folder(path.parent)
            sink = open(path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp"), "wb")
        tmp = Path(sink.name)
        try:
            with sink:
                write(sink)
                with _failures(key):
                    sink.flush()
                    stamp = time.time_ns()
                    os.utime(sink.fileno(), ns=(stamp, stamp))
                    os.fsync(sink.fileno())
                    version = _version(os.fstat(sink.fileno()))
            yield tmp, version
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        with _failures(key):
            fsync_dir(path.parent)


def _version(stat: os.stat_result) -> str:
    return f"{stat.st_ino:x}-{stat.st_mtime_ns:x}-{stat.st_size:x}"


def _version_of(path: Path) -> str | None:
    try:
        return _version(path.stat())
    except FileNotFoundError:
        return None


def _collect(entry: os.DirEntry[str], key: str, found: list[Entry]) -> None:
    """The objects at `entry` (a file, or a folder walked down) into `found`; temp files and what vanished skipped."""
    if is_temporary(entry.name):
        return
    try:
        if entry.is_dir(follow_symlinks=False):
            for inner in os.scandir(entry.path):
                _collect(inner, f"{key}/{inner.name}", found)
            return
        stat = entry.stat()
    except FileNotFoundError:  # deleted while listed
        return
    found.append(Entry(key, stat.st_size, _version(stat)))


def _make_folder(folder: Path) -> None:
    """`folder` and the folders above it that are missing, each made durable in its parent."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(exist_ok=True)
        fsync_dir(made.parent)


@contextlib.contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the flock


@contextlib.contextmanager
def _failures(key: str) -> Iterator[None]:
    """The OS's errors as the seam's: a missing file NotFound, anything else Unavailable (keeping errno and text)."""
    try:
        yield
    except (NotFound, AlreadyExists, PreconditionFailed, Unavailable):
        raise
    except FileNotFoundError:
        raise NotFound(key) from None
    except OSError as exc:
        raise Unavailable(key, exc.strerror or str(exc), exc.errno or 0) from None

