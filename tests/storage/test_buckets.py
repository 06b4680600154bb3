"""The stores on object storage (S3 on moto, GCS on fake-gcs-server, Azure on Azurite), beyond the contract suite:
what goes over the wire (every create exclusive, every swap conditional, as each server's request log shows), a
big object's upload, and a missing bucket."""

from __future__ import annotations

import asyncio
import copy
import os
import socket

import aiohttp
import botocore.config
import botocore.exceptions
import botocore.session
import pytest
from bucket_helpers import CREATE, SWAP, UNCONDITIONAL, GCSBucket
from helpers import free_port
from hypothesis import given
from hypothesis import strategies as st

from batch.storage.base import (
    AlreadyExists,
    NotFound,
    PreconditionFailed,
    Store,
    Unavailable,
    Unreachable,
    is_unreachable,
)
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


NETWORK_FAILURES = [ConnectionRefusedError(111, "refused"), ConnectionResetError(104, "reset"), TimeoutError("slow"),
                    socket.gaierror(-2, "Name or service not known")]
OTHER_FAILURES = [PermissionError(13, "denied"), FileNotFoundError(2, "none"), ValueError("bad"), OSError(0, "else"),
                  KeyError("k"), RuntimeError("wrapped")]


def chained(errors: list[BaseException], links: list[str]) -> BaseException:
    """errors[0] raised from errors[1] (as its cause, or while handling it), raised from errors[2], and so on."""
    for outer, inner, link in zip(errors, errors[1:], links, strict=False):
        if link == "cause":
            outer.__cause__ = inner
        else:
            outer.__context__ = inner
    return errors[0]


@given(data=st.data(), length=st.integers(1, 6), network_at=st.one_of(st.none(), st.integers(0, 5)),
       cycle=st.booleans())
def test_a_failure_is_unreachable_exactly_when_a_network_error_is_in_its_chain(data, length, network_at, cycle):
    """What each library raises wraps the socket's error somewhere in its chain (by `from` or within an `except`);
    a chain that loops back on itself ends the walk."""
    errors = [copy.copy(data.draw(st.sampled_from(OTHER_FAILURES))) for _ in range(length)]
    if network_at is not None and network_at < length:
        errors[network_at] = copy.copy(data.draw(st.sampled_from(NETWORK_FAILURES)))
    links = data.draw(st.lists(st.sampled_from(["cause", "context"]), min_size=length, max_size=length))
    failure = chained(errors, links)
    if cycle:
        errors[-1].__context__ = errors[0]
    assert is_unreachable(failure) == (network_at is not None and network_at < length)


def test_each_librarys_real_failure_to_connect_is_unreachable() -> None:
    """aiohttp's (gcsfs, adlfs, s3fs underneath) and botocore's, raised by a real connection to a closed port."""
    async def connect() -> None:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{free_port()}/"):
            pass

    with pytest.raises(aiohttp.ClientConnectorError) as aiohttp_error:
        asyncio.run(connect())
    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=f"http://127.0.0.1:{free_port()}", region_name="us-east-1", aws_access_key_id="a",
        aws_secret_access_key="b", config=botocore.config.Config(retries={"max_attempts": 0}))
    with pytest.raises(botocore.exceptions.EndpointConnectionError) as botocore_error:
        client.list_buckets()
    assert is_unreachable(aiohttp_error.value) and is_unreachable(botocore_error.value)
    assert not is_unreachable(botocore.exceptions.NoCredentialsError())


def test_an_s3_store_whose_server_does_not_answer_is_unreachable(s3, monkeypatch) -> None:
    """A store on a server that is down (nothing listens on its port) raises Unreachable, a kind of Unavailable.
    S3's retries cut to one attempt here; gcsfs retries a refused connection for 34 s and azure-core for 85 s, so
    their errors' classification is checked on the real errors above."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(Unreachable, match="Could not connect"):
        store_in(s3).list()
