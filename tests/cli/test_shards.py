"""One job as N shards, each a process of its own (as a Kubernetes Indexed Job runs them), against the simulator over
real HTTP: the rows split by CRC-32 of their ids, each shard's checkpoint its own, the account's limits split
statically, and `batch merge` writing the one output a single process would have written."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import yaml
from helpers import start_run, wait_until
from hypothesis import given
from hypothesis import strategies as st
from s3_helpers import S3Bucket

from batch.cli import main
from batch.config import load_job
from batch.preflight import ShardAsk, shard_spec
from batch.shard import Shard, crc32_each, shard_of

ROWS = [{"review_id": f"s{i:04d}", "text": f"shard review {i}"} for i in range(400)]
# What differs between two runs that got the same answers: when they came, and the server's ids for the requests.
TIMING_AND_REQUEST_IDS = ["latency_s", "ttft_s", "request_id"]


def checkpoint(job: Path) -> Path:
    return job.parent / "out" / "result.checkpoint"


def shard_folder(job: Path, index: int, count: int) -> Path:
    return checkpoint(job) / f"shard={index}-of-{count}"


def run_shards(job: Path, count: int, *extra: str, env_index: bool = True) -> list[subprocess.CompletedProcess[str]]:
    """Every shard of `job` at once, each a process with JOB_COMPLETION_INDEX set (or --shard K/N), as the engine
    starts the pods of an Indexed Job: one command line for all."""
    processes = []
    for index in range(count):
        env = {**os.environ, "JOB_COMPLETION_INDEX": str(index)} if env_index else None
        args = [] if env_index else ["--shard", f"{index}/{count}"]
        processes.append(subprocess.Popen([sys.executable, "-m", "batch", "run", str(job), *args, *extra],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    done = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return done


def single_process_copy(job: Path) -> Path:
    """The same job, unsplit, writing elsewhere: what one process would have written."""
    spec = yaml.safe_load(job.read_text())
    spec.pop("shards", None)
    spec["output"]["path"] = "single/result.parquet"
    single = job.with_name("single.yaml")
    single.write_text(yaml.safe_dump(spec))
    return single


def comparable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=TIMING_AND_REQUEST_IDS)


@given(st.sets(st.text(min_size=1, max_size=20), max_size=200), st.integers(1, 17))
def test_the_shards_partition_any_set_of_ids(ids, count):
    array = pa.array(sorted(ids), pa.string())
    masks = [Shard(index, count).selects(array) for index in range(count)]
    assert (sum(mask.astype(int) for mask in masks) == 1).all() if ids else True  # every id in exactly one shard
    # Stable across processes and hosts: CRC-32 of the UTF-8 bytes, never Python's salted hash().
    assert shard_of(array, count).tolist() == [zlib.crc32(text.encode()) % count for text in sorted(ids)]


# Texts short and long (past the 256 bytes the vectorised walk takes, to zlib's), null, in any of Arrow's text
# types, as a slice of a longer array or in chunks: the reader hands the ids over in each of these shapes.
some_ids = st.lists(st.one_of(st.none(), st.text(max_size=12), st.text(min_size=80, max_size=300)), max_size=60)


@given(some_ids, st.sampled_from([pa.string(), pa.large_string(), pa.string_view()]), st.integers(0, 3),
       st.integers(1, 4))
def test_the_vectorised_crc32_of_any_ids_is_zlibs(texts, kind, cut, chunks):
    whole = pa.array(["before"] * cut + texts + ["after"] * cut, kind).slice(cut, len(texts))
    expected = [zlib.crc32((text or "").encode()) for text in texts]
    assert crc32_each(whole).tolist() == expected
    step = max(1, len(texts) // chunks)
    pieces = [whole.slice(at, step) for at in range(0, len(texts), step)] or [whole]
    assert crc32_each(pa.chunked_array(pieces, kind)).tolist() == expected


def test_four_shard_processes_merge_into_the_single_process_output(start_sim, make_job, run_cli):
    sim = start_sim(latency_ms=20, max_concurrency=32)
    job = make_job(sim, rows=ROWS, shards=4, limits={"concurrency": 32})
    done = run_shards(job, 4)
    assert [p.returncode for p in done] == [0, 0, 0, 0], [p.stderr for p in done]
    assert all(f", shard {k}/4 (" in p.stdout for k, p in enumerate(done))  # each summary names its shard
    shard_requests = sim.stats()
    refused = shard_requests["by_status"].get("429", 0)
    # Each shard runs limits.concurrency / 4 = 8 in flight: the four together stay within the server's 32.
    assert refused <= 0.05 * shard_requests["requests"], shard_requests["by_status"]
    assert shard_requests["max_in_flight"] <= 32
    markers = [json.loads((shard_folder(job, k, 4) / "_SUCCESS").read_text()) for k in range(4)]
    assert all(marker["ok"] == marker["rows"] > 0 and marker["failed"] == 0 for marker in markers)
    assert sum(marker["rows"] for marker in markers) == len(ROWS)  # each row in one shard: none lost, none twice
    assert len(shard_requests["by_prompt"]) == len(ROWS)  # every row was asked for by some shard
    assert not (job.parent / "out" / "result.parquet").exists()  # a shard writes no final file: merge does

    code, out, err = run_cli("merge", job)
    assert code == 0, err
    merged = pd.read_parquet(job.parent / "out" / "result.parquet")
    assert list(merged["review_id"]) == [row["review_id"] for row in ROWS]  # every row once, in input order
    assert (merged["status"] == "ok").all()
    summary = json.loads((checkpoint(job) / "merge.json").read_text())
    assert summary["ok"] == 400 and summary["completion_tokens"] == merged["completion_tokens"].sum()
    assert summary["cost"] == pytest.approx(merged["cost"].sum())
    assert "rows: 400: ok 400, failed 0, pending 0" in out

    single = single_process_copy(job)
    code, _, err = run_cli("run", single)
    assert code == 0, err
    alone = pd.read_parquet(job.parent / "single" / "result.parquet")
    pd.testing.assert_frame_equal(comparable(merged), comparable(alone))


def test_a_shard_killed_9_resumes_and_merge_waits_for_it(start_sim, make_job, run_cli):
    sim = start_sim(latency_ms=30)
    job = make_job(sim, rows=ROWS[:120], shards=3, limits={"concurrency": 6},
                   output={"checkpoint_rows": 5, "checkpoint_seconds": 0.2})
    env = {**os.environ, "JOB_COMPLETION_INDEX": "1"}
    folder = shard_folder(job, 1, 3)
    victim = start_run(job, env=env)
    try:
        wait_until(lambda: len(list(folder.glob("part-*.parquet"))) >= 2, "two parts of shard 1")
        code, out, _ = run_cli("status", job, "--json")
        shard_1 = json.loads(out)["shards"][1]
        assert shard_1["running_pid"] == victim.pid and not shard_1["finished"]
        code, _, err = run_cli("merge", job)
        assert code == 2 and "shard 1/3 (running, pid" in err  # a live shard is never merged from under it
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        victim.kill()
        victim.communicate()
    for index in (0, 2):
        code, _, err = run_cli("run", job, "--shard", f"{index}/3")
        assert code == 0, err
    code, _, err = run_cli("merge", job)
    assert code == 2 and err.count("\n") == 1 and "shard 1/3 (not finished)" in err
    assert "shard 0/3" not in err and "shard 2/3" not in err

    code, out, err = run_cli("merge", job, "--partial")
    assert code == 0, err
    partial = pd.read_parquet(job.parent / "out" / "result.parquet")
    assert list(partial["review_id"]) == [row["review_id"] for row in ROWS[:120]]
    mine = shard_of(pa.array(partial["review_id"]), 3) == 1
    assert (partial["status"][~mine] == "ok").all()  # the finished shards' rows, whatever shard 1 holds
    assert partial["status"][mine].isna().any()  # the killed shard's rows not answered yet: no answer

    sent_before = sim.stats()["requests"]
    code, out, err = run_cli("run", job, "--shard", "1/3")  # restarted: it resumes, sending only what it had not kept
    assert code == 0, err
    resent = sim.stats()["requests"] - sent_before - int(out.split("this run: ok ")[1].split(",")[0])
    assert resent == 0
    assert sum(sim.stats()["by_prompt"].values()) - len(sim.stats()["by_prompt"]) <= 2  # at most its 6 // 3 in flight
    code, _, err = run_cli("merge", job)
    assert code == 0, err
    merged = pd.read_parquet(job.parent / "out" / "result.parquet")
    assert list(merged["review_id"]) == [row["review_id"] for row in ROWS[:120]] and (merged["status"] == "ok").all()
    code, out, _ = run_cli("status", job)
    assert code == 0 and out.count("finished, not running") == 3


BAD_SPECS = [
    (["--shard=5/4"], {}, "shard 5 of 4 does not exist"),
    (["--shard=-1/4"], {}, "--shard '-1/4'"),
    (["--shard", "0/0"], {}, "the shard count must be from 1 to 100,000, not 0"),
    (["--shard", "a/b"], {}, "--shard 'a/b'"),
    ([], {"JOB_COMPLETION_INDEX": "1"}, "JOB_COMPLETION_INDEX=1 names a shard, but the job has no shard count"),
    ([], {"SLURM_ARRAY_TASK_ID": "2"}, "SLURM_ARRAY_TASK_ID=2 names a shard"),
    ([], {"JOB_COMPLETION_INDEX": "4", "X_SHARDS": "4"}, "JOB_COMPLETION_INDEX '4': shard 4 of 4 does not exist"),
    (["--shard", "1/4", "--shards", "3"], {}, "--shard 1/4 and --shards 3 disagree"),
    (["--shards", "4"], {}, "--shards 4 splits the job into shards, but this process is none of them"),
    # A count past Kubernetes' own bound is a typo: status and merge would walk 10^20 shard folders.
    (["--shard", "0/99999999999999999999"], {}, "the shard count must be from 1 to 100,000"),
]


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("args, env, says", BAD_SPECS)
def test_a_bad_shard_spec_is_one_line_and_exit_2_before_anything_is_written(sim, make_job, run_cli, monkeypatch,
                                                                            command, args, env, says):
    job = make_job(sim, rows=ROWS[:20])
    env = dict(env)  # the parameter's own dict is shared by both commands
    if env.pop("X_SHARDS", None):
        args = [*args, "--shards", "4"]
    if command == "validate" and args == ["--shards", "4"]:
        args = [*args, "--shard", "9/4"]  # validate reads the whole job without an index: give it a bad one
        says = "shard 9 of 4 does not exist"
    for name in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():  # the environment an array job's engine gives each task
        monkeypatch.setenv(name, value)
    code, out, err = run_cli(command, job, *args)
    assert code == 2 and out == ""
    assert says in err and err.count("\n") == 1, err
    assert not (job.parent / "out").exists() and sim.stats()["requests"] == 0


@pytest.mark.parametrize("command", ["run", "status", "merge"])
def test_a_shards_count_past_kubernetes_bound_is_refused_by_the_command_line(sim, make_job, capsys, command):
    job = make_job(sim, rows=ROWS[:20])
    with pytest.raises(SystemExit) as exit_:
        main([command, str(job), "--shards", "100001"])
    assert exit_.value.code == 2 and "is a number of shards, 1 to 100,000, not '100001'" in capsys.readouterr().err
    assert not (job.parent / "out").exists()


def test_validate_of_a_sharded_job_without_an_index_says_what_each_run_needs(sim, make_job, run_cli, monkeypatch):
    """The whole job is checked, but a run of it without an index is refused: validate says so (it said only ok)."""
    for name in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    job = make_job(sim, rows=ROWS[:20], shards=3)
    code, out, err = run_cli("validate", job)
    assert code == 0, err
    assert ": ok: 20 rows in " in out and ("it runs as 3 shards: each run needs --shard K/3, or JOB_COMPLETION_INDEX "
                                           "or SLURM_ARRAY_TASK_ID set") in out
    code, out, _ = run_cli("validate", job, "--shard", "1/3")
    assert code == 0 and "for shard 1/3" in out and "each run needs" not in out


def test_a_job_file_count_that_disagrees_with_shard_is_refused(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS[:20], shards=4)
    code, _, err = run_cli("run", job, "--shard", "1/3")
    assert code == 2 and "--shard 1/3 and " in err and "shards: 4 disagree" in err
    assert not (job.parent / "out").exists() and sim.stats()["requests"] == 0


def test_each_shard_gets_its_share_of_the_limits_and_the_budget(make_job):
    job = make_job(rows=ROWS[:20], shards=4, limits={"concurrency": 10, "requests_per_minute": 600,
                                                     "tokens_per_minute": 10_000},
                   budget={"max_cost": 2.0, "max_total_tokens": 1001}, pricing={"input": 1, "output": 1})
    spec = load_job(job)
    parts = [shard_spec(spec, ShardAsk(f"{k}/4")) for k in range(4)]
    assert [p.limits.concurrency for p in parts] == [2] * 4  # 10 // 4: the four never above the job's 10
    assert {p.limits.requests_per_minute for p in parts} == {150} and {p.limits.tokens_per_minute for p in parts} == {
        2500}
    assert {p.budget.max_cost for p in parts} == {0.5} and {p.budget.max_total_tokens for p in parts} == {250}
    assert spec.limits.concurrency == 10 and spec.budget.max_cost == 2.0  # the job's own spec is left as it was
    tiny = make_job(rows=ROWS[:20], shards=8, limits={"concurrency": 4})
    assert {shard_spec(load_job(tiny), ShardAsk(f"{k}/8")).limits.concurrency for k in range(8)} == {1}  # at least 1


def test_with_limits_shared_every_shard_takes_from_the_whole_limits_in_redis(make_job):
    job = make_job(rows=ROWS[:20], shards=4, limits={"concurrency": 10, "requests_per_minute": 600,
                                                     "shared": "redis://127.0.0.1:6379/0"},
                   budget={"max_cost": 2.0}, pricing={"input": 1, "output": 1})
    part = shard_spec(load_job(job), ShardAsk("1/4"))
    assert (part.limits.concurrency, part.limits.requests_per_minute, part.budget.max_cost) == (10, 600, 2.0)
    assert part.checkpoint_dir.name == "shard=1-of-4"


def test_a_shard_names_itself_in_its_log_lines(start_sim, make_job):
    sim = start_sim(latency_ms=50)
    job = make_job(sim, rows=ROWS[:40], shards=2, limits={"concurrency": 2})
    done = subprocess.run([sys.executable, "-m", "batch", "run", str(job), "--shard", "1/2", "--progress-interval",
                           "0.05"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line]
    assert lines and all(" shard 1/2: " in line for line in lines), lines
    logged = (shard_folder(job, 1, 2) / "batch.log").read_text()
    assert logged and all(" shard 1/2: " in line for line in logged.splitlines())


@pytest.mark.parametrize("mode", ["online", "batch_api"])
def test_a_shard_with_no_rows_finishes_and_the_job_merges(start_sim, make_job, run_cli, mode):
    """More shards than rows (an Indexed Job with more pods than some shard has rows): an empty shard is a
    finished shard, in either mode, so merge is not kept waiting for it."""
    rows = ROWS[:3]
    empty = sorted(set(range(4)) - set(shard_of(pa.array([row["review_id"] for row in rows]), 4).tolist()))
    assert empty, "the rows fill every shard: pick other rows"
    extra = {"mode": "batch_api", "batch_api": {"poll_interval_s": 0.05}} if mode == "batch_api" else {}
    job = make_job(start_sim(batch_speed=200), rows=rows, shards=4, **extra)
    done = run_shards(job, 4, *(["--wait"] if mode == "batch_api" else []), env_index=False)
    assert [p.returncode for p in done] == [0, 0, 0, 0], [p.stderr for p in done]
    for index in empty:
        marker = json.loads((shard_folder(job, index, 4) / "_SUCCESS").read_text())
        assert marker["rows"] == marker["ok"] == 0
    code, out, err = run_cli("merge", job)
    assert code == 0, err
    merged = pd.read_parquet(job.parent / "out" / "result.parquet")
    assert list(merged["review_id"]) == [row["review_id"] for row in rows] and (merged["status"] == "ok").all()


def test_a_batch_api_job_shards_the_same_way_each_with_its_own_ledger(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=200)
    job = make_job(sim, rows=ROWS[:60], shards=2, mode="batch_api",
                   batch_api={"max_requests_per_file": 20, "poll_interval_s": 0.05})
    done = run_shards(job, 2, "--wait", env_index=False)
    assert [p.returncode for p in done] == [0, 0], [p.stderr for p in done]
    for k in range(2):  # each shard's files and batches are in its own ledger
        assert list((shard_folder(job, k, 2) / "ledger").glob("*.json"))
    assert not (checkpoint(job) / "ledger").exists()
    assert sim.stats()["batch_api"]["custom_ids_submitted_twice"] == []
    assert len(sim.stats()["batch_api"]["custom_ids"]) == 60
    code, _, err = run_cli("merge", job)
    assert code == 0, err
    merged = pd.read_parquet(job.parent / "out" / "result.parquet")
    assert list(merged["review_id"]) == [row["review_id"] for row in ROWS[:60]] and (merged["status"] == "ok").all()


def test_the_kubernetes_indexed_job_runs_every_shard_of_its_job_file_once():
    deploy = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
    job = yaml.safe_load((deploy / "indexed-job.yaml").read_text())
    spec = load_job(deploy / "job.yaml")
    assert job["spec"]["completionMode"] == "Indexed"  # Kubernetes sets JOB_COMPLETION_INDEX in each pod
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == spec.shards
    assert job["spec"]["backoffLimitPerIndex"] >= 1
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:4] == ["python", "-m", "batch", "run"]
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    job_path = Path(container["command"][4])
    assert job_path.name == "job.yaml" and str(job_path.parent) == mounted["job"]
    assert {v["name"]: v for v in pod["volumes"]}["job"]["configMap"]["name"] == "batch-job"
    assert container["envFrom"][0]["secretRef"]["name"] == "batch-keys"
    assert str(spec.output.local_dir) == mounted["local"] and str(spec.checkpoint_dir).startswith("s3://")
    merge = yaml.safe_load((deploy / "merge-job.yaml").read_text())
    assert merge["spec"]["template"]["spec"]["containers"][0]["command"] == ["python", "-m", "batch", "merge",
                                                                               str(job_path)]


def test_shards_on_s3_each_keep_their_checkpoint_in_the_bucket_and_merge_there(sim, make_job, run_cli, s3: S3Bucket,
                                                                               tmp_path):
    rows = ROWS[:60]
    body = pd.DataFrame(rows).to_csv(index=False).encode()
    s3.client().put_object(Bucket=s3.name, Key="in/reviews.csv", Body=body)
    job = make_job(sim, rows=rows, input_file="unused.csv", shards=2, input={"path": f"{s3.url}/in/reviews.csv"},
                   output={"path": f"{s3.url}/out/result.parquet", "local_dir": str(tmp_path / "local")})
    for index in range(2):
        code, out, err = run_cli("run", job, "--shard", f"{index}/2")
        assert code == 0, err
        assert (tmp_path / "local" / f"shard={index}-of-2" / "wal.jsonl").exists()  # its local files its own too
    markers = [key for key in s3.keys("out/result.checkpoint/") if key.endswith("/_SUCCESS")]
    assert markers == [f"out/result.checkpoint/shard={k}-of-2/_SUCCESS" for k in range(2)]
    marker_puts = [entry["headers"] for entry in s3.puts() if "/_SUCCESS" in entry["url"]]
    assert marker_puts and all(headers.get("If-None-Match") == "*" for headers in marker_puts)  # exclusive creates
    code, out, err = run_cli("status", job)
    assert code == 0 and out.count("finished, not running") == 2, out + err
    code, _, err = run_cli("merge", job)
    assert code == 0, err
    stored = s3.client().get_object(Bucket=s3.name, Key="out/result.parquet")["Body"].read()
    merged = pd.read_parquet(io.BytesIO(stored))
    assert list(merged["review_id"]) == [row["review_id"] for row in rows] and (merged["status"] == "ok").all()
    assert sim.stats()["requests"] == len(rows)
