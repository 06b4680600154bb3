"""The storage seam on S3 (and stores that speak its API: MinIO, R2, moto), through s3fs. Imported only for an
s3:// URL (batch.storage.locations), so a local job never loads s3fs.

Every write is one conditional request (batch.storage.bucket): `create` sends `If-None-Match: *` (S3 refuses with
412 when the key has an object), `replace(if_version=...)` sends `If-Match: ETAG`. pyarrow's own S3 filesystem
cannot send either (apache/arrow#44281), which is why parts go through s3fs.

The version is the object's ETag, which S3 makes from the bytes (an MD5, or an MD5 of the parts' MD5s): the same
bytes written again show the same version, so a compare-and-swap holding it compares contents. That is all a
read-modify-write needs (the object holds what the caller read); every object batch swaps (a lease) holds a time.

An object past `multipart_above` goes up in parts, the condition on the request that completes it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, BinaryIO

from s3fs import S3FileSystem
from s3fs.utils import FileExpired

from batch.storage.base import NotFound, StorageError, Unavailable
from batch.storage.bucket import ABSENT, BucketStore, Missing, NoBucket, Refused, environment, reason, size_of

MULTIPART_ABOVE = 64 * 2**20  # bytes sent in one PUT at most (S3 allows 5 GiB; memory is the limit here)
PART_SIZE = 16 * 2**20  # S3 takes parts of 5 MiB to 5 GiB, at most 10,000 of them: 160 GiB at this size
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412"}


class S3Store(BucketStore):
    """Objects under `s3://BUCKET/PREFIX`. `fs` is an s3fs filesystem (by default one with the environment's
    credentials and endpoint: AWS_* variables, profiles, an instance role)."""

    scheme = "s3"
    versions_name_bytes = True  # the ETag

    def __init__(self, url: str, fs: S3FileSystem | None = None, *, multipart_above: int = MULTIPART_ABOVE,
                 part_size: int = PART_SIZE) -> None:
        super().__init__(url)
        self.fs = fs if fs is not None else default_filesystem()
        self.multipart_above, self.part_size = multipart_above, part_size

    def _open(self, name: str) -> Any:
        # Seekable, reading ranges as asked; s3fs sends If-Match with the ETag it found at open, so an object
        # replaced while it is read fails the read (NotFound) instead of mixing two versions.
        return self.fs.open(f"{self.bucket}/{name}", "rb")

    def _cat(self, name: str) -> bytes:
        return bytes(self.fs.cat_file(f"{self.bucket}/{name}"))

    def _list(self, prefix: str) -> Iterator[tuple[str, int, str]]:
        token: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", Bucket=self.bucket, Prefix=prefix, **token)
            for item in page.get("Contents", []):
                yield item["Key"], item["Size"], item["ETag"]
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def _abort_unfinished(self, prefix: str) -> int:
        """Abort the multipart uploads begun directly under `prefix` and never completed (a writer killed while it
        sent an object past multipart_above): S3 keeps, and bills, their parts until they are aborted."""
        removed = 0
        marker: dict[str, str] = {}
        while True:
            page = self._call("list_multipart_uploads", Bucket=self.bucket, Prefix=prefix, **marker)
            for upload in page.get("Uploads", []):
                if "/" in upload["Key"][len(prefix):]:  # in a folder below: not this folder's
                    continue
                with contextlib.suppress(Missing):
                    self._call("abort_multipart_upload", Bucket=self.bucket, Key=upload["Key"],
                               UploadId=upload["UploadId"])
                    removed += 1
            if not page.get("IsTruncated"):
                return removed
            marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def _delete(self, name: str) -> None:
        self._call("delete_object", Bucket=self.bucket, Key=name)

    def _version_of(self, name: str) -> str | None:
        try:
            return str(self._call("head_object", Bucket=self.bucket, Key=name)["ETag"])
        except Missing:
            return None

    def _put(self, name: str, body: BinaryIO, condition: str | None) -> str:
        """`body` under `name` in one PUT, or in parts past multipart_above, sent with `condition`; its ETag."""
        where = {"Bucket": self.bucket, "Key": name}
        sent_with = {} if condition is None else {"IfNoneMatch": "*"} if condition == ABSENT else {"IfMatch": condition}
        if size_of(body) <= self.multipart_above:
            return str(self._call("put_object", Body=body.read(), **where, **sent_with)["ETag"])
        upload = self._call("create_multipart_upload", **where)["UploadId"]
        try:
            parts = []
            while chunk := body.read(self.part_size):
                sent = self._call("upload_part", PartNumber=len(parts) + 1, UploadId=upload, Body=chunk, **where)
                parts.append({"PartNumber": len(parts) + 1, "ETag": sent["ETag"]})
            done = self._call("complete_multipart_upload", UploadId=upload, MultipartUpload={"Parts": parts},
                              **where, **sent_with)
            return str(done["ETag"])
        except BaseException:
            with contextlib.suppress(Exception):  # the first failure is the one to tell; S3 expires what is left
                self._call("abort_multipart_upload", UploadId=upload, **where)
            raise

    def _call(self, method: str, **kwargs: Any) -> Any:
        """One S3 call through s3fs (its session, retries of throttling and dropped connections); a refused
        condition raises Refused, a missing key Missing, a missing bucket NoBucket, whatever else an OSError."""
        try:
            return self.fs.call_s3(method, **kwargs)
        except OSError as exc:
            code = _error_code(exc)
            if code in _PRECONDITION:
                raise Refused from None
            if code == "NoSuchBucket":
                raise NoBucket from None
            if code in _NOT_FOUND or (code is None and isinstance(exc, FileNotFoundError)):
                raise Missing from None
            raise

    def _unavailable(self, key: str, exc: Exception) -> StorageError | None:
        if isinstance(exc, FileExpired):  # replaced since the open
            return NotFound(key)
        if isinstance(exc, FileNotFoundError):  # s3fs's open: the key, or its bucket
            missing_bucket = _error_code(exc) == "NoSuchBucket"
            return Unavailable(key, "the bucket does not exist") if missing_bucket else NotFound(key)
        # botocore's own (no credentials, a bad endpoint) are not OSErrors
        if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp"):
            return Unavailable(key, reason(exc))
        return None


def default_filesystem() -> S3FileSystem:
    """An s3fs filesystem with what the environment says (credentials, region, AWS_ENDPOINT_URL...): never anything
    from a job file; one per environment (a client costs a second to make)."""
    return _filesystem_for(environment("AWS_"))


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
