"""The storage seam on Alibaba Cloud OSS, through oss2 (`pip install 'batch[oss]'`). Imported only for an oss:// URL
(batch.storage.locations), so no other job loads oss2.

An exclusive create is a PutObject (or the CompleteMultipartUpload of one past `multipart_above`) with
`x-oss-forbid-overwrite: true`: OSS refuses with 409 FileAlreadyExists when the key has an object
(https://www.alibabacloud.com/help/en/oss/developer-reference/putobject). Two things OSS does not give, and how
batch copes:
- OSS ignores that header in a bucket whose versioning is on (Enabled or Suspended, same page), so every write would
  silently overwrite: such a bucket is refused, in one line, at the first call (the preflight's listing).
- PutObject has no If-Match (nor does the current SDK, alibabacloud-oss-v2, offer one): no compare-and-swap, which
  the lease needs. It is built from exclusive creates: a key swapped once is kept as generations, objects named
  `KEY~swap~NNNNNNNNNNNN` (LATEST - N, so the newest is listed first) that are each written once, by an exclusive
  create, and never deleted while the key lives. A swap from generation N creates generation N + 1: of two swappers
  from N one wins, and a swapper holding an older generation finds N + 1 taken. A key never swapped is the plain
  object as any other store's. The key's object is its newest generation (or the plain one): every read, listing
  and version here says so, and no batch code sees a generation's name. A read finds the newest in one LIST of one
  object, however many there are; a listing of the folder lists them all. A swap racing an unconditional `replace`
  or a `delete` of the same key is not ordered by it (batch never does either to a key it swaps: the lease). A
  generation is ~100 bytes and the lease writes one per ttl/3 (8,640 a day at the default ttl): they go with the
  checkpoint folder.

Credentials and the endpoint come from the environment Alibaba's tools read: OSS_ACCESS_KEY_ID,
OSS_ACCESS_KEY_SECRET, OSS_SESSION_TOKEN (STS) and OSS_ENDPOINT (the region's, e.g.
https://oss-cn-hangzhou.aliyuncs.com), never from a job file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import re
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO, NamedTuple

import oss2
from oss2.exceptions import OssError, RequestError, ServerError
from ossfs import OSSFileSystem

from batch.storage.base import StorageError, Unavailable
from batch.storage.bucket import ABSENT, BucketStore, Missing, NoBucket, Refused, environment, reason, size_of

MULTIPART_ABOVE = 64 * 2**20  # bytes sent in one PutObject at most (OSS allows 5 GiB; memory is the limit here)
PART_SIZE = 16 * 2**20  # OSS takes parts of 100 KiB to 5 GiB, at most 10,000 of them
READ_WHOLE_UP_TO = 8 * 2**20  # an object read is fetched whole up to this size, in ranges past it
GENERATION = "~swap~"  # no key of batch's holds it (_name refuses one that does)
_GENERATION_NAME = re.compile(rf"(.+){re.escape(GENERATION)}(\d{{12}})")
# Generation N is named LATEST - N, so a key's newest generation comes first in a listing: one LIST of one object
# finds it, however many there are.
LATEST = 10**12 - 1
_GENERATION_VERSION = re.compile(r"\S+ \(generation (\d+)\)")
_FORBID_OVERWRITE = {"x-oss-forbid-overwrite": "true"}
_VERSIONING_CHECKED: set[tuple[str, str]] = set()  # (endpoint, bucket) found without versioning, once per process
_checking = threading.Lock()


class Credentials(NamedTuple):
    endpoint: str
    key_id: str
    secret: str
    token: str


class OSSStore(BucketStore):
    """Objects under `oss://BUCKET/PREFIX`. `bucket_client` is an oss2.Bucket (by default one made from the
    environment's endpoint and credentials)."""

    scheme = "oss"
    versions_name_bytes = True  # the ETag (of a plain object, or of the generation with its number)

    def __init__(self, url: str, bucket_client: oss2.Bucket | None = None, *, multipart_above: int = MULTIPART_ABOVE,
                 part_size: int = PART_SIZE, read_whole_up_to: int = READ_WHOLE_UP_TO) -> None:
        super().__init__(url)
        if not oss2.is_valid_bucket_name(self.bucket):
            raise ValueError(f"oss://{self.bucket}: not a bucket name OSS takes (3 to 63 lower-case letters, digits "
                             "and hyphens, a letter or digit first and last)")
        self.client = bucket_client if bucket_client is not None else _bucket_for(credentials(), self.bucket)
        self.multipart_above, self.part_size, self.read_whole_up_to = multipart_above, part_size, read_whole_up_to

    # -- the key's object: its newest generation, or the plain one ---------------------------------------------------

    def _current(self, name: str) -> tuple[str, str] | None:
        """The object that is `name` now (its newest generation, else the plain object) and its version; None when
        there is neither."""
        newest = self._newest_generation(name)
        if newest is not None:
            return newest
        try:
            return name, str(self._call(self.client.head_object, name).etag)
        except Missing:
            return None

    def _newest_generation(self, name: str) -> tuple[str, str] | None:
        page = self._call(self.client.list_objects_v2, prefix=name + GENERATION, max_keys=1)
        for item in page.object_list:
            if found := _GENERATION_NAME.fullmatch(item.key):
                return item.key, _generation_version(LATEST - int(found[2]), str(item.etag))
        return None

    def _now_named(self, name: str) -> str:
        """The object that is `name` now: its newest generation, else the plain object (which may be missing)."""
        newest = self._newest_generation(name)
        return newest[0] if newest else name

    def _list(self, prefix: str) -> Iterator[tuple[str, int, str]]:
        """Each key's object as its newest generation says (in name order, a plain object comes before its
        generations, the newest generation first). A key is listed if its own name starts with `prefix`."""
        keys: dict[str, tuple[int, str]] = {}
        swapped: set[str] = set()  # the keys whose newest generation was listed
        for physical, size, version in self._physical(prefix):
            if generation := _GENERATION_NAME.fullmatch(physical):
                name = generation[1]
                if name.startswith(prefix) and name not in swapped:
                    swapped.add(name)
                    keys[name] = size, _generation_version(LATEST - int(generation[2]), version)
            else:
                keys[physical] = size, version
        return iter([(name, size, version) for name, (size, version) in keys.items()])

    def _cat(self, name: str) -> bytes:
        current = self._now_named(name)
        return bytes(self._call(lambda: self.client.get_object(current).read()))

    def _name(self, key: str) -> str:
        if GENERATION in key:  # a bug: batch names no key so
            raise ValueError(f"a storage key on OSS cannot hold {GENERATION!r}: {key!r}")
        return super()._name(key)

    def _open(self, name: str) -> Any:
        current = self._now_named(name)
        head = self._call(self.client.head_object, current)
        if head.content_length <= self.read_whole_up_to:
            # One GET for the whole of it: Parquet reads a part in ~20 small ranges (the footer, each column
            # chunk), each a request of its own (13,207 GETs for 300 one-row parts, 25 s on localhost).
            got = self._call(lambda: self.client.get_object(current, headers={"If-Match": f'"{head.etag}"'}).read())
            return io.BytesIO(bytes(got))
        return _RangeReader(self, current, head.content_length, head.etag)

    def _version_of(self, name: str) -> str | None:
        current = self._current(name)
        return current[1] if current else None

    def _delete(self, name: str) -> None:
        # the generations first (the oldest first: a delete cut short leaves the key as an older self of its, and
        # the delete is done again by whoever cleans up), then the plain object
        for physical, _, _ in reversed(list(self._physical(name + GENERATION))):
            self._call(self.client.delete_object, physical)
        self._call(self.client.delete_object, name)

    # -- writes ---------------------------------------------------------------------------------------------------

    def _put(self, name: str, body: BinaryIO, condition: str | None) -> str:
        self._check_versioning()
        if condition == ABSENT:
            return self._send(name, body, exclusive=True)
        if condition is not None:
            return self._swap(name, body, condition)
        current = self._current(name)
        if current is None or current[0] == name:  # never swapped: the plain object, overwritten
            return self._send(name, body, exclusive=False)
        return self._next_generation(name, body, _generation_of(current[1]))

    def _swap(self, name: str, body: BinaryIO, version: str) -> str:
        """`body` as the generation after the one `version` names (1 after the plain object): one request, which
        refuses when a swap from that version was made already. Then the version it swapped from is checked to be
        still there (a key deleted, or its plain object written again, since the version was read) and the write
        taken back if not."""
        base = _generation_of(version)
        made = self._send_generation(name, body, base + 1)
        base_name = _generation_name(name, base) if base else name
        try:
            still = self._call(self.client.head_object, base_name).etag
        except Missing:
            still = None
        if still != _etag_of(version):
            self._call(self.client.delete_object, _generation_name(name, base + 1))
            raise Refused
        return made

    def _next_generation(self, name: str, body: BinaryIO, newest: int) -> str:
        """`body` as the generation after the newest, whichever that is when it is written."""
        while True:
            try:
                return self._send_generation(name, body, newest + 1)
            except Refused:
                body.seek(0)
                current = self._current(name)
                newest = _generation_of(current[1]) if current else 0

    def _send_generation(self, name: str, body: BinaryIO, generation: int) -> str:
        if generation > LATEST:  # numbered down from LATEST: past it, names a listing would not find (a loop)
            raise Unavailable(name, f"no generation can follow {LATEST:,}: objects named {GENERATION}... that batch "
                              "did not write are under this key; move them away")
        return _generation_version(generation, self._send(_generation_name(name, generation), body, exclusive=True))

    def _send(self, name: str, body: BinaryIO, exclusive: bool) -> str:
        """`body` as the object `name`, in one PutObject or in parts past multipart_above; its ETag. Exclusive:
        x-oss-forbid-overwrite on the request that makes the object (Refused when the key has one)."""
        headers = _FORBID_OVERWRITE if exclusive else {}
        if size_of(body) <= self.multipart_above:
            return str(self._call(self.client.put_object, name, body.read(), headers=dict(headers)).etag)
        # the header on the initiation too: an upload into a key already taken is refused before its parts are sent
        upload = self._call(self.client.init_multipart_upload, name, headers=dict(headers)).upload_id
        try:
            parts = []
            while chunk := body.read(self.part_size):
                number = len(parts) + 1
                sent = self._call(self.client.upload_part, name, upload, number, chunk)
                parts.append(oss2.models.PartInfo(number, sent.etag))
            done = self._call(self.client.complete_multipart_upload, name, upload, parts, headers=dict(headers))
            return str(done.etag)
        except BaseException:
            try:  # the first failure is the one to tell; what is left is aborted by clean_up
                self.client.abort_multipart_upload(name, upload)
            except Exception:  # noqa: S110
                pass
            raise

    def _check_versioning(self) -> None:
        """Refuse a bucket with versioning on, where OSS ignores x-oss-forbid-overwrite: an exclusive create would
        overwrite (a part, a lease), and two runs would both pay for their rows."""
        checked = (self.client.endpoint, self.bucket)
        with _checking:
            if checked in _VERSIONING_CHECKED:
                return
        try:
            status = self._call(self.client.get_bucket_versioning).status
        except ServerError as exc:
            if exc.status != 403:  # a server's failure: Unavailable, as any call's
                raise
            raise ValueError(f"oss://{self.bucket}: cannot read whether its versioning is on ({exc.code or exc.status}"
                             "); batch needs to know, as OSS ignores x-oss-forbid-overwrite in a versioned bucket: "
                             "allow oss:GetBucketVersioning to these credentials") from None
        if status:
            raise ValueError(f"oss://{self.bucket} has versioning {status}, where OSS ignores x-oss-forbid-overwrite: "
                             "batch could not write its parts and lease exclusively; use a bucket whose versioning "
                             "was never turned on")
        with _checking:
            _VERSIONING_CHECKED.add(checked)

    # -- listings ---------------------------------------------------------------------------------------------------

    def _physical(self, prefix: str) -> Iterator[tuple[str, int, str]]:
        """Every object whose name starts with `prefix`, generations included: name, size, ETag."""
        self._check_versioning()
        token = ""
        while True:
            page = self._call(self.client.list_objects_v2, prefix=prefix, continuation_token=token, max_keys=1000)
            for item in page.object_list:
                yield item.key, int(item.size), str(item.etag)
            if not page.is_truncated:
                return
            token = page.next_continuation_token

    def _abort_unfinished(self, prefix: str) -> int:
        """Abort the multipart uploads begun directly under `prefix` and never completed (a writer killed while it
        sent an object past multipart_above): OSS keeps, and bills, their parts until they are aborted."""
        removed = 0
        for upload in oss2.MultipartUploadIterator(self.client, prefix=prefix):
            if "/" in upload.key[len(prefix):]:  # in a folder below: not this folder's
                continue
            try:
                self._call(self.client.abort_multipart_upload, upload.key, upload.upload_id)
                removed += 1
            except Missing:
                pass
        return removed

    # -- OSS's answers as the seam's --------------------------------------------------------------------------------

    def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        """One oss2 call: a refused forbid-overwrite Refused, a missing key Missing, a missing bucket NoBucket."""
        try:
            return method(*args, **kwargs)
        except RequestError as exc:
            raise _no_answer(exc) from exc.exception
        except ServerError as exc:
            if exc.code == "NoSuchBucket":
                raise NoBucket from None
            if exc.status == 404 or exc.code == "NoSuchKey":
                raise Missing from None
            if exc.status in (409, 412) and exc.code in ("FileAlreadyExists", "PreconditionFailed"):
                raise Refused from None
            raise

    def _unavailable(self, key: str, exc: Exception) -> StorageError | None:
        if type(exc).__module__.split(".")[0] in ("requests", "urllib3"):  # what is_unreachable did not know
            return Unavailable(key, reason(exc))
        if isinstance(exc, OssError):
            said = exc.code or exc.message or f"HTTP {exc.status}"
            return Unavailable(key, f"{said} (HTTP {exc.status})" if exc.code else said)
        return None


class _RangeReader(io.RawIOBase):
    """An object read in ranges as asked, each GET sent with If-Match on the ETag found at open: an object replaced
    while it is read fails the read (Missing: NotFound) instead of mixing two versions."""

    def __init__(self, store: OSSStore, name: str, size: int, etag: str) -> None:
        self._store, self._name, self._size, self._etag = store, name, size, etag
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._position + size)
        if end <= self._position:
            return b""
        start, self._position = self._position, end
        headers = {"If-Match": f'"{self._etag}"'}
        try:
            got = self._store._call(lambda: self._store.client.get_object(self._name, byte_range=(start, end - 1),
                                                                          headers=headers).read())
        except Refused:  # 412: replaced since the open
            raise Missing from None
        return bytes(got)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position


def _no_answer(exc: RequestError) -> OSError:
    """A request that got no answer, said as the socket's error says it ("Connection refused"), not as oss2's text
    (a dict) nor requests' (a paragraph); raised from requests' error, so is_unreachable finds the socket's in its
    chain."""
    cause: BaseException | None = exc.exception
    said, seen = reason(exc.exception), set()
    while cause is not None and id(cause) not in seen:
        if type(cause).__module__ == "builtins" and isinstance(cause, OSError) and cause.strerror:
            said = cause.strerror
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return OSError(said)


def _generation_name(name: str, generation: int) -> str:
    return f"{name}{GENERATION}{LATEST - generation:012d}"


def _generation_version(generation: int, etag: str) -> str:
    """A generation's version: its ETag (naming its bytes, as a plain object's version does) and its number (which
    the next swap creates the successor of)."""
    return f"{etag} (generation {generation})"


def _etag_of(version: str) -> str:
    """The ETag a version names (a generation's version holds its number after it)."""
    return version.split(" ", 1)[0]


def _generation_of(version: str) -> int:
    """The generation a version names; 0 for a plain object's ETag (the key never swapped)."""
    found = _GENERATION_VERSION.fullmatch(version)
    return int(found[1]) if found else 0


def credentials() -> Credentials:
    """The endpoint and credentials the environment gives (OSS_* variables); ValueError naming what is missing."""
    endpoint, key_id, secret = (os.environ.get(name, "").strip()
                                for name in ("OSS_ENDPOINT", "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET"))
    if not endpoint:
        raise ValueError("oss:// URLs need OSS_ENDPOINT in the environment: the endpoint of the bucket's region, "
                         "e.g. https://oss-cn-hangzhou.aliyuncs.com")
    if "://" not in endpoint:  # oss2 would take it as http://: the data and an STS token sent in clear
        endpoint = f"https://{endpoint}"
    if endpoint.partition("://")[0].lower() not in ("http", "https"):  # oss2 would make a host name of it
        raise ValueError(f"OSS_ENDPOINT {endpoint} is not an http:// or https:// URL: the endpoint of the bucket's "
                         "region, e.g. https://oss-cn-hangzhou.aliyuncs.com")
    if not (key_id and secret):
        raise ValueError("no OSS credentials in the environment: set OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET "
                         "(and OSS_SESSION_TOKEN for STS credentials)")
    return Credentials(endpoint, key_id, secret, os.environ.get("OSS_SESSION_TOKEN", "").strip())


@functools.lru_cache(maxsize=32)
def _bucket_for(found: Credentials, bucket: str) -> oss2.Bucket:
    auth = oss2.StsAuth(found.key_id, found.secret, found.token) if found.token else oss2.Auth(found.key_id,
                                                                                                found.secret)
    return oss2.Bucket(auth, found.endpoint, bucket, session=_session(environment("OSS_")))


@functools.lru_cache(maxsize=8)
def _session(settings: tuple[tuple[str, str], ...]) -> oss2.Session:
    """One connection pool per environment."""
    return oss2.Session()


def default_filesystem() -> Any:
    """ossfs's filesystem (an input read from oss://) with the environment's endpoint and credentials."""
    found = credentials()
    return _InputFilesystem(endpoint=found.endpoint, key=found.key_id, secret=found.secret, token=found.token or None,
                            skip_instance_cache=True)


class _InputFilesystem(OSSFileSystem):  # type: ignore[misc]
    """ossfs's filesystem whose failures are Python's file errors: ossfs lets some of oss2's through (a missing
    bucket's NoSuchBucket, whose text is the reply as a dict), which a message would quote whole."""

    def info(self, path: str, **kwargs: Any) -> Any:
        with _as_file_errors(path):
            return super().info(path, **kwargs)

    def open(self, path: str, *args: Any, **kwargs: Any) -> Any:
        with _as_file_errors(path):
            return super().open(path, *args, **kwargs)


@contextlib.contextmanager
def _as_file_errors(path: str) -> Iterator[None]:
    try:
        yield
    except RequestError as exc:
        raise _no_answer(exc) from exc.exception
    except ServerError as exc:
        said = f"{exc.message or exc.code} ({exc.code or 'HTTP'} {exc.status})"
        if exc.status == 404:
            raise FileNotFoundError(errno.ENOENT, said, path) from None
        raise OSError(errno.EACCES if exc.status == 403 else errno.EIO, said, path) from None
