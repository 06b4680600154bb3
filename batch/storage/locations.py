"""Where a job's files are: a local path, or a URL (`s3://bucket/key`, `file:///path`, any fsspec filesystem's).

A URL is a `UrlPath`: a pure path whose first segment is its scheme, so it is joined, split and renamed as a local
path is (`out.with_name(...)`, `folder / "part-000001.parquet"`, `.parent`, `.suffix`), and prints as the URL it is.
Only what touches the bytes goes through here: `store_at` gives the Store of a folder (LocalStore, or the bucket's
store for a writable scheme), `object_at` a file's store and key, `open_input` a seekable file to read. Credentials
come from each filesystem's own environment (AWS_* variables, profiles; WRITABLE says each), never from a job
file.

Writing needs the conditional writes of the seam (batch.storage.base): S3 (s3fs), Google Cloud Storage (gcsfs),
Azure Blob Storage (adlfs) and Alibaba Cloud OSS (oss2) have them (batch.storage.bucket); `file://` is a local path.
Another scheme can be read (an input) but not written to: WRITABLE_SCHEMES says which.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, cast

from batch.storage.base import NotFound, Store
from batch.storage.local import LocalStore


@dataclass(frozen=True)
class WritableScheme:
    """A scheme batch writes to: its store (a module imported only for such a URL, and the class in it), the
    packages it needs and the extra of batch that installs them (None: batch's own dependencies), and where its
    credentials come from, for messages."""

    module: str
    store: str
    packages: str
    extra: str | None
    credentials: str


WRITABLE = {
    "s3": WritableScheme("batch.storage.s3", "S3Store", "s3fs", None, "AWS_* variables, a profile, an instance role"),
    "gs": WritableScheme("batch.storage.gcs", "GCSStore", "gcsfs", "gcs",
                         "GOOGLE_APPLICATION_CREDENTIALS, gcloud's login, the metadata server"),
    "az": WritableScheme("batch.storage.azure", "AzureStore", "adlfs and azure-storage-blob", "azure",
                         "AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with a key, a SAS token "
                         "or a service principal"),
    "oss": WritableScheme("batch.storage.oss", "OSSStore", "oss2 and ossfs", "oss",
                          "OSS_ENDPOINT with OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET, or OSS_SESSION_TOKEN too"),
}
WRITABLE_SCHEMES = tuple(WRITABLE)
# The environment's storage credentials a job's errors could quote: masked like the API key (batch.logs).
STORAGE_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AZURE_STORAGE_KEY",
                            "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CLIENT_SECRET",
                            "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN", "GOOGLE_OAUTH_ACCESS_TOKEN",
                            "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN")
_URL = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)", re.DOTALL)


class UrlPath(PurePosixPath):
    """A URL as a pure path: `s3://bucket/out/result.parquet` is the segments ("s3:", "bucket", "out",
    "result.parquet"); str() gives the URL back."""

    def __str__(self) -> str:
        scheme, *rest = self.parts
        return f"{scheme}//{'/'.join(rest)}"

    def __repr__(self) -> str:
        return f"UrlPath({str(self)!r})"

    def __fspath__(self) -> str:  # not a local file: whatever would open it as one fails at once
        raise TypeError(f"{self} is a URL, not a local path")

    @property
    def scheme(self) -> str:
        return self.parts[0].rstrip(":").lower()

    @property
    def bucket(self) -> str:
        return self.parts[1] if len(self.parts) > 1 else ""

    @property
    def within(self) -> str:
        """What follows the bucket: the key of a file, the prefix of a folder ("" for the bucket itself)."""
        return "/".join(self.parts[2:])

    def resolve(self) -> UrlPath:  # a URL is absolute already (used where local paths are compared)
        return self


Location = Path | UrlPath


def location(text: str | Path) -> Location:
    """A job file's path or URL as a Location: `file://` URLs become the local path they name."""
    if isinstance(text, UrlPath | Path):
        return text
    found = _URL.fullmatch(text)
    if found is None:
        return Path(text)
    scheme, rest = found[1].lower(), found[2].rstrip("/")
    if scheme == "file":
        return Path("/" + rest.lstrip("/"))
    if not rest or rest.startswith("/") or "//" in rest:
        raise ValueError(f"{text} is not a URL batch can use: it names no bucket, or has an empty segment")
    return UrlPath(f"{scheme}:", *rest.split("/"))


def is_url(path: object) -> bool:
    return isinstance(path, UrlPath)


def store_at(folder: Location) -> Store:
    """The store whose root is `folder`: a local folder's, or a bucket's under a prefix."""
    if not isinstance(folder, UrlPath):
        return LocalStore(folder)
    if folder.scheme not in WRITABLE:
        raise ValueError(f"{folder}: batch writes only to local paths and "
                         f"{', '.join(scheme + '://' for scheme in WRITABLE_SCHEMES)} URLs")
    return cast(Store, getattr(_store_module(folder), WRITABLE[folder.scheme].store)(str(folder)))


def _store_module(url: UrlPath) -> Any:
    """The module of a writable scheme's store, imported now (a job elsewhere never loads its library); ValueError
    naming the extra to install when its library is not."""
    scheme = WRITABLE[url.scheme]
    try:
        return importlib.import_module(scheme.module)
    except ImportError as exc:
        if scheme.extra is None:
            raise
        raise ValueError(f"{url.scheme}:// URLs need {scheme.packages}, not installed ({exc.name} is missing): "
                         f"pip install 'batch[{scheme.extra}]'") from None


def credentials_from(url: Location) -> str:
    """Where a URL's credentials come from, for a message."""
    scheme = WRITABLE.get(url.scheme) if isinstance(url, UrlPath) else None
    return f"the environment ({scheme.credentials})" if scheme else "the environment of its fsspec filesystem"


def object_at(path: Location) -> tuple[Store, str]:
    """The store and key a file's path names: its folder, and its name."""
    return store_at(path.parent), path.name


def object_exists(path: Location) -> bool:
    store, key = object_at(path)
    return any(entry.key == key for entry in store.list(key))


def read_text_at(path: Location) -> str | None:
    """The UTF-8 text of the file at `path` (through the store its folder is), or None when there is none."""
    store, key = object_at(path)
    try:
        return store.read_bytes(key).decode("utf-8")
    except NotFound:
        return None


def write_text_at(path: Location, text: str) -> None:
    """`text` as the whole file at `path` (through the store its folder is): the old one or the new, never half."""
    store, key = object_at(path)
    store.replace(key, lambda sink: sink.write(text.encode("utf-8")))


def delete_at(path: Location) -> None:
    store, key = object_at(path)
    store.delete(key)


# -- reading an input anywhere fsspec reaches -----------------------------------------------------------


def filesystem(url: UrlPath) -> Any:
    """The fsspec filesystem of a URL's scheme, made with that filesystem's own environment (credentials, endpoint);
    ValueError naming the package to install for a scheme fsspec knows but has not got."""
    import fsspec

    if url.scheme in WRITABLE:  # the filesystem the store writes through, made from the environment as it is
        return _store_module(url).default_filesystem()
    try:
        return fsspec.filesystem(url.scheme)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"{url}: cannot read {url.scheme}:// URLs: {str(exc).splitlines()[0]}") from None


def open_input(path: Location) -> BinaryIO:
    """A seekable binary file of an input, read as it is consumed (a URL's in ranges): never loaded whole."""
    if not isinstance(path, UrlPath):
        return open(path, "rb")
    return cast(BinaryIO, filesystem(path).open(_fs_path(path), "rb"))


def input_version(path: Location) -> tuple[Any, ...] | None:
    """Which version of an input this is (None when there is none): a local file's device, inode, size and
    modification time in ns; an object's size and ETag (or generation, or modification time)."""
    if not isinstance(path, UrlPath):
        try:
            found = path.stat()
        except OSError:
            return None
        return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns
    fs = filesystem(path)
    fs.invalidate_cache(_fs_path(path))  # s3fs keeps what it listed: the version must be read now
    try:
        info = fs.info(_fs_path(path))
    except FileNotFoundError:
        return None
    if info.get("type") == "directory":
        return None
    tag = next((info[name] for name in ("ETag", "etag", "generation", "mtime", "LastModified") if info.get(name)), "")
    return info.get("size"), str(tag)


def input_kind(path: Location) -> str:
    """"file", "folder" or "missing"."""
    if not isinstance(path, UrlPath):
        return "file" if path.is_file() else "folder" if path.is_dir() else "missing"
    fs = filesystem(path)
    try:
        info = fs.info(_fs_path(path))
    except FileNotFoundError:
        return "missing"
    return "folder" if info.get("type") == "directory" else "file"


def _fs_path(url: UrlPath) -> str:
    return "/".join(url.parts[1:])
