"""The storage seam: whole objects on string keys under a root, in the terms an object store offers.

Five calls, nothing a bucket cannot do: `open_read` (seekable, for Parquet footers), `create` (exclusive:
S3's `If-None-Match: *`, s3fs mode "xb"), `replace` (a whole object, optionally a compare-and-swap on the
version the caller read: S3's `If-Match` on the ETag), `list` (by key prefix, recursive, as S3 lists
without a delimiter) and `delete`. There is no rename, no append and no mtime: an object store has none of
them, so code above the seam that needs them cannot move to one.

A key is "/"-separated segments ("part-000001.parquet", "batches/file-000001.jsonl"); a key's folders are
never keys themselves (a local folder cannot also be a file). `write` arguments are callables handed a
binary file to fill (pyarrow's writers stream into it); the object appears whole when the call returns, or
not at all when `write` raises (the exception is raised as it was).

The errors are OSErrors, so code that already handles a failing disk handles a failing store the same way.
"""

from __future__ import annotations

import abc
import errno
import json
import socket
from collections.abc import Callable
from typing import Any, BinaryIO, ClassVar, NamedTuple


class StorageError(OSError):
    """A store call that did not do what was asked; `filename` is the key."""

    def __init__(self, key: str, reason: str, code: int = 0) -> None:
        super().__init__(code, reason, key)
        self.key = key

    def __str__(self) -> str:
        return f"{self.key}: {self.strerror}"


class NotFound(StorageError, FileNotFoundError):
    """No object has this key."""

    def __init__(self, key: str) -> None:
        super().__init__(key, "no such object", errno.ENOENT)


class AlreadyExists(StorageError, FileExistsError):
    """`create` found an object under the key already: nothing was written."""

    def __init__(self, key: str) -> None:
        super().__init__(key, "an object with this key exists already", errno.EEXIST)


class PreconditionFailed(StorageError):
    """`replace(if_version=...)` found another version (or none) under the key: nothing was written."""

    def __init__(self, key: str, expected: str, found: str | None) -> None:
        super().__init__(key, f"the object is at version {found or '(none)'}, not {expected}")
        self.expected, self.found = expected, found


class Unavailable(StorageError):
    """The store could not do the call (a full or read-only disk, a network error): whether a write took effect
    is unknown to the caller until it reads again (an object store's reply can be lost after the write)."""


class Unreachable(Unavailable):
    """The store did not answer at all (a connection refused, reset or timed out; its name not resolved): no call
    reached it, and the same call may succeed once it answers again."""


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from or while handling, is the network failing to reach a server:
    what every storage library here wraps in its own errors (botocore's EndpointConnectionError, azure-core's
    ServiceRequestError, aiohttp's ClientConnectorError) keeps the socket's error in its chain."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ConnectionError | TimeoutError | socket.gaierror):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def marker_object(data: bytes) -> dict[str, Any]:
    """The JSON object a marker batch writes holds (a lease, a shard's _SUCCESS, a checkpoint's layout); ValueError
    when `data` is none: not UTF-8, not JSON, nested past the parser's depth (a RecursionError, which is no
    ValueError), or JSON of another kind. Whatever a damaged or foreign object holds, its reader gets one error to
    take it as damaged by."""
    try:
        found = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deep") from None
    if not isinstance(found, dict):
        raise ValueError(f"a JSON {type(found).__name__}, not an object")
    return found


class Entry(NamedTuple):
    """An object as `list` finds it: its whole key, its size in bytes and its version."""

    key: str
    size: int
    version: str


Write = Callable[[BinaryIO], object]


class Store(abc.ABC):
    """Objects on string keys under one root. Every implementation passes tests/storage/test_store.py."""

    # Whether a version names the bytes (S3's ETag: the same bytes written again show the same version) rather than
    # one write (a local file's inode and stamp, a counter). Either way a compare-and-swap holding a version succeeds
    # only while the object holds the bytes that were read, which is all a read-modify-write needs.
    versions_name_bytes: ClassVar[bool] = False

    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """The object, as a seekable binary file (an io.IOBase, which io.TextIOWrapper and the openai SDK take) to
        read and close (NotFound when there is none)."""

    @abc.abstractmethod
    def create(self, key: str, write: Write) -> str:
        """A new object filled by `write`, only if none has the key (else AlreadyExists); returns its version."""

    @abc.abstractmethod
    def replace(self, key: str, write: Write, if_version: str | None = None) -> str:
        """The object filled by `write`, whatever was under the key; with `if_version`, only if the object there is
        at that version now (else PreconditionFailed: a compare-and-swap). Returns the new version, which differs
        from every earlier version of the key (of other bytes, where versions_name_bytes)."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[Entry]:
        """Every object whose key starts with `prefix` (a string prefix, not a folder), in key order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object. A key with no object is no error: S3's DeleteObject cannot tell, and a cleanup
        cut short by a kill is done again."""

    @abc.abstractmethod
    def clean_up(self, folder: str = "") -> int:
        """Remove what writers killed mid-write left directly in `folder` ("" the root, else a prefix ending in
        "/"; not in folders below it), never an object: a local store's temp files, an object store's multipart
        uploads never completed. Returns how many. Only the one writer of the folder's keys calls it (a run holding
        the checkpoint's lock or lease): a write of another still in progress would fail."""

    @abc.abstractmethod
    def where(self, key: str) -> str:
        """The object as a person finds it (a path, a URL), for messages."""

    def read_bytes(self, key: str) -> bytes:
        with self.open_read(key) as stream:
            return stream.read()


def check_key(key: str) -> str:
    """`key` if it is one (see the module's docstring); a ValueError naming it if not: a bug, not a user's error."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"a storage key must be a non-empty string, not {key!r}")
    _check_segments(key, key.split("/"))
    return key


def check_prefix(prefix: str) -> str:
    """`prefix` if keys can start with it ("" lists every key)."""
    if not isinstance(prefix, str):
        raise ValueError(f"a storage prefix must be a string, not {prefix!r}")
    if prefix:
        _check_segments(prefix, prefix.split("/")[:-1] or [""], last_may_be_empty=True)
    return prefix


def check_folder(folder: str) -> str:
    """`folder` if it names one: "" (the root) or a prefix of whole segments ending in "/"."""
    check_prefix(folder)
    if folder and not folder.endswith("/"):
        raise ValueError(f"a storage folder ends in '/': {folder!r}")
    return folder


def is_temporary(name: str) -> bool:
    """Whether a file name is one a store writes before the object is whole (never a key's segment)."""
    return name.startswith(".") and name.endswith(".tmp")


def _check_segments(text: str, segments: list[str], last_may_be_empty: bool = False) -> None:
    for at, segment in enumerate(segments):
        if not segment and last_may_be_empty and at == len(segments) - 1:
            continue
        if segment in ("", ".", "..") or "\0" in segment or is_temporary(segment):
            raise ValueError(f"{text!r} is not a storage key: a segment is empty, '.', '..', holds NUL, or is "
                             "named like a store's temp file (.NAME.tmp)")
