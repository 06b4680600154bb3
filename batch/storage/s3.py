"""The storage seam on S3 (and stores that speak its API: MinIO, R2, moto), through s3fs. Imported only for an
s3:// URL (batch.storage.urls), so a local job never loads s3fs.

Every write is one conditional request, so two writers never both win: `create` sends `If-None-Match: *` (S3
refuses with 412 when the key has an object), `replace(if_version=...)` sends `If-Match: ETAG`. pyarrow's own S3
filesystem cannot send either (apache/arrow#44281), which is why parts go through s3fs.

The version is the object's ETag, which S3 makes from the bytes (an MD5, or an MD5 of the parts' MD5s): the same
bytes written again show the same version, so a compare-and-swap holding it compares contents. That is all a
read-modify-write needs (the object holds what the caller read); every object batch swaps (a lease) holds a time.

What `write` fills is spooled first (memory, then a temp file past SPOOL_IN_MEMORY) and sent once it is whole: a
`write` that raises sends nothing, and the ETag S3 answers the write with is the version returned (reading it
back after would race another writer). An object past `multipart_above` goes up in parts, the condition on the
request that completes it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

from s3fs import S3FileSystem
from s3fs.utils import FileExpired

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

SPOOL_IN_MEMORY = 8 * 2**20
MULTIPART_ABOVE = 64 * 2**20  # bytes sent in one PUT at most (S3 allows 5 GiB; memory is the limit here)
PART_SIZE = 16 * 2**20  # S3 takes parts of 5 MiB to 5 GiB, at most 10,000 of them: 160 GiB at this size
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412"}


class S3Store(Store):
    """Objects under `s3://BUCKET/PREFIX`. `fs` is an s3fs filesystem (by default one with the environment's
    credentials and endpoint: AWS_* variables, profiles, an instance role)."""

    versions_name_bytes = True  # the ETag

    def __init__(self, url: str, fs: S3FileSystem | None = None, *, multipart_above: int = MULTIPART_ABOVE,
                 part_size: int = PART_SIZE) -> None:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"{url!r} names no bucket")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.fs = fs if fs is not None else default_filesystem()
        self.multipart_above, self.part_size = multipart_above, part_size

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def open_read(self, key: str) -> BinaryIO:
        with _failures(key):
            # Seekable, reading ranges as asked; s3fs sends If-Match with the ETag it found at open, so an object
            # replaced while it is read fails the read (NotFound) instead of mixing two versions.
            return cast(BinaryIO, _Reading(key, self.fs.open(f"{self.bucket}/{self._key(key)}", "rb")))

    def read_bytes(self, key: str) -> bytes:
        """The whole object in one GET: the bytes of one version, whatever is written meanwhile."""
        with _failures(key):
            return cast(bytes, self.fs.cat_file(f"{self.bucket}/{self._key(key)}"))

    def create(self, key: str, write: Write) -> str:
        with _spooled(write) as body, _failures(key):
            try:
                return self._put(key, body, {"IfNoneMatch": "*"})
            except _Refused:
                raise AlreadyExists(key) from None

    def replace(self, key: str, write: Write, if_version: str | None = None) -> str:
        with _spooled(write) as body, _failures(key):
            try:
                return self._put(key, body, {} if if_version is None else {"IfMatch": if_version})
            except (_Refused, _Missing):
                assert if_version is not None
                raise PreconditionFailed(key, if_version, self._version_of(key)) from None

    def list(self, prefix: str = "") -> list[Entry]:
        check_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        found: list[Entry] = []
        token: dict[str, str] = {}
        with _failures(prefix):
            while True:
                page = self._call("list_objects_v2", Bucket=self.bucket, Prefix=base + prefix, **token)
                for item in page.get("Contents", []):
                    key = item["Key"][len(base):]
                    if key and not key.endswith("/"):  # a "folder" a console made is no object of ours
                        found.append(Entry(key, item["Size"], item["ETag"]))
                if not page.get("IsTruncated"):
                    return sorted(found)
                token = {"ContinuationToken": page["NextContinuationToken"]}

    def clean_up(self, folder: str = "") -> int:
        """Abort the multipart uploads begun directly in `folder` and never completed (a writer killed while it sent
        an object past multipart_above): S3 keeps, and bills, their parts until they are aborted."""
        base = (f"{self.prefix}/" if self.prefix else "") + check_folder(folder)
        removed = 0
        marker: dict[str, str] = {}
        with _failures(folder or "."):
            while True:
                page = self._call("list_multipart_uploads", Bucket=self.bucket, Prefix=base, **marker)
                for upload in page.get("Uploads", []):
                    if "/" in upload["Key"][len(base):]:  # in a folder below: not this folder's
                        continue
                    with contextlib.suppress(_Missing):
                        self._call("abort_multipart_upload", Bucket=self.bucket, Key=upload["Key"],
                                   UploadId=upload["UploadId"])
                        removed += 1
                if not page.get("IsTruncated"):
                    return removed
                marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def delete(self, key: str) -> None:
        with _failures(key):
            self._call("delete_object", Bucket=self.bucket, Key=self._key(key))

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _version_of(self, key: str) -> str | None:
        try:
            return str(self._call("head_object", Bucket=self.bucket, Key=self._key(key))["ETag"])
        except _Missing:
            return None

    def _put(self, key: str, body: BinaryIO, condition: dict[str, str]) -> str:
        """`body` under `key` in one PUT, or in parts past multipart_above, sent with `condition`; its ETag."""
        where = {"Bucket": self.bucket, "Key": self._key(key)}
        size = body.seek(0, 2)
        body.seek(0)
        if size <= self.multipart_above:
            return str(self._call("put_object", Body=body.read(), **where, **condition)["ETag"])
        upload = self._call("create_multipart_upload", **where)["UploadId"]
        try:
            parts = []
            while chunk := body.read(self.part_size):
                sent = self._call("upload_part", PartNumber=len(parts) + 1, UploadId=upload, Body=chunk, **where)
                parts.append({"PartNumber": len(parts) + 1, "ETag": sent["ETag"]})
            done = self._call("complete_multipart_upload", UploadId=upload, MultipartUpload={"Parts": parts},
                              **where, **condition)
            return str(done["ETag"])
        except BaseException:
            with contextlib.suppress(Exception):  # the first failure is the one to tell; S3 expires what is left
                self._call("abort_multipart_upload", UploadId=upload, **where)
            raise

    def _call(self, method: str, **kwargs: Any) -> Any:
        """One S3 call through s3fs (its session, retries of throttling and dropped connections); a refused
        condition raises _Refused, a missing key _Missing, whatever else went wrong an OSError."""
        try:
            return self.fs.call_s3(method, **kwargs)
        except OSError as exc:
            code = _error_code(exc)
            if code in _PRECONDITION:
                raise _Refused from None
            if code in _NOT_FOUND or (code is None and isinstance(exc, FileNotFoundError)):
                raise _Missing from None
            raise


class _Reading(io.RawIOBase):
    """An s3fs file whose failures are the seam's (an object replaced or deleted since the open is NotFound)."""

    def __init__(self, key: str, file: Any) -> None:
        self._key, self._file = key, file

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with _failures(self._key):
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


class _Refused(Exception):
    """S3 answered 412: the request's condition did not hold."""


class _Missing(Exception):
    """S3 answered 404 for a key."""


def default_filesystem() -> S3FileSystem:
    """An s3fs filesystem with what the environment says (credentials, region, AWS_ENDPOINT_URL...): never anything
    from a job file. One per environment: a client costs a second to make, and a changed environment (a test's, a
    profile switched) gets its own."""
    settings = tuple(sorted((name, value) for name, value in os.environ.items() if name.startswith("AWS_")))
    return _filesystem_for(settings)


@functools.lru_cache(maxsize=8)
def _filesystem_for(settings: tuple[tuple[str, str], ...]) -> S3FileSystem:
    return S3FileSystem(skip_instance_cache=True)


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code (NoSuchKey, PreconditionFailed, ...) behind an error s3fs translated, if it came from S3."""
    cause = exc.__cause__
    response = getattr(cause, "response", None)
    if not isinstance(response, dict):
        return None
    error = response.get("Error", {})
    return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "") or None


@contextlib.contextmanager
def _spooled(write: Write) -> Iterator[BinaryIO]:
    """What `write` fills, whole, as a file to send (in memory up to SPOOL_IN_MEMORY, then on local disk)."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, prefix="batch-upload-") as spool:
        write(cast(BinaryIO, spool))
        yield cast(BinaryIO, spool)


@contextlib.contextmanager
def _failures(key: str) -> Iterator[None]:
    """What S3 and the network say, as the seam's errors: a missing key NotFound, anything else Unavailable."""
    try:
        yield
    except (NotFound, AlreadyExists, PreconditionFailed, Unavailable):
        raise
    except _Missing:
        raise NotFound(key) from None
    except FileExpired:
        raise NotFound(key) from None
    except FileNotFoundError as exc:  # s3fs's open: the key, or its bucket
        if _error_code(exc) == "NoSuchBucket":
            raise Unavailable(key, "the bucket does not exist") from None
        raise NotFound(key) from None
    except _Refused:
        raise Unavailable(key, "a condition the call did not send was refused") from None
    except OSError as exc:
        raise Unavailable(key, _reason(exc), exc.errno or 0) from None
    except Exception as exc:  # botocore's own (no credentials, a bad endpoint) are not OSErrors
        if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp"):
            raise Unavailable(key, _reason(exc)) from None
        raise


def _reason(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
