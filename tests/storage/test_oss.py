"""What is OSS's own in batch.storage.oss, on the project's OSS server (tests/oss_server.py) on 127.0.0.1: the
compare-and-swap built from exclusive creates (generations), a versioned bucket refused, the endpoint and credentials
from OSS_* variables, an outage exit 75, and a zombie holder of a shard's lease stopped by its next renewal. What every
bucket store does (the seam's contract, a job end to end, kill -9, two hosts at once) runs on OSS with the others
(the `bucket` fixture)."""

from __future__ import annotations

import json
import os
import signal
import time

import oss2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import free_port, start_run, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from oss2.exceptions import RequestError
from test_s3_jobs import ROWS, on_bucket, output_on, refused_in_one_line, resume_taken_over

from batch.errors import EXIT_UNREACHABLE
from batch.storage.base import AlreadyExists, NotFound, PreconditionFailed, Unavailable
from batch.storage.lease import LEASE_KEY
from batch.storage.locations import location, store_at
from batch.storage.oss import GENERATION, LATEST, OSSStore, _no_answer


def bytes_of(data: bytes):
    return lambda sink: sink.write(data)


def test_a_swapped_key_is_its_newest_generation_and_no_reader_sees_one(oss) -> None:
    store = OSSStore(f"{oss.url}/job")
    version = store.create(LEASE_KEY, bytes_of(b"0"))
    for n in range(1, 4):
        version = store.replace(LEASE_KEY, bytes_of(str(n).encode()), if_version=version)
    store.create("part-000001-e1.parquet", bytes_of(b"part"))
    generations = [key for key in oss.keys("job/") if GENERATION in key]
    # named newest first, so one listing of one object finds the newest
    assert generations == [f"job/{LEASE_KEY}{GENERATION}{LATEST - n:012d}" for n in (3, 2, 1)]
    assert [(entry.key, entry.size, entry.version) for entry in store.list()] == [
        (LEASE_KEY, 1, version), ("part-000001-e1.parquet", 4, store.list("part-")[0].version)]
    sent_before = len(oss.server.requests())
    assert store.read_bytes(LEASE_KEY) == b"3"
    assert [(r["method"], r["query"].get("max-keys")) for r in oss.server.requests()[sent_before:]] == [
        ("GET", "1"), ("GET", None)]  # the newest generation's name, then its bytes: however many there are
    with store.open_read(LEASE_KEY) as stream:
        assert stream.read() == b"3"
    with pytest.raises(PreconditionFailed) as stale:  # a holder of an older generation finds its successor taken
        store.replace(LEASE_KEY, bytes_of(b"zombie"), if_version=store.list()[0].version.replace("3)", "1)"))
    assert stale.value.found == version and store.read_bytes(LEASE_KEY) == b"3"
    store.delete(LEASE_KEY)
    assert [key for key in oss.keys("job/") if LEASE_KEY in key] == []
    with pytest.raises(NotFound):
        store.read_bytes(LEASE_KEY)
    with pytest.raises(PreconditionFailed):  # a swap of a key deleted since takes its write back
        store.replace(LEASE_KEY, bytes_of(b"late"), if_version=version)
    assert [key for key in oss.keys("job/") if LEASE_KEY in key] == []


def test_an_object_replaced_while_it_is_read_fails_the_read_not_mixing_two_versions(oss) -> None:
    store = OSSStore(f"{oss.url}/job", read_whole_up_to=0)  # read in ranges
    store.replace("summary.json", bytes_of(b"0123456789"))
    with store.open_read("summary.json") as stream:
        assert stream.read(4) == b"0123"
        store.replace("summary.json", bytes_of(b"abcdefghij"))
        with pytest.raises(NotFound):
            stream.read(4)


def test_a_generation_no_other_can_follow_is_an_error_not_a_loop(oss) -> None:
    """Objects under a key's generations that batch did not write (an earlier build numbered them up) named a last
    generation: the next swap's name went negative, which no listing finds, and the lease's take-over looped."""
    store = OSSStore(f"{oss.url}/job")
    store.create(LEASE_KEY, bytes_of(b"0"))
    oss.put(f"job/{LEASE_KEY}{GENERATION}000000000000", b"1")
    with pytest.raises(Unavailable, match="no generation can follow"):
        store.replace(LEASE_KEY, bytes_of(b"2"), if_version=store.list()[0].version)


def test_a_part_is_read_in_one_get_not_a_range_per_column_chunk(oss) -> None:
    """Parquet reads a file in many small ranges: ~20 GETs a part (13,207 for 300 one-row parts, 25 s on
    localhost, in a black-box pass), which a run's end made past the lease's ttl."""
    store = OSSStore(f"{oss.url}/job")
    table = pa.table({f"column_{n}": list(range(100)) for n in range(12)})
    store.create("part-000001-e1.parquet", lambda sink: pq.write_table(table, sink))
    sent_before = len(oss.server.requests())
    with store.open_read("part-000001-e1.parquet") as stream:
        assert pq.read_table(stream).equals(table)
    assert [r["method"] for r in oss.server.requests()[sent_before:]] == ["GET", "HEAD", "GET"]  # list, head, get


def test_a_big_object_goes_up_in_parts_and_its_exclusive_create_is_refused_before_its_parts_are_sent(oss) -> None:
    store = OSSStore(f"{oss.url}/job", multipart_above=256 * 1024, part_size=128 * 1024)  # OSS's least: 100 KB
    data = os.urandom(600 * 1024)
    store.create("final.parquet", bytes_of(data))
    with pytest.raises(AlreadyExists):
        store.create("final.parquet", bytes_of(os.urandom(300 * 1024)))
    assert store.read_bytes("final.parquet") == data
    with store.open_read("final.parquet") as stream:
        stream.seek(100_000)
        assert stream.read(10) == data[100_000:100_010]
    sent = [(request["method"], request["query"]) for request in oss.server.requests()
            if request["path"] == f"/{oss.name}/job/final.parquet" and request["method"] in ("PUT", "POST")]
    assert [method for method, _ in sent] == ["POST", "PUT", "PUT", "PUT", "PUT", "PUT", "POST", "POST"], sent
    assert all(request["headers"].get("x-oss-forbid-overwrite") == "true" for request in oss.server.requests()
               if request["method"] == "POST" and request["path"] == f"/{oss.name}/job/final.parquet")
    assert list(oss2.MultipartUploadIterator(oss.client())) == []  # the refused one never began


def test_a_bucket_with_versioning_on_is_refused_in_one_line_before_anything_is_sent(sim, make_job, run_cli, oss,
                                                                                     tmp_path):
    """OSS ignores x-oss-forbid-overwrite where versioning is on: every part would be written over, silently."""
    job = on_bucket(make_job, sim, oss, tmp_path)
    oss.client().put_bucket_versioning(_versioning("Enabled"))
    before = oss.keys()
    line = refused_in_one_line(run_cli, job)
    assert f"oss://{oss.name} has versioning Enabled, where OSS ignores x-oss-forbid-overwrite" in line, line
    assert sim.stats()["requests"] == 0 and oss.keys() == before and not (tmp_path / "local").exists()


def test_versioning_unreadable_for_want_of_a_permission_is_refused_and_a_failing_server_is_unavailable(oss) -> None:
    oss.server.fail_next(1, status=503, code="ServiceUnavailable")  # the first call: the versioning's
    store = OSSStore(f"{oss.url}/job")
    with pytest.raises(Unavailable, match="ServiceUnavailable"):
        store.list()
    assert store.list() == []  # asked again, and found off
    other = f"{oss.name}-2"  # its versioning not asked yet
    oss2.Bucket(oss.client().auth, oss.server.endpoint, other).create_bucket()
    oss.server.fail_next(1, status=403, code="AccessDenied")
    with pytest.raises(ValueError, match="allow oss:GetBucketVersioning"):
        OSSStore(f"oss://{other}/job").list()


def test_an_endpoint_of_another_scheme_is_one_line_naming_the_variable(sim, make_job, run_cli, oss, tmp_path,
                                                                        monkeypatch):
    """oss2 made a host name of `ftp://...` and the run waited out a connection: exit 75, retried for ever by an
    orchestrator, for a mistake in the environment."""
    job = on_bucket(make_job, sim, oss, tmp_path)
    monkeypatch.setenv("OSS_ENDPOINT", "ftp://oss-cn-hangzhou.aliyuncs.com")
    line = refused_in_one_line(run_cli, job)
    assert "OSS_ENDPOINT ftp://oss-cn-hangzhou.aliyuncs.com is not an http:// or https:// URL" in line, line


def test_an_export_to_a_bucket_it_cannot_write_or_to_a_folder_is_one_line(sim, make_job, run_cli, oss, tmp_path):
    job = on_bucket(make_job, sim, oss, tmp_path)
    code, _, err = run_cli("run", job)
    assert code == 0, err
    versioned = f"{oss.name}-versioned"
    oss2.Bucket(oss.client().auth, oss.server.endpoint, versioned).create_bucket()
    oss2.Bucket(oss.client().auth, oss.server.endpoint, versioned).put_bucket_versioning(_versioning("Enabled"))
    for to, said in ((f"oss://{versioned}/exports/out.csv", "has versioning Enabled"),
                     (f"{oss.url}/exports/", "is a folder: name the file to write")):
        code, _, err = run_cli("export", job, "--format", "csv", "--to", to)
        assert code == 2 and len(err.strip().splitlines()) == 1 and said in err, (to, err)
    assert [key for key in oss.keys() if key.startswith("exports")] == []


@pytest.mark.parametrize("unset", ["OSS_ENDPOINT", "OSS_ACCESS_KEY_SECRET"])
def test_a_missing_endpoint_or_credentials_is_one_line_naming_the_variable(sim, make_job, run_cli, oss, tmp_path,
                                                                           monkeypatch, unset):
    job = on_bucket(make_job, sim, oss, tmp_path)
    monkeypatch.delenv(unset)
    line = refused_in_one_line(run_cli, job)
    assert ("OSS_ENDPOINT" if unset == "OSS_ENDPOINT" else "OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET") in line
    assert "testing-secret" not in line and sim.stats()["requests"] == 0


def test_a_name_oss_takes_for_no_bucket_is_one_line(sim, make_job, run_cli, oss, tmp_path):
    job = on_bucket(make_job, sim, oss, tmp_path, output={"path": "oss://Not_A_Bucket/out/result.parquet"})
    line = refused_in_one_line(run_cli, job)
    assert "oss://Not_A_Bucket: not a bucket name OSS takes" in line and sim.stats()["requests"] == 0


def test_an_oss_endpoint_that_does_not_answer_is_exit_75(sim, make_job, run_cli, oss, tmp_path, monkeypatch):
    job = on_bucket(make_job, sim, oss, tmp_path)
    monkeypatch.setenv("OSS_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    code, _, err = run_cli("run", job)
    assert code == EXIT_UNREACHABLE and len(err.strip().splitlines()) == 1, err
    assert "does not answer" in err and "testing-secret" not in err and sim.stats()["requests"] == 0


def test_the_oss_secret_is_masked_even_when_an_error_quotes_it(sim, make_job, run_cli, oss, tmp_path, monkeypatch):
    job = on_bucket(make_job, sim, oss, tmp_path, output={"path": "oss://testing-secret/out/result.parquet"})
    code, out, err = run_cli("run", job)
    assert code == 2 and "testing-secret" not in out + err, err


def test_a_zombie_holder_on_oss_is_stopped_by_its_next_renewal_and_the_job_done_once(start_sim, make_job, run_cli, oss,
                                                                                    tmp_path):
    """A shard's run paused (SIGSTOP) loses its lease (1 s ttl) to a run on another host, which does the shard;
    resumed, the zombie's renewal (a swap from the generation it last wrote) is refused: exit 4, and the merge holds
    each row once."""
    rows = ROWS[:24]
    sim = start_sim(latency_ms=300)
    job = on_bucket(make_job, sim, oss, tmp_path, rows=rows, shards=1,
                    limits={"concurrency": 2, "timeout_s": 120},
                    output={"checkpoint_rows": 1, "checkpoint_lease_s": 1})
    other_host = job.with_name("job-other-host.yaml")
    other_host.write_text(job.read_text().replace(str(tmp_path / "local"), str(tmp_path / "local-2")))
    folder = "out/result.checkpoint/shard=0-of-1/"
    checkpoint = store_at(location(f"{oss.url}/{folder}"))
    zombie = start_run(job, "--shard", "0/1")
    try:
        wait_until(lambda: any("-e1." in key for key in oss.keys(folder)) and sim.stats()["in_flight"] > 0,
                   "a part written, requests in flight")
        os.kill(zombie.pid, signal.SIGSTOP)
        wait_until(lambda: json.loads(checkpoint.read_bytes(LEASE_KEY))["expires_at"] < time.time(),
                   "the paused run's lease to expire")
        code, _, err = run_cli("run", other_host, "--shard", "0/1")  # takes the lease over: epoch 2
        assert code == 0, err
        assert json.loads(checkpoint.read_bytes(LEASE_KEY))["epoch"] == 2
        resume_taken_over(zombie)
    finally:
        zombie.kill()
        zombie.communicate()
    assert json.loads(checkpoint.read_bytes("_SUCCESS"))["ok"] == len(rows)
    code, _, err = run_cli("merge", job)
    assert code == 0, err
    merged = output_on(oss)
    assert list(merged["review_id"]) == [row["review_id"] for row in rows] and (merged["status"] == "ok").all()
    # every lease write an exclusive create: of _LEASE (the first run's, the second's attempt before it read the
    # lease), then of its next generation (a renewal, the take-over: "swap")
    lease_writes = [condition for key, condition in oss.writes() if key.endswith(LEASE_KEY)]
    assert lease_writes[0] == "create" and lease_writes.count("create") == 2 and set(lease_writes) == {"create", "swap"}
    unconditional = [request for request in oss.server.requests() if request["method"] == "PUT"
                     and request["path"].startswith(f"/{oss.name}/") and GENERATION in request["path"]
                     and request["headers"].get("x-oss-forbid-overwrite") != "true"]
    assert not unconditional, unconditional


def _versioning(status: str):
    config = oss2.models.BucketVersioningConfig()
    config.status = status
    return config


@settings(max_examples=200)
@given(st.lists(st.sampled_from(["plain", "socket", "library"]), min_size=1, max_size=8),
       st.integers(min_value=-1, max_value=7))
def test_a_request_without_an_answer_says_the_deepest_socket_error_of_any_chain(kinds, loop_to) -> None:
    """oss2 keeps requests' error aside, which keeps urllib3's, which keeps the socket's: whatever the chain (a cycle
    included), the line says the socket's reason found deepest, else requests' own, and never walks for ever."""
    chain = [ConnectionRefusedError(111, f"socket {i}") if kind == "socket" else
             OSError(f"library {i}") if kind == "library" else ValueError(f"plain {i}") for i, kind in enumerate(kinds)]
    for outer, inner in zip(chain, chain[1:]):
        outer.__context__ = inner
    if 0 <= loop_to < len(chain):
        chain[-1].__context__ = chain[loop_to]
    said = str(_no_answer(RequestError(chain[0])))
    sockets = [error.strerror for error in chain if isinstance(error, ConnectionRefusedError)]
    assert said == (sockets[-1] if sockets else str(chain[0]).splitlines()[0] or type(chain[0]).__name__)
