"""The storage seam's contract, run against every store: what batch relies on is what these tests check."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bucket_helpers import BUCKETS
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from s3_helpers import S3Bucket

from batch.storage.base import AlreadyExists, Entry, NotFound, PreconditionFailed, Store, Unavailable
from batch.storage.local import LocalStore
from batch.storage.locations import location, store_at
from batch.storage.memory import MemoryStore
from batch.storage.oss import OSSStore
from batch.storage.s3 import S3Store

STORES = ["local", "memory", *BUCKETS]


def make_store(kind: str, root: Path, bucket: Any = None) -> Store:
    """A store of `kind`: a local folder, memory, or a folder in `bucket` (conftest's BUCKETS) through batch's URL."""
    if kind == "s3":
        assert bucket is not None
        # Small parts, so a test's object crosses into a multipart upload (moto takes parts of 5 MiB and up).
        return S3Store(f"{bucket.url}/{root.name}", multipart_above=6 * 2**20, part_size=5 * 2**20)
    if kind == "oss":
        assert bucket is not None
        return OSSStore(f"{bucket.url}/{root.name}", multipart_above=6 * 2**20, part_size=5 * 2**20)
    if kind in BUCKETS:
        assert bucket is not None
        return store_at(location(f"{bucket.url}/{root.name}"))
    return LocalStore(root) if kind == "local" else MemoryStore()


def bucket_for(request: pytest.FixtureRequest, kind: str) -> Any:
    return request.getfixturevalue(BUCKETS[kind]) if kind in BUCKETS else None


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return make_store(request.param, tmp_path / "root", bucket_for(request, request.param))


def bytes_of(data: bytes):
    return lambda sink: sink.write(data)


def test_create_then_read_and_list(store: Store) -> None:
    version = store.create("batches/file-000001.jsonl", bytes_of(b"line\n"))
    assert store.read_bytes("batches/file-000001.jsonl") == b"line\n"
    assert store.list() == [Entry("batches/file-000001.jsonl", 5, version)]


def test_create_is_exclusive(store: Store) -> None:
    version = store.create("part-000001.parquet", bytes_of(b"first"))
    with pytest.raises(AlreadyExists) as refused:
        store.create("part-000001.parquet", bytes_of(b"second"))
    assert isinstance(refused.value, FileExistsError) and "part-000001.parquet" in str(refused.value)
    assert store.read_bytes("part-000001.parquet") == b"first"
    assert store.list() == [Entry("part-000001.parquet", 5, version)]


def test_two_creators_of_one_key_one_wins(store: Store) -> None:
    won: list[bytes] = []
    lost: list[BaseException] = []
    start = threading.Barrier(8)

    def creator(n: int) -> None:
        data = f"writer {n}".encode()
        start.wait()
        try:
            store.create("_LEASE", bytes_of(data))
            won.append(data)
        except AlreadyExists as exc:
            lost.append(exc)

    threads = [threading.Thread(target=creator, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(lost) == 7
    assert store.read_bytes("_LEASE") == won[0]


def test_replace_returns_a_new_version_and_compare_and_swap_refuses_a_stale_one(store: Store) -> None:
    first = store.replace("manifest.json", bytes_of(b"1"))  # no object yet: made
    second = store.replace("manifest.json", bytes_of(b"2"), if_version=first)
    assert second != first
    with pytest.raises(PreconditionFailed) as refused:
        store.replace("manifest.json", bytes_of(b"3"), if_version=first)
    assert (refused.value.expected, refused.value.found) == (first, second)
    assert store.read_bytes("manifest.json") == b"2"
    assert store.list() == [Entry("manifest.json", 1, second)]


def test_compare_and_swap_on_a_missing_object_fails(store: Store) -> None:
    version = store.create("lease", bytes_of(b"a"))
    store.delete("lease")
    with pytest.raises(PreconditionFailed):
        store.replace("lease", bytes_of(b"b"), if_version=version)
    assert store.list() == []


def test_versions_never_repeat(store: Store) -> None:
    """Same size, same bytes, written as fast as it goes: a compare-and-swap holding an old version must still fail
    (locally, inode numbers are reused and the kernel's file clock is coarse). Where a version names the bytes (S3's
    ETag), the same bytes keep their version and a swap holding the version of other bytes fails."""
    if store.versions_name_bytes:
        first = store.replace("counter", bytes_of(b"x"))
        other = store.replace("counter", bytes_of(b"y"), if_version=first)
        # S3 gives the same bytes their version again; OSS's swapped key a new generation of them: either way, never
        # the version of other bytes
        assert other != first and store.replace("counter", bytes_of(b"y")) != first
        with pytest.raises(PreconditionFailed):
            store.replace("counter", bytes_of(b"z"), if_version=first)
        assert store.read_bytes("counter") == b"y"
        return
    seen = {store.replace("counter", bytes_of(b"x"))}
    for _ in range(60):
        version = store.replace("counter", bytes_of(b"x"))
        assert version not in seen
        seen.add(version)


def test_compare_and_swap_counts_every_increment_under_racing_writers(store: Store) -> None:
    store.create("counter", bytes_of(b"0"))
    swapped = []

    def incrementer() -> None:
        done = 0
        while done < 25:
            entry = store.list("counter")[0]
            value = int(store.read_bytes("counter"))
            try:
                store.replace("counter", bytes_of(str(value + 1).encode()), if_version=entry.version)
            except PreconditionFailed:
                continue
            except NotFound:
                continue
            done += 1
        swapped.append(done)

    threads = [threading.Thread(target=incrementer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert int(store.read_bytes("counter")) == sum(swapped) == 100


def test_open_read_is_seekable_and_parquet_streams_through_both_ways(store: Store) -> None:
    table = pa.table({"id": [f"r{i}" for i in range(1000)], "n": list(range(1000))})

    def write(sink) -> None:
        with pq.ParquetWriter(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=100):
                writer.write_batch(batch)

    store.create("part-000001.parquet", write)
    with store.open_read("part-000001.parquet") as stream:
        part = pq.ParquetFile(stream)
        assert part.metadata.num_row_groups == 10
        assert part.read_row_group(7).column("n").to_pylist() == list(range(700, 800))
        stream.seek(-4, os.SEEK_END)
        assert stream.read(4) == b"PAR1"
        stream.seek(0)
        assert stream.tell() == 0 and stream.read(4) == b"PAR1"


def test_what_open_read_gives_is_a_python_file_read_as_text_lines_and_seeked(store: Store) -> None:
    """Result files are read as text lines (io.TextIOWrapper), and request files uploaded by the openai SDK, which
    takes only an io.IOBase: what any store's open_read gives must be one."""
    store.create("batches/file-000001.output.jsonl", bytes_of(b'{"a": "\xc3\xa9"}\r\n{"b": 2}\n\xff'))
    with store.open_read("batches/file-000001.output.jsonl") as raw, \
            io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as lines:
        assert isinstance(raw, io.IOBase)
        assert list(lines) == ['{"a": "\u00e9"}\n', '{"b": 2}\n', "\ufffd"]
    with store.open_read("batches/file-000001.output.jsonl") as raw:
        assert raw.seek(0, io.SEEK_END) == 23 and raw.tell() == 23
        raw.seek(2)
        assert raw.read(1) == b"a"


def test_open_read_of_a_missing_key_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound) as missing:
        store.open_read("part-000009.parquet")
    assert isinstance(missing.value, FileNotFoundError) and "part-000009.parquet" in str(missing.value)


@pytest.mark.parametrize("op", ["create", "replace"])
def test_a_write_that_raises_leaves_nothing(store: Store, tmp_path: Path, op: str) -> None:
    store.create("kept", bytes_of(b"old"))

    def write(sink) -> None:
        sink.write(b"half of it")
        raise RuntimeError("the writer broke")

    with pytest.raises(RuntimeError, match="the writer broke"):
        getattr(store, op)("kept" if op == "replace" else "new", write)
    assert store.read_bytes("kept") == b"old"
    assert [e.key for e in store.list()] == ["kept"]
    if isinstance(store, LocalStore):  # nor a temp file
        assert sorted(p.name for p in store.root.iterdir()) == ["kept"]


def test_list_takes_a_string_prefix_and_walks_down(store: Store) -> None:
    for key in ["a", "ab", "b/c", "b/d/e", "c"]:
        store.create(key, bytes_of(key.encode()))
    keys = {prefix: [e.key for e in store.list(prefix)] for prefix in ["", "a", "b/", "b/d", "b/d/", "zz", "b/x"]}
    assert keys == {"": ["a", "ab", "b/c", "b/d/e", "c"], "a": ["a", "ab"], "b/": ["b/c", "b/d/e"],
                    "b/d": ["b/d/e"], "b/d/": ["b/d/e"], "zz": [], "b/x": []}
    assert [e.size for e in store.list("b/")] == [3, 5]


def test_delete_removes_and_a_missing_key_is_no_error(store: Store) -> None:
    store.create("part-000001.parquet", bytes_of(b"x"))
    store.delete("part-000001.parquet")
    store.delete("part-000001.parquet")  # a cleanup done twice
    assert store.list() == []
    with pytest.raises(NotFound):
        store.open_read("part-000001.parquet")
    store.create("part-000001.parquet", bytes_of(b"y"))  # the key is free again
    assert store.read_bytes("part-000001.parquet") == b"y"


@pytest.mark.parametrize("key", ["", "/abs", "a/", "a//b", "../up", "a/../b", "./a", ".part.ab12.tmp", "a\0b"])
def test_a_malformed_key_is_refused(store: Store, key: str) -> None:
    with pytest.raises(ValueError, match="storage key"):
        store.create(key, bytes_of(b"x"))
    with pytest.raises(ValueError, match="storage key"):
        store.open_read(key)


def test_local_temp_files_of_a_killed_writer_are_never_listed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.create("batches/file-000001.jsonl", bytes_of(b"{}\n"))
    (tmp_path / ".part-000002.parquet.1f2e3d4c5b6a.tmp").write_bytes(b"half")
    (tmp_path / "batches" / ".file-000002.jsonl.1f2e3d4c5b6a.tmp").write_bytes(b"half")
    assert [e.key for e in store.list()] == ["batches/file-000001.jsonl"]


KILLED_WRITE = """
import os, signal, sys
from batch.storage.local import LocalStore


def write(sink):
    sink.write(b"half an object")
    sink.flush()
    os.kill(os.getpid(), signal.SIGKILL)


LocalStore(sys.argv[1]).replace(sys.argv[2], write)
"""


def leave_a_killed_write(store: Store, key: str, request: pytest.FixtureRequest) -> None:
    """What a writer killed while it wrote `key` leaves: a local store's temp file (a real process, killed -9 in its
    write), an S3 or OSS multipart upload never completed; nothing in memory (a write there is whole or absent)."""
    if isinstance(store, LocalStore):
        killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(store.root), key], check=False)
        assert killed.returncode == -signal.SIGKILL
    elif isinstance(store, S3Store):
        bucket: S3Bucket = request.getfixturevalue("s3")
        bucket.client().create_multipart_upload(Bucket=bucket.name, Key=f"{store.prefix}/{key}")
    elif isinstance(store, OSSStore):
        request.getfixturevalue("oss").client().init_multipart_upload(f"{store.prefix}/{key}")


def left_over(store: Store, request: pytest.FixtureRequest) -> list[str]:
    if isinstance(store, LocalStore):
        return sorted(path.relative_to(store.root).as_posix() for path in store.root.rglob(".*.tmp"))
    if isinstance(store, S3Store):
        bucket: S3Bucket = request.getfixturevalue("s3")
        uploads = bucket.client().list_multipart_uploads(Bucket=bucket.name, Prefix=f"{store.prefix}/")
        return sorted(upload["Key"].removeprefix(f"{store.prefix}/") for upload in uploads.get("Uploads", []))
    if isinstance(store, OSSStore):
        import oss2

        uploads = oss2.MultipartUploadIterator(request.getfixturevalue("oss").client(), prefix=f"{store.prefix}/")
        return sorted(upload.key.removeprefix(f"{store.prefix}/") for upload in uploads)
    return []


def test_clean_up_removes_what_a_killed_write_left_in_its_folder_and_nothing_else(
        store: Store, request: pytest.FixtureRequest) -> None:
    store.create("batches/file-000001.jsonl", bytes_of(b"{}\n"))
    for key in ("batches/file-000002.jsonl", "batches/deeper/file-000003.jsonl", "ledger/00000001.json"):
        leave_a_killed_write(store, key, request)
    leaves_uploads = isinstance(store, LocalStore | S3Store | OSSStore)  # memory, GCS, Azure: nothing to list
    assert len(left_over(store, request)) == (3 if leaves_uploads else 0)
    assert [entry.key for entry in store.list()] == ["batches/file-000001.jsonl"]  # a leftover is never an object
    removed = store.clean_up("batches/")
    assert removed == (1 if leaves_uploads else 0)
    assert all(not leftover.startswith("batches/file-000002") for leftover in left_over(store, request))
    assert len(left_over(store, request)) == (2 if leaves_uploads else 0)  # below, beside
    assert store.clean_up() == 0 and store.clean_up("ledger/") == (1 if left_over(store, request) else 0)
    assert [entry.key for entry in store.list()] == ["batches/file-000001.jsonl"]
    assert store.read_bytes("batches/file-000001.jsonl") == b"{}\n"
    with pytest.raises(ValueError):
        store.clean_up("batches")  # a folder ends in "/"


def test_local_store_reads_files_it_did_not_write(tmp_path: Path) -> None:
    """A checkpoint folder written before the seam existed holds plain files: they are objects like any other."""
    (tmp_path / "batches").mkdir()
    (tmp_path / "batches" / "file-000001.jsonl").write_bytes(b"{}\n")
    store = LocalStore(tmp_path)
    [entry] = store.list("batches/")
    assert entry.key == "batches/file-000001.jsonl" and entry.size == 3
    assert store.replace(entry.key, bytes_of(b"[]\n"), if_version=entry.version) != entry.version


def test_local_store_failures_are_unavailable(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where a folder must be")
    store = LocalStore(tmp_path)
    with pytest.raises(Unavailable) as failed:
        store.create("blocked/part-000001.parquet", bytes_of(b"x"))
    assert isinstance(failed.value, OSError) and "blocked/part-000001.parquet" in str(failed.value)


# -- the in-memory store's injected faults ----------------------------------------------------------------


def test_an_unavailable_write_does_nothing() -> None:
    store = MemoryStore()
    store.inject("create", 2, "unavailable")
    store.create("a", bytes_of(b"1"))
    with pytest.raises(Unavailable, match="call 2 of create"):
        store.create("b", bytes_of(b"2"))
    store.create("c", bytes_of(b"3"))  # only the 2nd call
    assert [e.key for e in store.list()] == ["a", "c"]


def test_a_lost_reply_hides_a_write_that_took_effect() -> None:
    store = MemoryStore()
    store.inject("replace", 1, "lost_reply")
    with pytest.raises(Unavailable, match="reply"):
        store.replace("manifest", bytes_of(b"new"))
    assert store.read_bytes("manifest") == b"new"
    with pytest.raises(AlreadyExists):  # a retried exclusive create learns it had won
        store.create("manifest", bytes_of(b"new"))


def test_a_torn_write_keeps_half_the_object() -> None:
    table = pa.table({"n": list(range(100))})
    store = MemoryStore([("create", 1, "torn")])
    store.create("part-000001.parquet", lambda sink: pq.write_table(table, sink))
    with store.open_read("part-000001.parquet") as stream, pytest.raises(pa.ArrowInvalid):
        pq.ParquetFile(stream)


def test_reads_lists_and_deletes_fail_as_injected() -> None:
    store = MemoryStore([("open_read", 1, "unavailable"), ("list", 1, "unavailable"), ("delete", 1, "lost_reply")])
    store.create("a", bytes_of(b"1"))
    with pytest.raises(Unavailable):
        store.open_read("a")
    with pytest.raises(Unavailable):
        store.list()
    with pytest.raises(Unavailable):
        store.delete("a")
    assert store.list() == []
    assert store.calls == {"create": 1, "open_read": 1, "list": 2, "delete": 1}


# -- any sequence of calls, against a dict as the model ------------------------------------------------

KEYS = st.sampled_from(["p", "q", "part-000001.parquet", "d/x", "d/y", "d/e/z"])
DATA = st.binary(max_size=64)
PREFIXES = st.sampled_from(["", "p", "d", "d/", "d/e", "part-", "x"])


class StoreAgainstModel(RuleBasedStateMachine):
    """Every store gives the answers a dict of key -> (bytes, version) gives, for any sequence of calls."""

    kind = "local"

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="store-model-"))
        self.store = make_store(self.kind, self.root, getattr(self, "bucket", None))
        self.model: dict[str, tuple[bytes, str]] = {}
        self.old_versions: set[str] = set()
        self.bytes_of_version: dict[str, bytes] = {}

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _keep(self, key: str, data: bytes, version: str) -> None:
        if self.store.versions_name_bytes:  # one version per bytes, another for other bytes
            self.bytes_of_version.setdefault(version, data)
            assert self.bytes_of_version[version] == data
        else:
            assert version not in self.old_versions and all(version != v for _, v in self.model.values())
        if key in self.model:
            self.old_versions.add(self.model[key][1])
        self.model[key] = (data, version)

    @rule(key=KEYS, data=DATA)
    def create(self, key: str, data: bytes) -> None:
        if key in self.model:
            with pytest.raises(AlreadyExists):
                self.store.create(key, bytes_of(data))
        else:
            self._keep(key, data, self.store.create(key, bytes_of(data)))

    @rule(key=KEYS, data=DATA)
    def replace(self, key: str, data: bytes) -> None:
        self._keep(key, data, self.store.replace(key, bytes_of(data)))

    @precondition(lambda self: self.model)
    @rule(data=DATA, pick=st.randoms(use_true_random=False))
    def swap_current(self, data: bytes, pick) -> None:
        key = pick.choice(sorted(self.model))
        self._keep(key, data, self.store.replace(key, bytes_of(data), if_version=self.model[key][1]))

    @precondition(lambda self: self.old_versions)
    @rule(key=KEYS, data=DATA, pick=st.randoms(use_true_random=False))
    def swap_stale(self, key: str, data: bytes, pick) -> None:
        stale = pick.choice(sorted(self.old_versions))
        if key in self.model and self.model[key][1] == stale:  # the same bytes again, where versions name them
            self._keep(key, data, self.store.replace(key, bytes_of(data), if_version=stale))
            return
        with pytest.raises(PreconditionFailed):
            self.store.replace(key, bytes_of(data), if_version=stale)

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        self.store.delete(key)
        if key in self.model:
            self.old_versions.add(self.model.pop(key)[1])

    @rule(key=KEYS)
    def read(self, key: str) -> None:
        if key in self.model:
            assert self.store.read_bytes(key) == self.model[key][0]
        else:
            with pytest.raises(NotFound):
                self.store.open_read(key)

    @rule(prefix=PREFIXES)
    def listed(self, prefix: str) -> None:
        assert self.store.list(prefix) == sorted(Entry(k, len(d), v) for k, (d, v) in self.model.items()
                                                 if k.startswith(prefix))

    @invariant()
    def lists_the_model(self) -> None:
        assert [(e.key, e.version) for e in self.store.list()] == sorted((k, v) for k, (_, v) in self.model.items())


class BucketStoreAgainstModel(StoreAgainstModel):
    bucket: Any = None  # the test's, set by its fixture below


def bucket_for_the_model(kind: str) -> Any:
    """The test case of a machine on a bucket of `kind`, the bucket handed to it by a fixture."""

    class OnBucket(BucketStoreAgainstModel):
        pass

    OnBucket.kind = kind

    @pytest.fixture
    def given_a_bucket(request: pytest.FixtureRequest) -> None:
        OnBucket.bucket = request.getfixturevalue(BUCKETS[kind])

    # Each step on a bucket is a request or two to its server: fewer sequences again.
    OnBucket.TestCase.settings = settings(max_examples=5, stateful_step_count=20)
    return given_a_bucket, pytest.mark.usefixtures(f"bucket_for_the_{kind}_model")(OnBucket.TestCase)


class LocalStoreAgainstModel(StoreAgainstModel):
    kind = "local"


class MemoryStoreAgainstModel(StoreAgainstModel):
    kind = "memory"


# Each local step fsyncs a file and a folder: fewer, shorter sequences keep the test to a few seconds.
LocalStoreAgainstModel.TestCase.settings = settings(max_examples=25, stateful_step_count=20)
TestLocalStoreAgainstModel = LocalStoreAgainstModel.TestCase
TestMemoryStoreAgainstModel = MemoryStoreAgainstModel.TestCase
bucket_for_the_s3_model, TestS3StoreAgainstModel = bucket_for_the_model("s3")
bucket_for_the_gs_model, TestGCSStoreAgainstModel = bucket_for_the_model("gs")
bucket_for_the_az_model, TestAzureStoreAgainstModel = bucket_for_the_model("az")
bucket_for_the_oss_model, TestOSSStoreAgainstModel = bucket_for_the_model("oss")
