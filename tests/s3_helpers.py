"""A bucket on the test process's moto S3 server (conftest.py's `s3` fixture), and the requests it was sent."""

from __future__ import annotations

import itertools
import json
import os
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pytest

_buckets = itertools.count(1)


@dataclass
class S3Bucket:
    endpoint: str
    name: str

    @classmethod
    def make(cls, endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            monkeypatch.delenv(name, raising=False)
        bucket = cls(endpoint, f"batch-test-{os.getpid()}-{next(_buckets)}")
        bucket._moto("recorder/reset-recording")
        bucket._moto("recorder/start-recording")
        bucket.client().create_bucket(Bucket=bucket.name)
        return bucket

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def keys(self, prefix: str = "") -> list[str]:
        listed = self.client().list_objects_v2(Bucket=self.name, Prefix=prefix)
        return sorted(item["Key"] for item in listed.get("Contents", []))

    def put(self, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=self.name, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=self.name, Key=key)["Body"].read())

    def requests(self) -> list[dict[str, Any]]:
        """Every request sent for this bucket since it was made (moto's recording): method, url, headers."""
        with urllib.request.urlopen(f"{self.endpoint}/moto-api/recorder/download-recording") as reply:
            lines = reply.read().decode().splitlines()
        entries = [json.loads(line) for line in lines if line.strip()]
        return [entry for entry in entries if f"/{self.name}/" in entry["url"] or entry["url"].endswith(f"/{self.name}")
                or f"//{self.name}." in entry["url"]]

    def puts(self) -> list[dict[str, Any]]:
        """The requests that write an object: a PUT of one, or the POST that completes a multipart upload."""
        objects = [entry for entry in self.requests() if f"/{self.name}/" in entry["url"]]
        return [entry for entry in objects if entry["method"] == "PUT" and "uploadId=" not in entry["url"]
                or entry["method"] == "POST" and "uploadId=" in entry["url"]]

    def writes(self) -> list[tuple[str, str]]:
        """Every write of an object (bucket_helpers.GCSBucket.writes's terms): its key and condition."""
        from bucket_helpers import CREATE, SWAP, UNCONDITIONAL

        found = []
        for entry in self.puts():
            key = entry["url"].split(f"/{self.name}/", 1)[1].split("?")[0]
            headers = entry["headers"]
            found.append((unquote(key), CREATE if headers.get("If-None-Match") == "*" else SWAP
                          if headers.get("If-Match") else UNCONDITIONAL))
        return found

    def _moto(self, action: str) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/{action}", method="POST")).close()
