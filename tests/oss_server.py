"""An in-memory Alibaba Cloud OSS server on 127.0.0.1 for tests, spoken to through the `oss2` SDK.

No OSS emulator exists (moto and friends speak S3 only), so this is the project's own emulation of OSS's documented
behaviour, limited to what the storage code uses, with the wire format matched to what oss2 2.18 sends and parses
(path-style URLs `/<bucket>/<key>?<subresource>` for an IP endpoint). Behaviours copied, with their source:

- error body `<Error><Code/><Message/><RequestId/><HostId/>...</Error>`, Content-Type application/xml:
  https://www.alibabacloud.com/help/en/object-storage-service/latest/oss-error-response
- `x-oss-forbid-overwrite: true` refuses PutObject, InitiateMultipartUpload and CompleteMultipartUpload with 409
  FileAlreadyExists when the key exists, and is ignored in a bucket whose versioning is Enabled or Suspended:
  https://www.alibabacloud.com/help/en/oss/developer-reference/prevent-objects-from-being-overwritten-by-objects-with-the-same-names-1
  https://www.alibabacloud.com/help/en/oss/user-guide/0042-00000214 (the CompleteMultipartUpload case)
- GetObject / HeadObject with If-Match: another ETag is 412 PreconditionFailed.
- Range: a valid range gives 206 + Content-Range; an invalid or out-of-range one is ignored (200, whole object)
  unless `x-oss-range-behavior: standard`, which clamps the end and answers 416 InvalidRange for a start past the end:
  https://www.alibabacloud.com/help/en/oss/how-to-obtain-oss-resources-by-segmenting-http-range-requests
- ListObjects (v1, NextMarker) / ListObjectsV2 (NextContinuationToken) / ListMultipartUploads paging, delimiter and
  CommonPrefixes, `encoding-type=url` (names percent-encoded, so `+` and spaces survive oss2's unquote):
  https://alibabacloud.com/help/en/oss/developer-reference/listmultipartuploads
- PutObject/UploadPart ETag is the upper-case MD5 in quotes; x-oss-hash-crc64ecma is CRC-64/ECMA-182 as oss2 computes
  it (oss2.utils.Crc64), so oss2's CRC check runs for real.
- a HEAD error has no body; the error XML goes base64-encoded in the `x-oss-err` header, as oss2 expects ("for a
  HEAD request the server returns the error in x-oss-err": oss2/api.py Bucket.object_exists, and make_exception).

Signatures are not verified, but a request with neither an Authorization header nor a signed-URL query is anonymous
and refused with 403 AccessDenied, as a private bucket does. Every request is appended to a JSON-lines log so tests
can check what went over the wire. All state, and every condition checked against it, sits under one lock, so a
conditional write is atomic: of two racing exclusive creates exactly one wins.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import itertools
import json
import re
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from oss2.utils import Crc64

OWNER_XML = "<Owner><ID>1234567890123456</ID><DisplayName>1234567890123456</DisplayName></Owner>"
# Every query parameter a supported operation takes; any other (versionId, acl, ...) is refused with NotImplemented,
# so a test never mistakes an operation this server lacks for one that worked. (OSS itself has them all.)
PARAMETERS = {"prefix", "marker", "max-keys", "delimiter", "encoding-type", "list-type", "continuation-token",
              "start-after", "fetch-owner", "uploads", "key-marker", "upload-id-marker", "max-uploads", "versioning",
              "bucketInfo", "uploadId", "partNumber", "objectMeta", "OSSAccessKeyId", "Expires", "Signature",
              "security-token"}
LAST = "\U0010ffff"  # sorts after any upload id: a listing position past every upload of a name
MIN_PART_SIZE = 100 * 1024  # OSS's EntityTooSmall: every part but the last must be at least 100 KB


@dataclass
class StoredObject:
    body: bytes
    etag: str  # quoted, as in the ETag header
    content_type: str
    meta: dict[str, str]
    object_type: str = "Normal"
    modified: float = field(default_factory=time.time)
    crc64: int = 0

    def __post_init__(self) -> None:
        self.crc64 = crc64(self.body)


@dataclass
class Upload:
    key: str
    upload_id: str
    content_type: str
    meta: dict[str, str]
    parts: dict[int, tuple[bytes, str]] = field(default_factory=dict)  # number -> (body, quoted etag)
    initiated: float = field(default_factory=time.time)


@dataclass
class Bucket:
    versioning: str | None = None  # None (never set), "Enabled" or "Suspended"
    objects: dict[str, StoredObject] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)
    created: float = field(default_factory=time.time)


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    length: int | None = None  # Content-Length of a HEAD, which sends no body


class OSSError(Exception):
    def __init__(self, status: int, code: str, message: str, **details: str) -> None:
        super().__init__(code)
        self.status, self.code, self.message, self.details = status, code, message, details


def crc64(data: bytes) -> int:
    digest = Crc64()
    digest.update(data)
    return digest.crc


def md5_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest().upper()}"'


def iso8601(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(moment))


def xml(root: str, *children: str) -> bytes:
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<{root}>{"".join(children)}</{root}>'.encode()


def tag(name: str, value: object) -> str:
    return f"<{name}>{escape(str(value))}</{name}>"


def is_true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def byte_range(header: str, size: int, standard: bool) -> tuple[int, int] | None:
    """The inclusive (first, last) bytes to send, None for the whole object; 416 only under the standard behaviour."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not match or match.groups() == ("", ""):
        return None
    first_text, last_text = match.groups()
    if not first_text:  # a suffix: the last N bytes
        wanted = int(last_text)
        if wanted == 0 or (wanted > size and not standard):
            return None
        return max(size - wanted, 0), size - 1
    first, last = int(first_text), int(last_text) if last_text else size - 1
    if last_text and last < first:
        return None
    if first >= size:
        if standard:
            raise OSSError(416, "InvalidRange", "The requested range cannot be satisfied")
        return None
    if last >= size:
        if not standard:
            return None
        last = size - 1
    return first, last


def page(items: list[tuple[str, str]], prefix: str, delimiter: str, after: tuple[str, str], limit: int,
         ) -> tuple[list[tuple[str, str, bool]], bool]:
    """One page of (name, tiebreak, is_common_prefix) past `after`, from (name, tiebreak) items (the tiebreak is an
    upload id, or "" for objects), names rolled up to a common prefix at the delimiter; and whether more follow."""
    entries: list[tuple[str, str, bool]] = []
    for name, tiebreak in sorted(items):
        if not name.startswith(prefix):
            continue
        cut = name.find(delimiter, len(prefix)) if delimiter else -1
        entry = (name[: cut + len(delimiter)], LAST, True) if cut >= 0 else (name, tiebreak, False)
        # a common prefix sorts after everything under it, so a marker equal to it skips all its members
        if entry[:2] <= after or (entries and entries[-1] == entry):
            continue
        if len(entries) == limit:
            return entries, True
        entries.append(entry)
    return entries, False


def int_param(query: dict[str, str], name: str, default: int, maximum: int) -> int:
    text = query.get(name) or str(default)
    if not text.isdigit() or int(text) > maximum:
        raise OSSError(400, "InvalidArgument", f"{name} must be an integer between 0 and {maximum}")
    return int(text)


class OSSServer:
    def __init__(self, requests_log: Path) -> None:
        self.requests_log = Path(requests_log)
        self.endpoint = ""
        self._lock = threading.Lock()  # guards all state: buckets, the fault counter and the log file
        self._buckets: dict[str, Bucket] = {}
        self._faults: list[tuple[int, str]] = []
        self._upload_serial = itertools.count(1)
        self._http: ThreadingHTTPServer | None = None

    def start(self, port: int = 0) -> None:
        self._http = _HTTPServer(("127.0.0.1", port), _Handler)
        self._http.oss = self  # type: ignore[attr-defined]
        self.endpoint = f"http://127.0.0.1:{self._http.server_address[1]}"
        threading.Thread(target=self._http.serve_forever, name="oss-server", daemon=True).start()

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def requests(self) -> list[dict[str, Any]]:
        if not self.requests_log.exists():
            return []
        return [json.loads(line) for line in self.requests_log.read_text().splitlines() if line.strip()]

    def fail_next(self, count: int = 1, status: int = 503, code: str = "ServiceUnavailable") -> None:
        """Answer the next `count` requests with this error, to test retries and error reporting."""
        with self._lock:
            self._faults.extend([(status, code)] * count)

    def log(self, entry: dict[str, Any]) -> None:
        with self._lock, self.requests_log.open("a") as sink:
            sink.write(json.dumps(entry) + "\n")

    def handle(self, method: str, bucket_name: str, key: str, query: dict[str, str], headers: dict[str, str],
               body: bytes) -> Reply:
        if "authorization" not in headers and not {"Signature", "x-oss-signature"} & query.keys():
            raise OSSError(403, "AccessDenied", "You have no right to access this object because of bucket acl.")
        unsupported = sorted(name for name in query.keys() - PARAMETERS if not name.startswith("x-oss-"))
        if unsupported:
            raise OSSError(400, "NotImplemented", f"This test server does not implement {', '.join(unsupported)}")
        with self._lock:
            if self._faults:
                status, code = self._faults.pop(0)
                raise OSSError(status, code, "Injected fault")
            if not bucket_name:
                raise OSSError(400, "NotImplemented", "This test server does not list buckets")
            if method == "PUT" and not key and "versioning" not in query:
                return self._create_bucket(bucket_name)
            bucket = self._buckets.get(bucket_name)
            if bucket is None:
                raise OSSError(404, "NoSuchBucket", "The specified bucket does not exist.", BucketName=bucket_name)
            if not key:
                return self._bucket_operation(method, bucket_name, bucket, query, body)
            return self._object_operation(method, bucket_name, bucket, key, query, headers, body)

    def _create_bucket(self, name: str) -> Reply:
        if name in self._buckets:
            raise OSSError(409, "BucketAlreadyExists", "The requested bucket name is not available.", BucketName=name)
        self._buckets[name] = Bucket()
        return Reply(200)

    def _bucket_operation(self, method: str, name: str, bucket: Bucket, query: dict[str, str], body: bytes) -> Reply:
        if method == "PUT":  # ?versioning
            try:
                status = ElementTree.fromstring(body).findtext("Status")
            except ElementTree.ParseError:
                status = None
            if status not in ("Enabled", "Suspended"):
                raise OSSError(400, "MalformedXML", "The XML you provided was not well-formed.")
            bucket.versioning = status
            return Reply(200)
        if method == "DELETE":
            if bucket.objects or bucket.uploads:
                raise OSSError(409, "BucketNotEmpty", "The bucket you tried to delete is not empty.", BucketName=name)
            del self._buckets[name]
            return Reply(204)
        if method != "GET":
            raise OSSError(405, "MethodNotAllowed", "The specified method is not allowed against this resource.")
        if "versioning" in query:
            return Reply(200, body=xml("VersioningConfiguration", tag("Status", bucket.versioning)
                                       if bucket.versioning else ""))
        if "bucketInfo" in query:
            return Reply(200, body=xml("BucketInfo", "<Bucket>", tag("Name", name),
                                       tag("CreationDate", iso8601(bucket.created)), tag("StorageClass", "Standard"),
                                       tag("ExtranetEndpoint", "127.0.0.1"), tag("IntranetEndpoint", "127.0.0.1"),
                                       tag("Location", "oss-test"), OWNER_XML,
                                       "<AccessControlList>", tag("Grant", "private"), "</AccessControlList>",
                                       tag("Versioning", bucket.versioning) if bucket.versioning else "", "</Bucket>"))
        if "uploads" in query:
            return self._list_uploads(name, bucket, query)
        return self._list_objects(name, bucket, query)

    def _list_objects(self, name: str, bucket: Bucket, query: dict[str, str]) -> Reply:
        encode = query.get("encoding-type") == "url"
        text = functools.partial(quote, safe="/") if encode else str
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        limit = int_param(query, "max-keys", 100, 1000)
        v2 = query.get("list-type") == "2"
        after = query.get("marker", "")
        if v2:
            token = query.get("continuation-token", "")
            try:
                after = base64.urlsafe_b64decode(token.encode()).decode() if token else query.get("start-after", "")
            except ValueError as error:
                raise OSSError(400, "InvalidArgument", "The continuation token provided is incorrect") from error
        entries, truncated = page([(key, "") for key in bucket.objects], prefix, delimiter, (after, LAST), limit)
        parts = [tag("Name", name), tag("Prefix", text(prefix)), tag("MaxKeys", limit),
                 tag("Delimiter", text(delimiter)), tag("EncodingType", "url") if encode else "",
                 tag("IsTruncated", str(truncated).lower())]
        if v2:
            parts += [tag("ContinuationToken", token) if token else "", tag("KeyCount", len(entries)),
                      tag("StartAfter", text(query["start-after"])) if query.get("start-after") else ""]
            if truncated:  # opaque to the client; here the last name listed
                parts.append(tag("NextContinuationToken", text(base64.urlsafe_b64encode(entries[-1][0].encode())
                                                               .decode())))
        else:
            parts += [tag("Marker", text(after)), tag("NextMarker", text(entries[-1][0])) if truncated else ""]
        with_owner = not v2 or is_true(query.get("fetch-owner"))
        for entry, _, common in entries:
            stored = None if common else bucket.objects[entry]
            parts.append(f"<CommonPrefixes>{tag('Prefix', text(entry))}</CommonPrefixes>" if stored is None else
                         f"<Contents>{tag('Key', text(entry))}{tag('LastModified', iso8601(stored.modified))}"
                         f"{tag('ETag', stored.etag)}{tag('Type', stored.object_type)}{tag('Size', len(stored.body))}"
                         f"{tag('StorageClass', 'Standard')}{OWNER_XML if with_owner else ''}</Contents>")
        return Reply(200, body=xml("ListBucketResult", *parts))

    def _list_uploads(self, name: str, bucket: Bucket, query: dict[str, str]) -> Reply:
        encode = query.get("encoding-type") == "url"
        text = functools.partial(quote, safe="/") if encode else str
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        key_marker, id_marker = query.get("key-marker", ""), query.get("upload-id-marker", "")
        limit = int_param(query, "max-uploads", 1000, 1000)
        # without a key-marker the upload-id-marker is ignored; without an upload-id-marker, all of key-marker's go
        after = (key_marker, id_marker if key_marker and id_marker else LAST)
        items = [(upload.key, upload.upload_id) for upload in bucket.uploads.values()]
        entries, truncated = page(items, prefix, delimiter, after, limit)
        listed = [f"<CommonPrefixes>{tag('Prefix', text(key))}</CommonPrefixes>" if common else
                  f"<Upload>{tag('Key', text(key))}{tag('UploadId', upload_id)}{tag('StorageClass', 'Standard')}"
                  f"{tag('Initiated', iso8601(bucket.uploads[upload_id].initiated))}</Upload>"
                  for key, upload_id, common in entries]
        next_key, next_id = (entries[-1][0], "" if entries[-1][2] else entries[-1][1]) if truncated else ("", "")
        return Reply(200, body=xml(
            "ListMultipartUploadsResult", tag("Bucket", name), tag("EncodingType", "url") if encode else "",
            tag("KeyMarker", text(key_marker)), tag("UploadIdMarker", id_marker), tag("NextKeyMarker", text(next_key)),
            tag("NextUploadIdMarker", next_id), tag("Delimiter", text(delimiter)), tag("Prefix", text(prefix)),
            tag("MaxUploads", limit), tag("IsTruncated", str(truncated).lower()), *listed))

    def _object_operation(self, method: str, bucket_name: str, bucket: Bucket, key: str, query: dict[str, str],
                          headers: dict[str, str], body: bytes) -> Reply:
        def refuse_overwrite() -> None:
            # versioning keeps the old object as a version, so OSS ignores the header in a versioned bucket
            if is_true(headers.get("x-oss-forbid-overwrite")) and bucket.versioning is None and key in bucket.objects:
                raise OSSError(409, "FileAlreadyExists",
                               "The object you specified already exists and can not be overwritten.", Key=key)

        def upload() -> Upload:
            found = bucket.uploads.get(query["uploadId"])
            if found is None or found.key != key:
                raise OSSError(404, "NoSuchUpload", "The specified upload does not exist.", UploadId=query["uploadId"])
            return found

        meta = {name: value for name, value in headers.items() if name.startswith("x-oss-meta-")}
        content_type = headers.get("content-type") or "application/octet-stream"
        if method in ("GET", "HEAD"):
            stored = bucket.objects.get(key)
            if stored is None:
                raise OSSError(404, "NoSuchKey", "The specified key does not exist.", Key=key)
            if "objectMeta" in query:  # GetObjectMeta, which oss2's object_exists uses: the basic headers only
                return Reply(200, {"ETag": stored.etag, "Last-Modified": formatdate(stored.modified, usegmt=True)},
                             length=len(stored.body))
            return self._read(stored, headers, method == "HEAD")
        if method == "PUT":
            body_md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
            if headers.get("content-md5", body_md5) != body_md5:
                raise OSSError(400, "InvalidDigest", "The Content-MD5 you specified was invalid.", Key=key)
            if "uploadId" in query:
                number = int(text) if (text := query.get("partNumber", "")).isdigit() else 0
                if not 1 <= number <= 10000:
                    raise OSSError(400, "InvalidArgument", "Part number must be an integer between 1 and 10000.")
                upload().parts[number] = (body, md5_etag(body))
                return Reply(200, {"ETag": md5_etag(body), "x-oss-hash-crc64ecma": str(crc64(body))})
            refuse_overwrite()
            return self._store(bucket, key, StoredObject(body, md5_etag(body), content_type, meta))
        if method == "POST" and "uploads" in query:
            refuse_overwrite()
            upload_id = f"{next(self._upload_serial):08X}{uuid.uuid4().hex.upper()}"  # ids sort in start order
            bucket.uploads[upload_id] = Upload(key, upload_id, content_type, meta)
            return Reply(200, body=xml("InitiateMultipartUploadResult", tag("Bucket", bucket_name), tag("Key", key),
                                       tag("UploadId", upload_id)))
        if method == "POST" and "uploadId" in query:
            return self._complete(bucket, bucket_name, key, upload(), body, refuse_overwrite)
        if method == "DELETE" and "uploadId" in query:
            del bucket.uploads[upload().upload_id]
            return Reply(204)
        if method == "DELETE":
            bucket.objects.pop(key, None)
            return Reply(204)
        raise OSSError(405, "MethodNotAllowed", "The specified method is not allowed against this resource.")

    def _complete(self, bucket: Bucket, bucket_name: str, key: str, upload: Upload, body: bytes,
                  refuse_overwrite: Callable[[], None]) -> Reply:
        try:
            listed = [(int(part.findtext("PartNumber") or ""), (part.findtext("ETag") or "").strip('"').upper())
                      for part in ElementTree.fromstring(body).findall("Part")]
        except (ElementTree.ParseError, ValueError) as error:
            raise OSSError(400, "MalformedXML", "The XML you provided was not well-formed.") from error
        if not listed:
            raise OSSError(400, "MalformedXML", "The XML you provided was not well-formed.")
        if [number for number, _ in listed] != sorted({number for number, _ in listed}):
            raise OSSError(400, "InvalidPartOrder", "The list of parts was not in ascending order.")
        for index, (number, etag) in enumerate(listed):
            part = upload.parts.get(number)
            if part is None or part[1].strip('"') != etag:
                raise OSSError(400, "InvalidPart", "One or more of the specified parts could not be found.",
                               PartNumber=str(number), UploadId=upload.upload_id)
            if index < len(listed) - 1 and len(part[0]) < MIN_PART_SIZE:
                raise OSSError(400, "EntityTooSmall", "Your proposed upload is smaller than the minimum allowed size.")
        # Refused here, the upload is left in place (the request failed, so nothing changed): the caller may
        # still abort it or, once the key is gone, complete it. OSS's docs do not say; this is the conservative reading.
        refuse_overwrite()
        parts = [upload.parts[number] for number, _ in listed]
        digests = b"".join(hashlib.md5(part_body).digest() for part_body, _ in parts)
        etag = f'"{hashlib.md5(digests).hexdigest().upper()}-{len(parts)}"'
        del bucket.uploads[upload.upload_id]
        stored = StoredObject(b"".join(part_body for part_body, _ in parts), etag, upload.content_type, upload.meta,
                              "Multipart")
        reply = self._store(bucket, key, stored)
        reply.body = xml("CompleteMultipartUploadResult", tag("Location", f"/{bucket_name}/{key}"),
                         tag("Bucket", bucket_name), tag("Key", key), tag("ETag", etag))
        return reply

    @staticmethod
    def _store(bucket: Bucket, key: str, stored: StoredObject) -> Reply:
        bucket.objects[key] = stored
        headers = {"ETag": stored.etag, "x-oss-hash-crc64ecma": str(stored.crc64)}
        if bucket.versioning == "Enabled":
            headers["x-oss-version-id"] = uuid.uuid4().hex
        return Reply(200, headers)

    @staticmethod
    def _read(stored: StoredObject, headers: dict[str, str], head: bool) -> Reply:
        # GetObject's and HeadObject's If-Match: another ETag than the object's is 412 PreconditionFailed
        # (https://www.alibabacloud.com/help/en/oss/developer-reference/getobject)
        wanted_etag = headers.get("if-match")
        if wanted_etag is not None and wanted_etag.strip('"').upper() != stored.etag.strip('"'):
            raise OSSError(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold.")
        size = len(stored.body)
        reply_headers = {"ETag": stored.etag, "Last-Modified": formatdate(stored.modified, usegmt=True),
                         "Content-Type": stored.content_type, "x-oss-object-type": stored.object_type,
                         "x-oss-storage-class": "Standard", "Accept-Ranges": "bytes", **stored.meta}
        wanted = None
        if "range" in headers and not head:
            standard = headers.get("x-oss-range-behavior", "").lower() == "standard"
            wanted = byte_range(headers["range"], size, standard)
        if wanted is None:
            reply_headers["x-oss-hash-crc64ecma"] = str(stored.crc64)  # a whole object's CRC, for oss2 to check
            return Reply(200, reply_headers, b"" if head else stored.body, size if head else None)
        first, last = wanted
        reply_headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        return Reply(206, reply_headers, stored.body[first: last + 1])


class _HTTPServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client dropping a kept-alive connection is normal
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as oss2's requests session expects
    # A reply's headers and body go in separate writes: with Nagle's algorithm the body waited for the client's
    # delayed ACK, 40 ms a GET.
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return "AliyunOSS"

    def log_message(self, *args: Any) -> None:  # the JSON request log replaces the stderr access log
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        oss: OSSServer = self.server.oss  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        headers = {name.lower(): value for name, value in self.headers.items()}
        body = self._read_body()  # all of it before taking the lock
        bucket_name, _, key = path.lstrip("/").partition("/")
        request_id = uuid.uuid4().hex[:24].upper()
        try:
            reply = oss.handle(self.command, bucket_name, key, query, headers, body)
        except OSSError as error:
            reply = self._error_reply(error, request_id)
        except Exception as error:  # a bug in this server: a 500 names it, where a dropped connection would not
            traceback.print_exc()
            reply = self._error_reply(OSSError(500, "InternalError", repr(error)), request_id)
        if reply.body and "Content-Type" not in reply.headers:
            reply.headers["Content-Type"] = "application/xml"
        # logged before answering, so a test that has its reply also finds the request in the log
        logged = {name: "***" if name == "authorization" else value for name, value in headers.items()}
        oss.log({"method": self.command, "path": path, "query": query, "headers": logged, "status": reply.status})
        self.send_response(reply.status)
        for name, value in {**reply.headers, "x-oss-request-id": request_id}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(reply.length if reply.length is not None else len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def _error_reply(self, error: OSSError, request_id: str) -> Reply:
        details = "".join(tag(name, value) for name, value in error.details.items())
        error_xml = xml("Error", tag("Code", error.code), tag("Message", error.message), tag("RequestId", request_id),
                        tag("HostId", "127.0.0.1"), details)
        if self.command == "HEAD":
            return Reply(error.status, {"x-oss-err": base64.b64encode(error_xml).decode()}, b"", 0)
        return Reply(error.status, {}, error_xml)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--requests-log", type=Path, default=Path("oss-requests.jsonl"))
    arguments = parser.parse_args()
    server = OSSServer(arguments.requests_log)
    server.start(arguments.port)
    print(server.endpoint, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
