"""S3Store against a moto S3 server, beyond the contract suite: what goes over the wire (every write conditional),
objects big enough to go up in parts, and the errors a user's bucket or credentials give."""

from __future__ import annotations

import os

import pytest
from s3_helpers import S3Bucket

from batch.storage.base import AlreadyExists, NotFound, PreconditionFailed, Unavailable
from batch.storage.s3 import S3Store

BIG = 11 * 2**20  # three parts of at most 5 MiB


def small_parts(url: str) -> S3Store:
    return S3Store(url, multipart_above=6 * 2**20, part_size=5 * 2**20)


def test_every_create_sends_if_none_match_and_every_swap_if_match(s3: S3Bucket) -> None:
    store = small_parts(f"{s3.url}/job")
    first = store.create("part-000001.parquet", lambda sink: sink.write(b"a"))
    store.replace("_LEASE", lambda sink: sink.write(b"1"))
    lease = store.list("_LEASE")[0].version
    store.replace("_LEASE", lambda sink: sink.write(b"2"), if_version=lease)
    with pytest.raises(AlreadyExists):
        store.create("part-000001.parquet", lambda sink: sink.write(b"b"))
    with pytest.raises(PreconditionFailed):
        store.replace("_LEASE", lambda sink: sink.write(b"3"), if_version=lease)
    puts = [(entry["url"].split(s3.name, 1)[1], entry["headers"]) for entry in s3.puts()]
    assert [(url, headers.get("If-None-Match"), headers.get("If-Match")) for url, headers in puts] == [
        ("/job/part-000001.parquet", "*", None),
        ("/job/_LEASE", None, None),  # a replace without a version asks for nothing
        ("/job/_LEASE", None, lease),
        ("/job/part-000001.parquet", "*", None),
        ("/job/_LEASE", None, lease),
    ]
    assert store.read_bytes("part-000001.parquet") == b"a" and first == store.list("part-")[0].version


def test_a_big_object_goes_up_in_parts_and_its_completion_is_conditional(s3: S3Bucket) -> None:
    store = small_parts(f"{s3.url}/job")
    data = os.urandom(BIG)
    version = store.create("final.parquet", lambda sink: sink.write(data))
    with pytest.raises(AlreadyExists):
        store.create("final.parquet", lambda sink: sink.write(data[::-1]))
    assert store.read_bytes("final.parquet") == data
    assert version.endswith('-3"')  # S3's ETag of an object made of three parts
    completions = [entry for entry in s3.puts() if entry["method"] == "POST"]
    assert len(completions) == 2 and all(entry["headers"].get("If-None-Match") == "*" for entry in completions)
    # The refused upload left nothing behind: its parts were aborted.
    assert s3.client().list_multipart_uploads(Bucket=s3.name).get("Uploads", []) == []
    with store.open_read("final.parquet") as stream:
        stream.seek(BIG - 10)
        assert stream.read() == data[-10:]


def test_a_missing_bucket_is_unavailable_and_a_missing_key_not_found(s3: S3Bucket) -> None:
    with pytest.raises(NotFound):
        S3Store(f"{s3.url}/job").open_read("part-000001.parquet")
    missing = S3Store(f"s3://{s3.name}-missing/job")
    with pytest.raises(Unavailable, match="bucket does not exist"):
        missing.open_read("part-000001.parquet")
    with pytest.raises(Unavailable):
        missing.create("part-000001.parquet", lambda sink: sink.write(b"x"))
    with pytest.raises(Unavailable):
        missing.list()


def test_a_reader_of_an_object_replaced_since_its_open_fails_rather_than_mix_versions(s3: S3Bucket) -> None:
    store = S3Store(f"{s3.url}/job")
    store.replace("manifest", lambda sink: sink.write(b"1" * 100))
    stream = store.open_read("manifest")
    store.replace("manifest", lambda sink: sink.write(b"2" * 100))
    with pytest.raises(NotFound), stream:
        stream.read()
