"""The storage seam on Azure Blob Storage, through adlfs and azure-storage-blob (`pip install 'batch[azure]'`).
Imported only for an az:// URL (batch.storage.locations), so no other job loads them. `az://CONTAINER/PREFIX`:
the container is the bucket.

Every write is one conditional request (batch.storage.bucket) on the blob's ETag, which Azure changes on every write
(versions_name_bytes is False): `create` is adlfs's and the SDK's `overwrite=False`, sent as `If-None-Match: *`
(Azure refuses with 409 BlobAlreadyExists when the blob exists), `replace(if_version=...)` sends `If-Match: ETAG`
(412 ConditionNotMet otherwise). A blob past the SDK's single-put size goes up in blocks, the condition on the
request that commits them.

Credentials come from adlfs's ordinary environment (AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_NAME
with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, a service principal's AZURE_STORAGE_CLIENT_ID,
_SECRET and _TENANT_ID), never from a job file.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, BinaryIO

from adlfs import AzureBlobFileSystem
from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from fsspec.asyn import sync

from batch.storage.base import StorageError, Unavailable
from batch.storage.bucket import ABSENT, BucketStore, Missing, NoBucket, Refused, environment, reason, size_of


class AzureStore(BucketStore):
    """Blobs under `az://CONTAINER/PREFIX`. `fs` is an adlfs filesystem (by default one made from the environment)."""

    scheme = "az"

    def __init__(self, url: str, fs: AzureBlobFileSystem | None = None) -> None:
        super().__init__(url)
        self.fs = fs if fs is not None else default_filesystem()

    def _open(self, name: str) -> Any:
        return self._call(lambda: self.fs.open(f"{self.bucket}/{name}", "rb"))

    def _cat(self, name: str) -> bytes:
        return bytes(self._run(lambda: self._blob(name).download_blob(), lambda stream: stream.readall()))

    def _list(self, prefix: str) -> Iterator[tuple[str, int, str]]:
        async def listed() -> list[tuple[str, int, str]]:
            container = self.fs.service_client.get_container_client(self.bucket)
            return [(blob.name, int(blob.size), _quoted(blob.etag))
                    async for blob in container.list_blobs(name_starts_with=prefix)]

        return iter(self._call(lambda: sync(self.fs.loop, listed)))

    def _delete(self, name: str) -> None:
        self._run(lambda: self._blob(name).delete_blob())

    def _version_of(self, name: str) -> str | None:
        try:
            return _quoted(self._run(lambda: self._blob(name).get_blob_properties()).etag)
        except Missing:
            return None

    def _put(self, name: str, body: BinaryIO, condition: str | None) -> str:
        """`body` as the blob `name`, sent with `condition` on its ETag; the ETag Azure gave it."""
        if condition == ABSENT:
            sent_with: dict[str, Any] = {"overwrite": False}
        elif condition is None:
            sent_with = {"overwrite": True}
        else:
            sent_with = {"overwrite": True, "etag": condition, "match_condition": MatchConditions.IfNotModified}
        made = self._run(lambda: self._blob(name).upload_blob(body, length=size_of(body), **sent_with))
        return _quoted(made["etag"])

    def _blob(self, name: str) -> Any:
        return self.fs.service_client.get_blob_client(self.bucket, name)

    def _run(self, call: Any, then: Any = None) -> Any:
        """One SDK call (a coroutine the adlfs client makes), on adlfs's loop; `then` awaits what it gives, if it
        gives something to await (a download's stream)."""
        async def run() -> Any:
            got = await call()
            if then is None:
                return got
            result = then(got)
            return await result if hasattr(result, "__await__") else result

        return self._call(lambda: sync(self.fs.loop, run))

    def _call(self, call: Any) -> Any:
        """Azure's answers as the seam's signals: a refused condition Refused, a missing blob Missing, a missing
        container NoBucket (adlfs says FileNotFoundError for both: the container is asked then)."""
        try:
            return call()
        except (ResourceExistsError, ResourceModifiedError):
            raise Refused from None
        except ResourceNotFoundError as exc:
            raise NoBucket if exc.error_code == "ContainerNotFound" else Missing from None
        except FileNotFoundError:
            if not self._container_exists():
                raise NoBucket from None
            raise Missing from None

    def _container_exists(self) -> bool:
        return bool(sync(self.fs.loop, self.fs.service_client.get_container_client(self.bucket).exists))

    def _unavailable(self, key: str, exc: Exception) -> StorageError | None:
        # the SDK's errors (no credentials, a refused connection) are not OSErrors
        if isinstance(exc, AzureError) or type(exc).__module__.split(".")[0] == "aiohttp":
            return Unavailable(key, reason(exc))
        return None


def _quoted(etag: str) -> str:
    """An ETag as one version whoever gave it: Azure quotes it in a write's answer and a blob's properties, not in a
    listing."""
    return f'"{str(etag).strip(chr(34))}"'


def default_filesystem() -> AzureBlobFileSystem:
    """An adlfs filesystem with what the environment says (AZURE_STORAGE_* variables), never anything from a job
    file; one per environment."""
    return _filesystem_for(environment("AZURE_"))


@functools.lru_cache(maxsize=8)
def _filesystem_for(settings: tuple[tuple[str, str], ...]) -> AzureBlobFileSystem:
    try:
        return AzureBlobFileSystem(skip_instance_cache=True)
    except ValueError as exc:  # adlfs: "unable to connect to account for Must provide either a connection_string..."
        said = reason(exc).removeprefix("unable to connect to account for ").rstrip("!.")
        raise ValueError(f"no usable Azure credentials in the environment ({said}): set "
                         "AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with a key, a SAS token or a "
                         "service principal") from None
