"""The storage seam on Google Cloud Storage, through gcsfs (`pip install 'batch[gcs]'`). Imported only for a gs://
URL (batch.storage.locations), so no other job loads gcsfs.

Every write is one conditional request (batch.storage.bucket) on the object's generation, a number GCS gives each
write of a key and never gives again: `create` sends `ifGenerationMatch=0` (GCS refuses with 412 when the key has
an object), `replace(if_version=...)` sends `ifGenerationMatch=GENERATION`. The version is the generation, so it
names one write, not the bytes (versions_name_bytes is False). gcsfs sends `ifGenerationMatch=0` for its own
exclusive mode but no other generation, so the upload is built here and sent through gcsfs's session (its
credentials, retries): a multipart upload (metadata and bytes in one request) up to `resumable_above`, past it a
resumable upload in chunks, the condition on the request that starts it (GCS checks it when the object is made).

Credentials come from gcsfs's ordinary environment (GOOGLE_APPLICATION_CREDENTIALS, gcloud's, the metadata
server); STORAGE_EMULATOR_HOST points it at an emulator, which takes no credentials.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import quote

# gcsfs.core's filesystem, not the package's default: that one (ExtendedGcsFileSystem) first asks each bucket's type
# of the storage control API over gRPC, for zonal buckets batch does not write to, and an emulator has no such API
# (it waits out a minute per bucket). Everything here is the JSON API's.
from gcsfs.core import GCSFileSystem, upload_chunk
from gcsfs.retry import HttpError

from batch.storage.base import StorageError, Unavailable
from batch.storage.bucket import ABSENT, BucketStore, Missing, NoBucket, Refused, environment, reason, size_of

RESUMABLE_ABOVE = 64 * 2**20  # bytes sent in one request at most (it is held in memory to send)
CHUNK_SIZE = 16 * 2**20  # a resumable upload's chunks: a multiple of 256 KiB, as GCS asks
_BOUNDARY = "batch-object-boundary"


class GCSStore(BucketStore):
    """Objects under `gs://BUCKET/PREFIX`. `fs` is a gcsfs filesystem (by default one made from the environment)."""

    scheme = "gs"

    def __init__(self, url: str, fs: GCSFileSystem | None = None, *, resumable_above: int = RESUMABLE_ABOVE,
                 chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__(url)
        self.fs = fs if fs is not None else default_filesystem()
        self.resumable_above, self.chunk_size = resumable_above, chunk_size

    def _open(self, name: str) -> Any:
        # gcsfs pins the generation it found at open, so an object replaced while it is read fails the read
        # (NotFound) instead of mixing two versions.
        return self._object_call(lambda: self.fs.open(f"{self.bucket}/{name}", "rb"))

    def _cat(self, name: str) -> bytes:
        return bytes(self._object_call(lambda: self.fs.cat_file(f"{self.bucket}/{name}")))

    def _list(self, prefix: str) -> Iterator[tuple[str, int, str]]:
        token: dict[str, str] = {}
        while True:
            page = self._call("GET", "b/{}/o", self.bucket, prefix=prefix, json_out=True, **token)
            for item in page.get("items", []):
                yield item["name"], int(item["size"]), str(item["generation"])
            if not page.get("nextPageToken"):
                return
            token = {"pageToken": page["nextPageToken"]}

    def _delete(self, name: str) -> None:
        self._object_call(lambda: self.fs.call("DELETE", "b/{}/o/{}", self.bucket, name))

    def _version_of(self, name: str) -> str | None:
        try:
            found = self._object_call(lambda: self.fs.call("GET", "b/{}/o/{}", self.bucket, name, json_out=True))
        except Missing:
            return None
        return str(found["generation"])

    def _put(self, name: str, body: BinaryIO, condition: str | None) -> str:
        """`body` as the object `name`, sent with `condition` on its generation; the generation it was given."""
        generation = {} if condition is None else {"ifGenerationMatch": "0" if condition == ABSENT else condition}
        size = size_of(body)
        upload = f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o"
        if size <= self.resumable_above:
            metadata = json.dumps({"name": name}).encode()
            data = (f"--{_BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode() + metadata
                    + f"\r\n--{_BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n".encode() + body.read()
                    + f"\r\n--{_BOUNDARY}--".encode())
            made = self._call("POST", upload, uploadType="multipart", name=name, data=data, json_out=True,
                              headers={"Content-Type": f'multipart/related; boundary="{_BOUNDARY}"'}, **generation)
            return str(made["generation"])
        headers, _ = self._call("POST", upload, uploadType="resumable", name=name, json={"name": name},
                                headers={"X-Upload-Content-Type": "application/octet-stream"}, **generation)
        location = headers["Location"]
        try:
            made, offset = None, 0
            while chunk := body.read(self.chunk_size):
                made = self._run(upload_chunk(self.fs, location, chunk, offset, size, "application/octet-stream"))
                offset += len(chunk)
        except BaseException:
            try:  # the first failure is the one to tell; GCS drops an unfinished upload after a week
                self._run(self.fs._call("DELETE", location))
            except Exception:
                pass
            raise
        assert made is not None
        return str(made["generation"])

    def _object_call(self, call: Any) -> Any:
        """A call on one object: its 404 is Missing, or NoBucket when the bucket is what is missing."""
        try:
            return self._translated(call)
        except Missing:
            if not self._bucket_exists():
                raise NoBucket from None
            raise

    def _bucket_exists(self) -> bool:
        try:
            self._call("GET", "b/{}", self.bucket)
        except Missing:
            return False
        return True

    def _call(self, method: str, path: str, *args: str, **kwargs: Any) -> Any:
        """One request through gcsfs; a 404 on a bucket's path is NoBucket (listing, uploading)."""
        try:
            return self._translated(lambda: self.fs.call(method, path, *args, **kwargs))
        except Missing:
            if path in ("b/{}/o",) or path.startswith(self.fs._location):
                raise NoBucket from None
            raise

    def _run(self, coroutine: Any) -> Any:
        from fsspec.asyn import sync

        return self._translated(lambda: sync(self.fs.loop, lambda: coroutine))

    @staticmethod
    def _translated(call: Any) -> Any:
        """gcsfs's answers as the seam's signals: 412 (gcsfs's FileExistsError) Refused, 404 Missing."""
        try:
            return call()
        except FileExistsError:
            raise Refused from None
        except FileNotFoundError:
            raise Missing from None

    def _unavailable(self, key: str, exc: Exception) -> StorageError | None:
        # gcsfs's HTTP errors, google-auth's (no credentials) and aiohttp's (no connection) are not OSErrors
        if isinstance(exc, HttpError) or type(exc).__module__.split(".")[0] in ("google", "aiohttp", "requests"):
            return Unavailable(key, reason(exc))
        return None


def default_filesystem() -> GCSFileSystem:
    """A gcsfs filesystem with what the environment says, never anything from a job file; one per environment (a
    test's, a credentials file switched, gets its own)."""
    return _filesystem_for(environment("GOOGLE_", "GCLOUD_", "GCE_", "STORAGE_EMULATOR_HOST"))


@functools.lru_cache(maxsize=8)
def _filesystem_for(settings: tuple[tuple[str, str], ...]) -> GCSFileSystem:
    # An emulator takes no credentials (google-cloud-storage's own client goes anonymous for it too): looking for
    # some would ask the metadata server of a machine that is not on Google's cloud.
    emulated = dict(settings).get("STORAGE_EMULATOR_HOST")
    key_file = dict(settings).get("GOOGLE_APPLICATION_CREDENTIALS")
    if key_file and not emulated and not os.path.isfile(key_file):
        # gcsfs would go on to its other ways, the metadata server last, which off Google's cloud does not answer
        # (exit 75, after a minute): the mistake is the variable's
        raise ValueError(f"GOOGLE_APPLICATION_CREDENTIALS names {key_file}, which is not a file")
    return GCSFileSystem(skip_instance_cache=True, token="anon" if emulated else None)
