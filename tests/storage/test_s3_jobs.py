"""A job whose input, checkpoint and output are on object storage (S3 on a moto server, GCS on fake-gcs-server,
Azure on Azurite, OSS on the project's own server, each on 127.0.0.1; the `bucket` fixture runs a test on each),
against the simulator: it runs end to end, resumes after kill -9 with its local folder kept or lost, writes every part
with an exclusive create, two hosts starting it at once run it once, and a bad URL, a missing bucket or missing
credentials stop it in one line before anything is sent or written."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from bucket_helpers import CREATE, SWAP
from helpers import free_port, start_run, wait_until
from s3_helpers import S3Bucket

import batch
from batch.checkpoint.guard import RunLock
from batch.config import load_job
from batch.errors import EXIT_BATCHES_LIVE, EXIT_UNREACHABLE, ConfigError
from batch.simulator.answers import reply_marker
from batch.storage.lease import LEASE_KEY
from batch.storage.locations import WRITABLE
from batch.storage.s3 import S3Store

ROWS = [{"review_id": f"s{i:03d}", "text": f"stored {i}"} for i in range(200)]


def on_bucket(make_job, sim, bucket, tmp_path: Path, rows=ROWS, **overrides) -> Path:
    """A job reading SCHEME://BUCKET/in/reviews.csv and writing SCHEME://BUCKET/out/result.parquet."""
    body = io.BytesIO()
    pd.DataFrame(rows).to_csv(body, index=False)
    bucket.put("in/reviews.csv", body.getvalue())
    output = {"path": f"{bucket.url}/out/result.parquet", "local_dir": str(tmp_path / "local"),
              **overrides.pop("output", {})}
    return make_job(sim, rows=rows, input_file="unused.csv", input={"path": f"{bucket.url}/in/reviews.csv"},
                    output=output, **overrides)


def output_on(bucket) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(bucket.get("out/result.parquet")))


def parts_on(bucket) -> list[str]:
    return [key for key in bucket.keys("out/result.checkpoint/") if key.rsplit("/", 1)[1].startswith("part-")]


def test_a_job_on_a_bucket_runs_end_to_end_and_every_part_is_an_exclusive_create(sim, make_job, run_cli, bucket,
                                                                                 tmp_path):
    job = on_bucket(make_job, sim, bucket, tmp_path, output={"checkpoint_rows": 50})
    code, _, err = run_cli("run", job)
    assert code == 0, err
    result = output_on(bucket)
    assert list(result["review_id"]) == [row["review_id"] for row in ROWS]
    assert (result["status"] == "ok").all() and list(result["text"]) == [row["text"] for row in ROWS]
    assert sim.stats()["requests"] == len(ROWS)
    # Nothing of the checkpoint's objects is on the local disk: only what cannot be an object (the log, the lock).
    assert not list((tmp_path / "local").glob("part-*")) and (tmp_path / "local" / "wal.jsonl").exists()
    assert not (tmp_path / "out").exists()
    writes = bucket.writes()
    part_writes = [(key, condition) for key, condition in writes if key.rsplit("/", 1)[1].startswith("part-")]
    assert len(part_writes) >= len(ROWS) // 50
    assert all(condition == CREATE for _, condition in part_writes), part_writes
    assert {key for key, _ in part_writes} >= set(parts_on(bucket))
    # The lease taken by an exclusive create, then only swapped; the shard's end marker an exclusive create.
    lease_writes = [condition for key, condition in writes if key.endswith(f"/{LEASE_KEY}")]
    assert lease_writes[0] == CREATE and set(lease_writes[1:]) <= {SWAP}, lease_writes
    # A rerun sends nothing and keeps the output as it is.
    code, _, err = run_cli("run", job)
    assert code == 0, err
    assert sim.stats()["requests"] == len(ROWS)


@pytest.mark.parametrize("local_disk", ["kept", "lost"])
def test_a_job_on_a_bucket_killed_9_resumes_from_the_bucket(start_sim, make_job, run_cli, bucket, tmp_path,
                                                           local_disk):
    """A host lost with its disk (the local folder gone) re-sends at most what was in flight plus one part's window;
    with the folder kept, at most what was in flight."""
    concurrency, window = 4, 20
    sim = start_sim(latency_ms=20)
    job = on_bucket(make_job, sim, bucket, tmp_path, limits={"concurrency": concurrency},
                    output={"checkpoint_rows": window, "checkpoint_seconds": 60})
    process = start_run(job)
    try:
        wait_until(lambda: len(parts_on(bucket)) >= 3, "three parts in the bucket")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        process.kill()
        process.communicate()
    if local_disk == "lost":
        for path in (tmp_path / "local").iterdir():
            path.unlink()
        (tmp_path / "local").rmdir()
    sim.reconfigure(latency_ms=0)
    code, _, err = run_cli("run", job)
    assert code == 0, err
    resent = sim.stats()["requests"] - len(ROWS)
    bound = concurrency + (window if local_disk == "lost" else 0)
    assert 0 <= resent <= bound, resent
    result = output_on(bucket)
    assert list(result["review_id"]) == [row["review_id"] for row in ROWS] and (result["status"] == "ok").all()
    for key in parts_on(bucket):
        pq.read_table(io.BytesIO(bucket.get(key)))  # no part half written


def refused_in_one_line(run_cli, job: Path) -> str:
    """The one line `validate` and `run` exit 2 with (the run's), naming the job file and the key at fault. The
    commands that only read a job check what a run does, before they read (they said "internal error")."""
    export = ["--format", "csv", "--to", job.parent / "out.csv"]
    for command in ("validate", "status", "estimate", "export", "merge", "run"):
        code, out, err = run_cli(command, job, *(export if command == "export" else []))
        assert code == 2, (command, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert str(job) in lines[0] and ("output.path" in lines[0] or "input.path" in lines[0]), lines[0]
    with pytest.raises(ConfigError, match="output.path|input.path"):
        batch.read_results(job)
    return lines[0]


@pytest.mark.parametrize("key", ["output.path", "input.path"])
def test_a_missing_bucket_is_one_line_before_anything_is_sent(sim, make_job, run_cli, bucket, tmp_path, key):
    job = on_bucket(make_job, sim, bucket, tmp_path)
    place = f"{bucket.url}/out/" if key == "output.path" else f"{bucket.url}/in/"
    job.write_text(job.read_text().replace(place, place.replace(bucket.url, f"{bucket.url}-missing")))
    before = bucket.keys()
    if key == "output.path":
        line = refused_in_one_line(run_cli, job)
        assert key in line and "the bucket does not exist" in line, line
    for command in ("validate", "run"):  # the input's: as a local file missing (OSS's said the reply as a dict)
        code, _, err = run_cli(command, job)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "{" not in err, err
    assert sim.stats()["requests"] == 0
    assert bucket.keys() == before and not (tmp_path / "local").exists()
    assert not [key for key, _ in bucket.writes() if key != "in/reviews.csv"]


@pytest.mark.parametrize("kind", ["s3", "oss"])
def test_an_output_on_a_bucket_tangled_with_a_folder_or_a_checkpoint_is_refused_as_on_disk(sim, make_job, run_cli,
                                                                                           request, tmp_path, kind):
    """The local checks of output.path, on a bucket too: `validate` and `run` went on (and wrote a checkpoint inside
    another's, or beside objects under the output's name)."""
    bucket = request.getfixturevalue(kind)
    job = on_bucket(make_job, sim, bucket, tmp_path, rows=ROWS[:5])
    code, _, err = run_cli("run", job)
    assert code == 0, err
    text = job.read_text()
    bucket.put("out/taken.parquet/notes.txt", b"a folder's object")
    cases = {f"{bucket.url}/out/result.checkpoint/x.parquet": "is inside the checkpoint folder",
             f"{bucket.url}/out/taken.parquet": "is a folder: name the Parquet file to write"}
    for output, said in cases.items():
        job.write_text(text.replace(f"{bucket.url}/out/result.parquet", output))
        before = bucket.keys()
        for command in ("validate", "run"):
            code, _, err = run_cli(command, job)
            assert code == 2 and len(err.strip().splitlines()) == 1 and said in err, (output, command, err)
        assert bucket.keys() == before
    inside = job.with_name("inside.yaml")  # an input inside the output's own checkpoint folder
    inside.write_text(text.replace(f"{bucket.url}/in/reviews.csv", f"{bucket.url}/out/result.checkpoint/in.csv"))
    bucket.put("out/result.checkpoint/in.csv", bucket.get("in/reviews.csv"))
    code, _, err = run_cli("validate", inside)
    assert code == 2 and "would hold the input" in err, err


@pytest.mark.parametrize(("scheme", "package", "extra", "named"), [
    ("gs", "gcsfs", "gcs", "gcsfs"), ("az", "adlfs", "azure", "adlfs and azure-storage-blob"),
    ("oss", "oss2", "oss", "oss2 and ossfs")])
@pytest.mark.parametrize("key", ["output.path", "input.path"])
def test_a_url_whose_library_is_not_installed_names_the_extra_in_one_line(
        sim, make_job, run_cli, tmp_path, monkeypatch, scheme, package, extra, named, key):
    """Without gcsfs (adlfs) a gs:// (az://) path is exit 2, one line naming the extra that installs it."""
    for name in [name for name in sys.modules if name == package or name.startswith(f"{package}.")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)  # what `import` finds for a package that is not installed
    monkeypatch.delitem(sys.modules, WRITABLE[scheme].module, raising=False)
    url = f"{scheme}://bucket/out/result.parquet" if key == "output.path" else f"{scheme}://bucket/in/reviews.csv"
    job = make_job(sim, **({"output": {"path": url}} if key == "output.path" else {"input": {"path": url}}))
    line = refused_in_one_line(run_cli, job)
    assert f"{key} {url}" in line and f"{scheme}:// URLs need {named}, not installed" in line, line
    assert line.endswith(f"pip install 'batch[{extra}]'"), line
    assert sim.stats()["requests"] == 0 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["no credentials", "unknown scheme", "no bucket named"])
def test_a_bad_url_or_bucket_or_credentials_is_one_line_before_anything_is_sent(
        sim, make_job, run_cli, s3, tmp_path, monkeypatch, case):
    job = on_bucket(make_job, sim, s3, tmp_path)
    text = job.read_text()
    if case == "unknown scheme":
        job.write_text(text.replace(f"{s3.url}/out/", "nosuch://bucket/out/"))
    elif case == "no bucket named":
        job.write_text(text.replace(f"{s3.url}/in/reviews.csv", "s3:///reviews.csv"))
    else:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
        # No instance metadata either: botocore would ask 169.254.169.254, which is no test's to reach.
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    before = s3.keys()
    line = refused_in_one_line(run_cli, job)
    assert sim.stats()["requests"] == 0
    assert s3.keys() == before and not (tmp_path / "local").exists()
    assert "testing-secret" not in line


def test_an_object_store_that_does_not_answer_is_exit_75_in_one_line_before_anything_is_sent(
        sim, make_job, run_cli, s3, tmp_path, monkeypatch):
    """A store that is down is no mistake in the job (2, which a Kubernetes Job's podFailurePolicy fails the index
    on): exit 75, which the Job retries, for a run and for every command that reads the job."""
    job = on_bucket(make_job, sim, s3, tmp_path)
    before = s3.keys()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # the store's server, down
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries of a refused connection, cut short
    export = ["--format", "csv", "--to", tmp_path / "out.csv"]
    for command in ("validate", "status", "estimate", "export", "merge", "run"):
        code, out, err = run_cli(command, job, *(export if command == "export" else []))
        assert code == EXIT_UNREACHABLE, (command, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert str(job) in lines[0] and "input.path" in lines[0] and "does not answer" in lines[0], lines[0]
        assert "run again once it answers" in lines[0] and "testing-secret" not in lines[0]
    assert sim.stats()["requests"] == 0
    monkeypatch.undo()
    assert s3.keys() == before and not (tmp_path / "local").exists()


@pytest.mark.parametrize("scheme", ["gs", "az"])
def test_credentials_the_environment_gets_wrong_are_one_line_naming_the_variable(
        sim, make_job, run_cli, tmp_path, monkeypatch, request, scheme):
    """A GOOGLE_APPLICATION_CREDENTIALS naming no file was an outage (exit 75, after 50 s of gcsfs trying the metadata
    server); no Azure credentials at all quoted adlfs ("... with credentials!!") without saying where they go."""
    bucket = request.getfixturevalue({"gs": "gcs", "az": "azure"}[scheme])
    job = on_bucket(make_job, sim, bucket, tmp_path)
    if scheme == "gs":
        monkeypatch.delenv("STORAGE_EMULATOR_HOST")
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
        said = f"GOOGLE_APPLICATION_CREDENTIALS names {tmp_path / 'no-such-key.json'}, which is not a file"
    else:
        monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
        said = "no usable Azure credentials in the environment"
    line = refused_in_one_line(run_cli, job)
    assert said in line and "AZURE_STORAGE_CONNECTION_STRING" in line if scheme == "az" else said in line, line
    assert "!!" not in line and "the the" not in line
    assert sim.stats()["requests"] == 0


def test_the_storage_secret_is_masked_in_what_batch_says(sim, make_job, run_cli, s3, tmp_path, monkeypatch):
    """A server repeating the storage secret (here the model, answering with it) never gets it into the output, the
    summary or the log: it is masked as the API key is."""
    secret = "sekret-aws-value-123456"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto takes any key: the run works
    job = on_bucket(make_job, sim, s3, tmp_path,
                    rows=[{"review_id": "a", "text": reply_marker(f"the key is {secret}")}])
    code, out, err = run_cli("run", job)
    assert code == 0, err
    response = output_on(s3)["response"][0]
    assert response == "the key is ***" and secret not in out + err
    assert secret not in (tmp_path / "local" / "batch.log").read_text()


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_an_input_on_any_fsspec_url_is_read_streamed(sim, make_job, run_cli, tmp_path, scheme):
    """Reading takes any fsspec filesystem (memory:// here, in this process), and file:// is the local path."""
    import fsspec

    rows = [{"review_id": f"m{i}", "text": f"mem {i}"} for i in range(30)]
    body = pd.DataFrame(rows).to_csv(index=False).encode()
    if scheme == "memory":
        url = f"memory://inputs-{os.getpid()}/{tmp_path.name}/reviews.csv"
        with fsspec.filesystem("memory").open(url, "wb") as sink:
            sink.write(body)
    else:
        (tmp_path / "reviews.csv").write_bytes(body)
        url = f"file://{tmp_path / 'reviews.csv'}"
    job = make_job(sim, rows=rows, input_file="unused.csv", input={"path": url})
    code, out, err = run_cli("validate", job)
    assert code == 0 and f"30 rows in {url if scheme == 'memory' else tmp_path / 'reviews.csv'}" in out, err
    code, _, err = run_cli("run", job)
    assert code == 0, err
    assert list(pd.read_parquet(tmp_path / "out" / "result.parquet")["text"]) == [row["text"] for row in rows]


def test_a_second_run_while_another_holds_the_checkpoints_lease_exits_4_having_sent_nothing(
        sim, make_job, run_cli, s3, tmp_path):
    """Another host (its own local folder, so no local lock is shared) holds the lease: this run is locked out."""
    from batch.storage.lease import Lease

    job = on_bucket(make_job, sim, s3, tmp_path)
    checkpoint = S3Store(f"{s3.url}/out/result.checkpoint")
    other = Lease(checkpoint, "other-host:1")
    other.acquire()
    code, _, err = run_cli("run", job)
    assert code == 4, err
    assert "holds the checkpoint's lease, held by other-host:1 (epoch 1)" in err and len(err.strip().splitlines()) == 1
    assert sim.stats()["requests"] == 0
    other.release()  # the other run ended: this one takes the lease over, with the next epoch
    code, _, err = run_cli("run", job)
    assert code == 0, err
    assert sim.stats()["requests"] == len(ROWS)
    lease = json.loads(checkpoint.read_bytes(LEASE_KEY))
    assert lease["epoch"] == 2 and lease["expires_at"] == 0  # released at the end of the run
    assert LEASE_KEY in [key.rsplit("/", 1)[1] for key in s3.keys()]
    puts = [entry for entry in s3.puts() if entry["url"].split("?")[0].endswith(f"/{LEASE_KEY}")]
    # Taken by an exclusive create, then only ever swapped: never written unconditionally.
    assert puts[0]["headers"].get("If-None-Match") == "*"
    assert all(entry["headers"].get("If-None-Match") == "*" or entry["headers"].get("If-Match") for entry in puts)


def test_a_second_run_of_a_shard_here_names_the_shards_own_local_folder(sim, make_job, run_cli, s3, tmp_path):
    """Without output.local_dir, a job on a bucket keeps its local files in the temp folder (batch-NAME-HASH) and a
    shard its own inside it, shard=K-of-N, as its objects are: a second run of the shard here is refused naming it."""
    job = on_bucket(make_job, sim, s3, tmp_path, shards=2, output={"local_dir": None})
    whole = load_job(job).local_dir
    assert whole.parent == Path(tempfile.gettempdir()) and whole.name.startswith("batch-result-")
    shard_folder = whole / "shard=0-of-2"
    live = RunLock(shard_folder)  # a run of shard 0/2 alive on this host holds it
    try:
        live.acquire()
        code, _, err = run_cli("run", job, "--shard", "0/2")
        assert code == 4 and err.count("\n") == 1, err
        assert f"{shard_folder}: another run of this job is alive (pid {os.getpid()}" in err
        live.release()
        code, _, err = run_cli("run", job, "--shard", "0/2")
        assert code == 0, err
        assert (shard_folder / "wal.jsonl").exists() and (shard_folder / "batch.log").exists()
    finally:
        live.release()
        shutil.rmtree(whole, ignore_errors=True)


@pytest.mark.parametrize("garbage", [b"garbage", b'{"holder": "other-host:1", "epoch": 1, "expi'])
def test_a_garbage_lease_is_taken_above_every_epoch_the_parts_before_name(sim, make_job, run_cli, s3, tmp_path,
                                                                          garbage):
    """A `_LEASE` whose bytes are no lease says nothing of the epochs before: the next run takes one above every epoch
    in the checkpoint's part names, so none of its parts shares an epoch with an earlier holder's."""
    job = on_bucket(make_job, sim, s3, tmp_path, output={"checkpoint_rows": 20})
    code, _, err = run_cli("run", job, "--limit", "50")
    assert code == 0, err
    before = parts_on(s3)
    assert before and all("-e1." in key for key in before)
    s3.put(f"out/result.checkpoint/{LEASE_KEY}", garbage)
    code, _, err = run_cli("run", job)
    assert code == 0, err
    after = [key for key in parts_on(s3) if key not in before]
    assert after and all("-e2." in key for key in after), after
    assert json.loads(s3.get(f"out/result.checkpoint/{LEASE_KEY}"))["epoch"] == 2
    assert sim.stats()["requests"] == len(ROWS) and (output_on(s3)["status"] == "ok").all()


def test_two_hosts_starting_one_job_at_once_one_runs_the_other_exits_4(start_sim, make_job, bucket, tmp_path):
    """The lease taken by two racing processes: one exclusive create wins, the other process exits 4."""
    sim = start_sim(latency_ms=50)
    job = on_bucket(make_job, sim, bucket, tmp_path, rows=ROWS[:80], limits={"concurrency": 2})
    # The second host: the same job, its own local folder (as another machine's disk).
    second = job.with_name("job-second-host.yaml")
    second.write_text(job.read_text().replace(str(tmp_path / "local"), str(tmp_path / "local-2")))
    processes = [start_run(job), start_run(second)]
    codes = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        codes.append((process.returncode, err))
    assert sorted(code for code, _ in codes) == [0, 4], codes
    loser_err = next(err for code, err in codes if code == 4)
    assert "holds the checkpoint's lease" in loser_err
    assert sim.stats()["requests"] == 80  # the loser sent nothing
    assert list(output_on(bucket)["review_id"]) == [row["review_id"] for row in ROWS[:80]]


def test_status_and_export_read_a_job_on_s3(sim, make_job, run_cli, s3, tmp_path):
    job = on_bucket(make_job, sim, s3, tmp_path, rows=ROWS[:20])
    code, _, err = run_cli("run", job)
    assert code == 0, err
    code, out, err = run_cli("status", job, "--json")
    assert code == 0, err
    status = json.loads(out)
    assert (status["ok"], status["pending"], status["output"]) == (20, 0, f"{s3.url}/out/result.parquet")
    assert status["last_run"]["state"] == "finished"  # its summary.json, read from the bucket
    code, _, err = run_cli("export", job, "--format", "csv", "--to", tmp_path / "result.csv")
    assert code == 0, err
    assert list(pd.read_csv(tmp_path / "result.csv")["review_id"]) == [row["review_id"] for row in ROWS[:20]]


def test_an_export_to_a_bucket_is_written_there_and_a_url_it_cannot_write_is_one_line(sim, make_job, run_cli, bucket,
                                                                                        tmp_path, monkeypatch):
    """`--to` a URL wrote a local folder named after it (`./oss:/bucket/...`), saying it had exported."""
    job = on_bucket(make_job, sim, bucket, tmp_path, rows=ROWS[:20])
    code, _, err = run_cli("run", job)
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("export", job, "--format", "csv", "--to", f"{bucket.url}/exports/result.csv")
    assert code == 0 and f"to {bucket.url}/exports/result.csv" in out + err, err
    exported = pd.read_csv(io.BytesIO(bucket.get("exports/result.csv")))
    assert list(exported["review_id"]) == [row["review_id"] for row in ROWS[:20]]
    for to, said in ((f"{bucket.url}/out/result.parquet", "is the job's output"),
                     (f"{bucket.url}/out/result.checkpoint/x.csv", "inside the checkpoint folder"),
                     ("nosuch://bucket/result.csv", "batch writes only to local paths and s3://")):
        code, out, err = run_cli("export", job, "--format", "csv", "--to", to)
        assert code == 2 and len(err.strip().splitlines()) == 1 and said in err, (to, err)
    assert not [path for path in tmp_path.rglob("*") if ":" in path.name]  # nothing written locally instead


def records_of_parts(s3: S3Bucket, folder: str) -> pd.DataFrame:
    """Every record in the checkpoint's parts under `folder`, with the part it sits in."""
    frames = []
    for key in s3.keys(folder):
        name = key.rsplit("/", 1)[1]
        if name.startswith("part-") and name.endswith(".parquet"):
            body = s3.client().get_object(Bucket=s3.name, Key=key)["Body"].read()
            frames.append(pd.read_parquet(io.BytesIO(body)).assign(part=name))
    return pd.concat(frames, ignore_index=True)


def resume_taken_over(zombie: subprocess.Popen[str]) -> None:
    """Resume (SIGCONT) a run paused while another took its checkpoint's lease over: it stops with exit 4, saying so."""
    os.kill(zombie.pid, signal.SIGCONT)
    _, err = zombie.communicate(timeout=60)
    assert zombie.returncode == 4 and "another process holds this checkpoint now" in err, err


def test_a_zombie_holders_paid_answers_are_kept_beside_the_new_holders_and_merge_keeps_one_per_id(
        start_sim, make_job, run_cli, s3, tmp_path):
    """A shard's run paused (SIGSTOP) with requests in flight loses its lease (short ttl) to a run on another host,
    which does the shard; resumed, the first (a zombie) writes the answers it had in flight under its own epoch and
    exits 4. Both holders' parts are kept under distinct names; merge keeps, of each id's records, the new holder's
    answer (the higher epoch), and each row costs every answer either holder paid for; only what was in flight
    was paid twice."""
    concurrency, rows = 2, ROWS[:24]
    sim = start_sim(latency_ms=300)
    job = on_bucket(make_job, sim, s3, tmp_path, rows=rows, shards=1, pricing={"input": 1, "output": 2},
                limits={"concurrency": concurrency, "timeout_s": 120},
                output={"checkpoint_rows": 1, "checkpoint_lease_s": 1})
    other_host = job.with_name("job-other-host.yaml")
    other_host.write_text(job.read_text().replace(str(tmp_path / "local"), str(tmp_path / "local-2")))
    folder = "out/result.checkpoint/shard=0-of-1/"
    checkpoint = S3Store(f"{s3.url}/{folder}")

    def parts(epoch: int) -> list[str]:
        return [key for key in s3.keys(folder) if f"-e{epoch}." in key]

    zombie = start_run(job, "--shard", "0/1")
    try:
        wait_until(lambda: len(parts(1)) >= 2 and sim.stats()["in_flight"] > 0, "parts written, requests in flight")
        os.kill(zombie.pid, signal.SIGSTOP)
        in_flight = sim.stats()["in_flight"]
        wait_until(lambda: json.loads(checkpoint.read_bytes(LEASE_KEY))["expires_at"] < time.time(),
                   "the paused run's lease to expire")
        code, _, err = run_cli("status", job, "--json")
        lease = json.loads(_)["shards"][0]["lease"]
        assert (lease["epoch"], lease["state"], lease["pid"]) == (1, "expired", zombie.pid)
        code, out, err = run_cli("run", other_host, "--shard", "0/1")  # takes the lease over: epoch 2
        assert code == 0, err
        zombie_parts_before = parts(1)
        resume_taken_over(zombie)
    finally:
        zombie.kill()
        zombie.communicate()
    # The zombie wrote nothing but its answers' parts: the shard's summary and marker are the new holder's.
    assert json.loads(checkpoint.read_bytes("summary.json"))["exit_code"] == 0
    assert json.loads(checkpoint.read_bytes("_SUCCESS"))["ok"] == len(rows)
    late = sorted(set(parts(1)) - set(zombie_parts_before))
    assert late, "the zombie's answers in flight were written, in parts of its own epoch"
    assert parts(2) and not set(parts(1)) & set(parts(2))
    part_puts = [entry["headers"] for entry in s3.puts() if "/part-" in entry["url"]]
    assert all(headers.get("If-None-Match") == "*" for headers in part_puts)  # never one written over another

    so_far = batch.read_results(job)  # before the merge: each row as the shard's checkpoint holds it
    code, out, err = run_cli("estimate", job, "--json")
    assert code == 0, err
    estimated = json.loads(out)
    code, out, err = run_cli("merge", job)
    assert code == 0, err
    merged = output_on(s3)
    assert list(merged["review_id"]) == [row["review_id"] for row in rows] and (merged["status"] == "ok").all()
    pd.testing.assert_frame_equal(so_far[["review_id", "response", "request_id", "cost", "attempts"]],
                                  merged[["review_id", "response", "request_id", "cost", "attempts"]])
    asked = sim.stats()["by_prompt"]
    times = merged["text"].map(lambda text: asked[f"Classify: {text}"])
    assert 1 <= (times == 2).sum() <= concurrency and times.max() == 2, asked  # paid twice: what was in flight
    assert in_flight <= concurrency
    records = records_of_parts(s3, folder)
    for row in merged[times == 2].itertuples():
        mine = records[records["id"] == row.review_id]
        assert sorted(mine["epoch"]) == [1, 2]  # both answers kept, the zombie's and the new holder's
        assert row.request_id == mine[mine["epoch"] == 2]["request_id"].item()  # the rule: the higher epoch's
        assert row.cost == pytest.approx(mine["cost"].sum()) and row.attempts == 2  # both paid for, counted once
    assert merged["attempts"].sum() == sim.stats()["requests"]  # every request sent, in some row's record
    one_answer = records.drop_duplicates("id").set_index("id")["cost"]
    assert merged["cost"].tolist() == pytest.approx([one_answer[i] * n for i, n in zip(merged["review_id"], times)])
    summary = json.loads(S3Store(f"{s3.url}/out/result.checkpoint").read_bytes("merge.json"))
    assert summary["cost"] == pytest.approx(merged["cost"].sum())
    # The estimate's answers so far (what it projects the rows to come from) are summed over holders as the cost is:
    # a row two holders answered counts both answers' completion tokens.
    assert estimated["cost_spent"] == pytest.approx(merged["cost"].sum())
    assert estimated["observed_completion_tokens_per_row"] == pytest.approx(
        merged["completion_tokens"].sum() / len(merged))

    # The input edited: a new row first, so every record sits at another row than the one holding its id now (kept
    # aside by id, and matched to its row by id): what each row paid is still summed over both holders, everywhere.
    added = {"review_id": "s-new", "text": "a row added"}
    body = io.BytesIO()
    pd.DataFrame([added, *rows]).to_csv(body, index=False)
    s3.client().put_object(Bucket=s3.name, Key="in/reviews.csv", Body=body.getvalue())
    code, out, err = run_cli("estimate", job, "--json")
    assert code == 0, err
    estimated = json.loads(out)
    assert estimated["rows_to_do"] == 1 and estimated["cost_spent"] == pytest.approx(merged["cost"].sum())
    assert estimated["observed_completion_tokens_per_row"] == pytest.approx(
        merged["completion_tokens"].sum() / len(merged))
    so_far = batch.read_results(job)
    assert so_far["cost"].tolist()[1:] == pytest.approx(merged["cost"].tolist())
    code, out, err = run_cli("run", other_host, "--shard", "0/1")  # sends the new row alone
    assert code == 0, err
    assert sim.stats()["by_prompt"][f"Classify: {added['text']}"] == 1
    code, out, err = run_cli("merge", job)
    assert code == 0, err
    edited = output_on(s3)
    assert edited["review_id"].tolist() == [added["review_id"], *merged["review_id"]]
    assert edited["cost"].tolist()[1:] == pytest.approx(merged["cost"].tolist())
    assert edited["attempts"].tolist()[1:] == merged["attempts"].tolist()
    summary = json.loads(S3Store(f"{s3.url}/out/result.checkpoint").read_bytes("merge.json"))
    assert summary["cost"] == pytest.approx(edited["cost"].sum())
    code, out, err = run_cli("status", job, "--json")
    assert code == 0, err
    assert json.loads(out)["cost"] == pytest.approx(edited["cost"].sum())


def test_a_zombies_late_parts_written_while_the_new_holder_runs_are_left_to_the_next_reader(start_sim, make_job,
                                                                                              run_cli, s3, tmp_path):
    """A run paused (SIGSTOP) loses its lease to a run on another host and is resumed while that run is sending: its
    answers in flight land as parts of its own epoch in the middle of the new holder's. The new holder reads the
    parts it knew at its start and its own, and finishes (it wrote its output reading a zombie part at another's
    place: exit 70, no output); the next run reads them all, and every row's record and cost is right."""
    rows = [{"review_id": f"z{i:03d}", "text": f"zombie {i}"} for i in range(60)]
    sim = start_sim(latency_ms=300)
    job = on_bucket(make_job, sim, s3, tmp_path, rows=rows, limits={"concurrency": 2, "timeout_s": 120},
                    output={"checkpoint_rows": 1, "checkpoint_lease_s": 1})
    other_host = job.with_name("job-other-host.yaml")
    other_host.write_text(job.read_text().replace(str(tmp_path / "local"), str(tmp_path / "local-2")))
    folder = "out/result.checkpoint/"

    def parts(epoch: int) -> list[str]:
        return [key for key in s3.keys(folder) if f"-e{epoch}." in key]

    zombie = start_run(job)
    new_holder = None
    try:
        wait_until(lambda: len(parts(1)) >= 2 and sim.stats()["in_flight"] > 0, "parts written, requests in flight")
        os.kill(zombie.pid, signal.SIGSTOP)
        checkpoint = S3Store(f"{s3.url}/{folder}")
        wait_until(lambda: json.loads(checkpoint.read_bytes(LEASE_KEY))["expires_at"] < time.time(),
                   "the paused run's lease to expire")
        new_holder = start_run(other_host)
        wait_until(lambda: len(parts(2)) >= 2, "the new holder writing parts")
        before = set(parts(1))
        resume_taken_over(zombie)
        assert set(parts(1)) - before, "the zombie wrote its answers in flight"
        assert new_holder.poll() is None, "the new holder still running when the zombie's parts landed"
        _, err = new_holder.communicate(timeout=120)
        assert new_holder.returncode == 0, err
    finally:
        for process in (zombie, new_holder):
            if process is not None:
                process.kill()
                process.communicate()
    result = output_on(s3)
    assert list(result["review_id"]) == [row["review_id"] for row in rows] and (result["status"] == "ok").all()
    code, out, err = run_cli("status", job)  # the output misses the zombie's late answers: status says so
    assert code == 0 and "(not written from the records as they are now: a run writes it again" in out, out
    sent = sim.stats()["requests"]
    code, out, err = run_cli("run", job)  # reads the zombie's parts too: sends nothing, the output written again
    assert code == 0 and sim.stats()["requests"] == sent, err
    again = output_on(s3)
    asked = sim.stats()["by_prompt"]
    times = again["text"].map(lambda text: asked[f"Classify: {text}"])
    assert (times == 2).any() and again["attempts"].tolist() == times.tolist()  # each answer paid, in its row
    paid = records_of_parts(s3, folder).groupby("id")["cost"].sum()
    assert again["cost"].tolist() == pytest.approx([paid[i] for i in again["review_id"]])
    code, out, err = run_cli("status", job, "--json")
    assert code == 0 and json.loads(out)["output_current"] is True, out


def test_a_run_keeps_its_lease_while_it_merges_its_parts_and_writes_its_output(start_sim, make_job, run_cli, s3,
                                                                                 tmp_path):
    """The merge and the final file run without the event loop, whose task renewed the lease: a run whose end took
    longer than the ttl let its lease run out (a black-box pass: a run started meanwhile took it over, and both
    wrote the output and the summary). Watched from the end's start: the lease never runs out while the run is."""
    rows = [{"review_id": f"m{i:03d}", "text": f"merged {i}"} for i in range(300)]
    sim = start_sim()
    job = on_bucket(make_job, sim, s3, tmp_path, rows=rows, limits={"concurrency": 16},
                    output={"checkpoint_rows": 1, "checkpoint_lease_s": 1})
    checkpoint = S3Store(f"{s3.url}/out/result.checkpoint")
    first = start_run(job)
    try:
        wait_until(lambda: sim.stats()["requests"] == len(rows), "every row answered: the run's end begins")
        started, ran_out = time.monotonic(), []
        while first.poll() is None:
            lease = json.loads(checkpoint.read_bytes(LEASE_KEY))
            if 0 < lease["expires_at"] < time.time() and first.poll() is None:  # 0: released, at its very end
                ran_out.append(lease)
            time.sleep(0.1)
        ended_after = time.monotonic() - started
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == 0, err
    assert ended_after > 2, f"the end took {ended_after:.1f} s: not past the ttl, the test shows nothing"
    assert not ran_out, ran_out
    assert list(output_on(s3)["review_id"]) == [row["review_id"] for row in rows]


def test_a_run_taken_over_while_it_writes_its_output_exits_4_and_leaves_the_new_holders_notes(start_sim, make_job,
                                                                                                 run_cli, s3, tmp_path):
    """Paused in its end (the merge, the final file) past its lease's ttl, while a run on another host took the
    checkpoint over and merged the parts away: it failed reading them (exit 70) and noted that error as the job's
    last run, over the new holder's finished run."""
    rows = [{"review_id": f"w{i:03d}", "text": f"written {i}"} for i in range(300)]
    sim = start_sim()
    job = on_bucket(make_job, sim, s3, tmp_path, rows=rows, limits={"concurrency": 16},
                    output={"checkpoint_rows": 1, "checkpoint_lease_s": 1})
    other_host = job.with_name("job-other-host.yaml")
    other_host.write_text(job.read_text().replace(str(tmp_path / "local"), str(tmp_path / "local-2")))
    checkpoint = S3Store(f"{s3.url}/out/result.checkpoint")
    paused = start_run(job)
    try:
        wait_until(lambda: sim.stats()["requests"] == len(rows), "every row answered: the run's end begins")
        time.sleep(0.5)  # into the merge: a time, not a wait for something (its parts are being read)
        os.kill(paused.pid, signal.SIGSTOP)
        wait_until(lambda: 0 < json.loads(checkpoint.read_bytes(LEASE_KEY))["expires_at"] < time.time(),
                   "the paused run's lease to run out")
        code, _, err = run_cli("run", other_host)
        assert code == 0, err
        resume_taken_over(paused)
    finally:
        paused.kill()
        paused.communicate()
    code, out, err = run_cli("status", job, "--json")
    assert code == 0 and json.loads(out)["last_run"]["state"] == "finished", out
    assert sim.stats()["requests"] == len(rows)
    assert list(output_on(s3)["review_id"]) == [row["review_id"] for row in rows]


def test_status_shows_who_holds_each_shards_lease_for_the_ttl_the_job_file_sets(start_sim, make_job, run_cli, s3,
                                                                                tmp_path):
    sim = start_sim(latency_ms=100)
    job = on_bucket(make_job, sim, s3, tmp_path, rows=ROWS[:60], shards=2, limits={"concurrency": 1},
                output={"checkpoint_lease_s": 6})
    host = socket.gethostname()  # in Kubernetes, the pod's name
    running = start_run(job, "--shard", "0/2")
    try:
        wait_until(lambda: sim.stats()["requests"] >= 2, "shard 0 sending")
        code, out, err = run_cli("status", job, "--json")
        assert code == 0, err
        shards = json.loads(out)["shards"]
        lease = shards[0]["lease"]
        assert (lease["state"], lease["epoch"], lease["host"], lease["pid"]) == ("alive", 1, host, running.pid)
        assert 0 < lease["expires_in_s"] <= 6  # renewed for the job file's ttl, not the default 30 s
        assert lease["holder"].startswith(f"{host}:") and shards[1]["lease"] is None  # shard 1 never ran
        code, out, _ = run_cli("status", job)
        held = f"lease held by {host} (pid {running.pid}), epoch 1, alive ("
        assert code == 0 and held in out.splitlines()[2] and "shard 1/2" in out.splitlines()[3]
        code, out, _ = run_cli("status", job, "--shard", "0/2")  # one shard's own status
        assert code == 0 and f"  lease: held by {host} (pid {running.pid}), epoch 1, alive (" in out
    finally:
        running.communicate(timeout=120)
    assert running.returncode == 0
    code, out, _ = run_cli("status", job, "--shard", "0/2", "--json")
    assert json.loads(out)["lease"] == {"holder": lease["holder"], "host": host, "pid": running.pid, "epoch": 1,
                                        "state": "released", "expires_in_s": None}
    code, out, _ = run_cli("status", job, "--shard", "0/2")
    assert f"  lease: released by {host} (pid {running.pid}), epoch 1" in out


@pytest.mark.parametrize("metadata", [True, False])
def test_a_batch_api_holder_taken_over_while_paused_submits_nothing_more_and_never_a_row_twice(
        metadata, start_sim, make_job, run_cli, s3, tmp_path):
    """mode: batch_api, a shard's checkpoint on S3 with a short lease. The run is paused (SIGSTOP) in the middle of
    its second file's upload (the simulator answers uploads late); its lease runs out and a run on another host takes
    the shard over, takes on the file the first recorded and submits the rest. Resumed, the first (a zombie) records,
    uploads and makes nothing more (the rows it had taken for its next file are the new holder's) and exits 4: no
    custom_id is ever submitted twice, the new holder's next runs never meet a file they cannot read, and every row
    ends with the one answer paid for it, in the output's cost."""
    per_file, rows = 10, ROWS[:40]
    sim = start_sim(batch_speed=0, batch_upload_delay_ms=3000, batch_no_metadata=not metadata)
    job = on_bucket(make_job, sim, s3, tmp_path, rows=rows, shards=1, mode="batch_api",
                batch_api={"max_requests_per_file": per_file, "poll_interval_s": 0.05},
                pricing={"input": 1, "output": 2}, output={"checkpoint_lease_s": 1})
    other_host = job.with_name("job-other-host.yaml")
    other_host.write_text(job.read_text().replace(str(tmp_path / "local"), str(tmp_path / "local-2")))
    folder = "out/result.checkpoint/shard=0-of-1/"
    checkpoint = S3Store(f"{s3.url}/{folder}")

    zombie = start_run(job, "--shard", "0/1", "--wait")
    try:
        wait_until(lambda: sim.stats()["batch_api"]["files_uploaded"] >= 2, "the second file stored, its answer late")
        os.kill(zombie.pid, signal.SIGSTOP)
        wait_until(lambda: json.loads(checkpoint.read_bytes(LEASE_KEY))["expires_at"] < time.time(),
                   "the paused run's lease to expire")
        sim.reconfigure(batch_upload_delay_ms=0)
        code, out, err = run_cli("run", other_host, "--shard", "0/1")  # takes the lease over (epoch 2), exits 6
        assert code == EXIT_BATCHES_LIVE, err
        batches_before = sim.stats()["batch_api"]["batches_created"]
        resume_taken_over(zombie)
    finally:
        zombie.kill()
        zombie.communicate()
    assert sim.stats()["batch_api"]["batches_created"] == batches_before  # the zombie made no batch
    assert sim.stats()["batch_api"]["custom_ids_submitted_twice"] == []
    sim.advance(3600)
    for _ in range(5):  # the new holder collects (and submits what is left) until no batch is live
        code, out, err = run_cli("run", other_host, "--shard", "0/1")
        if code != EXIT_BATCHES_LIVE:
            break
        sim.advance(3600)
    assert code == 0, err
    assert "answers no row" not in err
    assert sim.stats()["batch_api"]["custom_ids_submitted_twice"] == []
    code, out, err = run_cli("merge", job)
    assert code == 0, err
    merged = output_on(s3)
    assert sorted(merged["review_id"]) == sorted(row["review_id"] for row in rows) and (merged["status"] == "ok").all()
    paid = sim.stats()["batch_api"]["lines_answered"]
    assert paid == len(rows) and merged["attempts"].tolist() == [1] * len(rows)  # each row paid once, and counted
    records = records_of_parts(s3, folder)
    assert records["id"].value_counts().max() == 1
    assert merged["cost"].sum() == pytest.approx(records["cost"].sum()) and (merged["cost"] > 0).all()


def test_status_says_a_shard_killed_9_on_this_host_is_not_running_though_its_lease_has_time_left(
        start_sim, make_job, run_cli, s3, tmp_path):
    sim = start_sim(latency_ms=100)
    job = on_bucket(make_job, sim, s3, tmp_path, rows=ROWS[:60], shards=2, limits={"concurrency": 1},
                output={"checkpoint_lease_s": 600})
    running = start_run(job, "--shard", "0/2")
    wait_until(lambda: sim.stats()["requests"] >= 2, "shard 0 sending")
    running.send_signal(signal.SIGKILL)
    running.communicate(timeout=60)
    code, out, err = run_cli("status", job, "--json")
    assert code == 0, err
    shard = json.loads(out)["shards"][0]
    assert shard["running_pid"] is None and shard["lease"]["state"] == "ended", shard  # it said "alive"
    assert 0 < shard["lease"]["expires_in_s"] <= 600
    code, out, _ = run_cli("status", job)
    line = next(line for line in out.splitlines() if "shard 0/2" in line)
    assert "not finished, not running, lease held by" in line and "whose run ended without releasing it" in line
    code, out, _ = run_cli("run", job, "--shard", "0/2")  # the next run on this host takes the lease over at once
    assert code == 0, out


def test_a_run_aborts_the_uploads_a_killed_run_left_in_its_checkpoint(sim, make_job, run_cli, s3, tmp_path):
    """A run killed while it sent a large object leaves a multipart upload never completed (S3 keeps and bills its
    parts): the next run aborts those of its checkpoint (parts, Batch API files), and leaves anyone else's."""
    job = on_bucket(make_job, sim, s3, tmp_path, rows=ROWS[:20])
    client = s3.client()
    for key in ("out/result.checkpoint/part-000009.parquet", "out/result.checkpoint/batches/file-000004.jsonl",
                "out/result.checkpoint/ledger/00000009.json", "out/elsewhere/keep.parquet"):
        client.create_multipart_upload(Bucket=s3.name, Key=key)
    code, _, err = run_cli("run", job)
    assert code == 0, err
    left = [upload["Key"] for upload in client.list_multipart_uploads(Bucket=s3.name).get("Uploads", [])]
    assert left == ["out/elsewhere/keep.parquet"]
    assert len(output_on(s3)) == 20
