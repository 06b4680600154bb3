"""The stores on object storage (S3 on moto, GCS on fake-gcs-server, Azure on Azurite), beyond the contract suite:
what goes over the wire (every create exclusive, every swap conditional, as each server's request log shows), a
big object's upload, and a missing bucket."""

from __future__ import annotations

import os

import pytest
from bucket_helpers import CREATE, SWAP, UNCONDITIONAL, GCSBucket

from batch.storage.base import AlreadyExists, NotFound, PreconditionFailed, Store, Unavailable
from batch.storage.gcs import GCSStore
from batch.storage.lease import LEASE_KEY
from batch.storage.locations import location, store_at


def store_in(bucket, folder: str = "job") -> Store:
    return store_at(location(f"{bucket.url}/{folder}"))


def test_every_create_is_exclusive_and_every_swap_conditional_on_the_wire(bucket) -> None:
    """A part, the lease and the _SUCCESS marker are each made by an exclusive create, which refuses a second
    create of the name; the lease is swapped on the version read, which refuses a stale one."""
    store = store_in(bucket)
    store.create("part-000001-e1.parquet", lambda sink: sink.write(b"a"))
    first = store.create(LEASE_KEY, lambda sink: sink.write(b"1"))
    second = store.replace(LEASE_KEY, lambda sink: sink.write(b"2"), if_version=first)
    store.create("_SUCCESS", lambda sink: sink.write(b"{}"))
    for key in ("part-000001-e1.parquet", LEASE_KEY, "_SUCCESS"):
        with pytest.raises(AlreadyExists):
            store.create(key, lambda sink: sink.write(b"again"))
    with pytest.raises(PreconditionFailed) as refused:
        store.replace(LEASE_KEY, lambda sink: sink.write(b"3"), if_version=first)
    assert refused.value.found == second
    store.replace("summary.json", lambda sink: sink.write(b"{}"))  # a replace without a version asks for nothing
    assert store.read_bytes("part-000001-e1.parquet") == b"a" and store.read_bytes(LEASE_KEY) == b"2"
    assert store.read_bytes("_SUCCESS") == b"{}"
    assert bucket.writes() == [
        ("job/part-000001-e1.parquet", CREATE),
        ("job/_LEASE", CREATE),
        ("job/_LEASE", SWAP),
        ("job/_SUCCESS", CREATE),
        ("job/part-000001-e1.parquet", CREATE),
        ("job/_LEASE", CREATE),
        ("job/_SUCCESS", CREATE),
        ("job/_LEASE", SWAP),
        ("job/summary.json", UNCONDITIONAL),
    ]


def test_a_missing_bucket_is_unavailable_and_a_missing_key_not_found(bucket) -> None:
    with pytest.raises(NotFound):
        store_in(bucket).open_read("part-000001.parquet")
    with pytest.raises(NotFound):
        store_in(bucket).read_bytes("part-000001.parquet")
    missing = store_at(location(f"{bucket.url}-missing/job"))
    for call in (lambda: missing.open_read("part-000001.parquet"), lambda: missing.read_bytes("_LEASE"),
                 lambda: missing.create("part-000001.parquet", lambda sink: sink.write(b"x")), missing.list):
        with pytest.raises(Unavailable, match="bucket does not exist"):
            call()


def test_a_big_object_on_gcs_goes_up_resumable_its_create_conditional(gcs: GCSBucket) -> None:
    """Past resumable_above an object goes up in chunks, the condition on the request that starts the upload (GCS
    checks it when the object is made; this emulator checks it on single-request uploads only, so the request log
    is what shows it here)."""
    store = GCSStore(f"{gcs.url}/job", resumable_above=2**20, chunk_size=2**18)
    data = os.urandom(3 * 2**20 + 5)
    store.create("final.parquet", lambda sink: sink.write(data))
    assert store.read_bytes("final.parquet") == data
    with store.open_read("final.parquet") as stream:
        stream.seek(len(data) - 10)
        assert stream.read() == data[-10:]
    assert gcs.writes() == [("job/final.parquet", CREATE)]
