"""The storage seam on an object store's bucket (S3, Google Cloud Storage, Azure Blob Storage): what the three share.

A `BucketStore` is the objects under `SCHEME://BUCKET/PREFIX`. It turns the seam's calls into a few primitives a
subclass sends through its library (s3fs, gcsfs, adlfs), each one request:
- `_put(name, body, condition)`: the whole object in one conditional write. `condition` is ABSENT for an exclusive
  create (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`, Azure `If-None-Match: *`), a version for a
  compare-and-swap (S3 `If-Match` on the ETag, GCS `ifGenerationMatch` on the generation, Azure `If-Match` on the
  ETag), or None for none. The store refuses a condition that does not hold (412, Azure's 409 for an existing
  blob): `_put` raises Refused, so two writers never both win.
- `_list(prefix)`, `_delete(name)`, `_open(name)`, `_cat(name)`, `_version_of(name)`.
A primitive raises Missing for a key with no object and NoBucket when the bucket is not there; whatever else it
raises goes through `_unavailable` (the library's own errors, which are not always OSErrors) to the seam's errors.

What `write` fills is spooled first (memory, then a temp file past SPOOL_IN_MEMORY) and sent once it is whole: a
`write` that raises sends nothing, and the version the store answers the write with is the one returned (reading it
back after would race another writer).
"""

from __future__ import annotations

import abc
import contextlib
import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO, cast

from batch.storage.base import (
    AlreadyExists,
    Entry,
    NotFound,
    PreconditionFailed,
    StorageError,
    Store,
    Unavailable,
    Unreachable,
    Write,
    check_folder,
    check_key,
    check_prefix,
    is_unreachable,
)

SPOOL_IN_MEMORY = 8 * 2**20
ABSENT = "*"  # the condition of an exclusive create: no object under the key


class Refused(Exception):
    """The store answered that the request's condition did not hold (S3's and GCS's 412, Azure's 409 or 412)."""


class Missing(Exception):
    """The store answered 404 for a key."""


class NoBucket(Exception):
    """The store answered that the bucket (an Azure container) does not exist."""


class BucketStore(Store):
    """Objects under `SCHEME://BUCKET/PREFIX`; a subclass sends the primitives (see the module's docstring)."""

    scheme = ""

    def __init__(self, url: str) -> None:
        bucket, _, prefix = url.removeprefix(f"{self.scheme}://").partition("/")
        if not bucket:
            raise ValueError(f"{url!r} names no bucket")
        self.bucket, self.prefix = bucket, prefix.strip("/")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}" if self.prefix else f"{self.scheme}://{self.bucket}"

    def where(self, key: str) -> str:
        return f"{self.scheme}://{self.bucket}/{self._name(key)}"

    def open_read(self, key: str) -> BinaryIO:
        with self._failures(key):
            return cast(BinaryIO, _Reading(key, self._open(self._name(key)), self._failures))

    def read_bytes(self, key: str) -> bytes:
        """The whole object in one GET: the bytes of one version, whatever is written meanwhile."""
        with self._failures(key):
            return self._cat(self._name(key))

    def create(self, key: str, write: Write) -> str:
        with _spooled(write) as body, self._failures(key):
            try:
                return self._put(self._name(key), body, ABSENT)
            except Refused:
                raise AlreadyExists(key) from None

    def replace(self, key: str, write: Write, if_version: str | None = None) -> str:
        with _spooled(write) as body, self._failures(key):
            try:
                return self._put(self._name(key), body, if_version)
            except (Refused, Missing):
                if if_version is None:
                    raise
                raise PreconditionFailed(key, if_version, self._version_of(self._name(key))) from None

    def list(self, prefix: str = "") -> list[Entry]:
        check_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        with self._failures(prefix):
            found = [Entry(name[len(base):], size, version) for name, size, version in self._list(base + prefix)
                     if name.startswith(base) and name != base and not name.endswith("/")]  # a console's "folder"
        return sorted(found)

    def delete(self, key: str) -> None:
        with self._failures(key), contextlib.suppress(Missing):
            self._delete(self._name(key))

    def clean_up(self, folder: str = "") -> int:
        with self._failures(folder or "."):
            return self._abort_unfinished((f"{self.prefix}/" if self.prefix else "") + check_folder(folder))

    def _name(self, key: str) -> str:
        """The object's name in the bucket."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- what a subclass sends ---------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _put(self, name: str, body: BinaryIO, condition: str | None) -> str:
        """`body` (seekable, at 0) as the object `name`, sent with `condition` (ABSENT, a version, or None); the
        version the store answers with. Refused when the condition does not hold."""

    @abc.abstractmethod
    def _list(self, prefix: str) -> Iterable[tuple[str, int, str]]:
        """Every object whose name starts with `prefix`: its name, size and version."""

    @abc.abstractmethod
    def _delete(self, name: str) -> None: ...

    @abc.abstractmethod
    def _open(self, name: str) -> Any:
        """A seekable binary file of the object, read in ranges."""

    @abc.abstractmethod
    def _cat(self, name: str) -> bytes: ...

    @abc.abstractmethod
    def _version_of(self, name: str) -> str | None:
        """The object's version now, None when there is none."""

    def _abort_unfinished(self, prefix: str) -> int:
        """Remove the uploads begun directly under `prefix` (not in folders below) and never completed; how many.
        None by default: an unfinished GCS resumable upload and Azure's uncommitted blocks are no object, bill
        nothing once they expire (a week on either) and cannot be listed by prefix as S3's can."""
        return 0

    def _unavailable(self, key: str, exc: Exception) -> StorageError | None:
        """The seam's error for a failure of the library's own (NotFound, Unavailable), or None to raise it as it is
        (a bug). An OSError that says nothing more is Unavailable already."""
        return None

    @contextlib.contextmanager
    def _failures(self, key: str) -> Iterator[None]:
        """What the store and the network say, as the seam's errors: a missing key NotFound, a missing bucket or
        anything else Unavailable (Unreachable when no call reached it)."""
        try:
            yield
        except (NotFound, AlreadyExists, PreconditionFailed, Unavailable):
            raise
        except Missing:
            raise NotFound(key) from None
        except NoBucket:
            raise Unavailable(key, "the bucket does not exist") from None
        except Refused:
            raise Unavailable(key, "a condition the call did not send was refused") from None
        except Exception as exc:
            if is_unreachable(exc):
                raise Unreachable(key, reason(exc)) from None
            translated = self._unavailable(key, exc)
            if translated is not None:
                raise translated from None
            if isinstance(exc, OSError):
                raise Unavailable(key, reason(exc), exc.errno or 0) from None
            raise



class _Reading(io.RawIOBase):
    """A library's file whose failures are the seam's (an object replaced or deleted since the open is NotFound)."""

    def __init__(self, key: str, file: Any, failures: Any) -> None:
        self._key, self._file, self._failures = key, file, failures

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with self._failures(self._key):
            data = self._file.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._file.seek(offset, whence))

    def tell(self) -> int:
        return int(self._file.tell())

    def close(self) -> None:
        self._file.close()
        super().close()


@contextlib.contextmanager
def _spooled(write: Write) -> Iterator[BinaryIO]:
    """What `write` fills, whole, as a file to send (in memory up to SPOOL_IN_MEMORY, then on local disk), at 0."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, prefix="batch-upload-") as spool:
        write(cast(BinaryIO, spool))
        spool.seek(0)
        yield cast(BinaryIO, spool)


def environment(*prefixes: str) -> tuple[tuple[str, str], ...]:
    """The environment's variables a store's library reads (by name prefix), as a key for one filesystem per
    environment: a client costs time to make, and a changed environment (a test's, credentials switched) gets its
    own."""
    return tuple(sorted((name, value) for name, value in os.environ.items() if name.startswith(prefixes)))


def size_of(body: BinaryIO) -> int:
    """The size of a seekable body, left at 0."""
    size = body.seek(0, 2)
    body.seek(0)
    return size


def reason(exc: BaseException) -> str:
    """An error's first line, for a message."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
