"""A job run as N shards, read as one before and after `batch merge`: `read_results` gives each row the state its
shard's checkpoint holds (and the merged output once it is merged), `batch export` exports the merged output and
refuses, naming the shards, while they have not all finished or it is not merged, `--shard K/N` exports one shard's
rows, and `batch estimate` counts what each shard's checkpoint holds, with each shard's share of the budget. Real
shard processes against the simulator over HTTP; local folders and a moto S3 server."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import pandas as pd
import pyarrow as pa
import pytest
from helpers import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s3_helpers import S3Bucket

import batch
from batch.checkpoint.guard import RunLock
from batch.commands.shards import why_waiting
from batch.config import load_job
from batch.shard import Shard, shard_of

FAIL = " [[error:400:1214]]"  # the simulator answers 400 with an invalid-request code: the row fails, not retried
ROWS = [{"review_id": f"r{i:03d}", "text": f"shard read {i}" + (FAIL if i % 7 == 3 else "")} for i in range(90)]


def shard_rows(rows: list[dict], index: int, count: int) -> list[dict]:
    """The rows of shard `index` of `count`, in input order."""
    mine = shard_of(pa.array([row["review_id"] for row in rows]), count) == index
    return [row for row, chosen in zip(rows, mine) if chosen]


def expected_status(row: dict) -> str:
    return "failed" if FAIL in row["text"] else "ok"


def statuses(frame: pd.DataFrame) -> dict[str, str]:
    return dict(zip(frame["review_id"], frame["status"]))


def test_read_results_and_export_read_every_shard_before_and_after_merge(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS, shards=3, limits={"concurrency": 6})
    output = job.parent / "out" / "result.parquet"
    for index in (0, 1):
        code, _, err = run_cli("run", job, "--shard", f"{index}/3")
        assert code in (0, 1), err  # 1: some rows failed (their records kept)
    code, _, err = run_cli("run", job, "--shard", "2/3", "--limit", "5")  # shard 2 stopped part way
    assert code == 0, err
    late = shard_rows(ROWS, 2, 3)
    expected = {row["review_id"]: expected_status(row) for row in ROWS}
    expected.update({row["review_id"]: "pending" for row in late[5:]})

    before = batch.read_results(job)
    assert list(before["review_id"]) == [row["review_id"] for row in ROWS]  # every id once, in input order
    assert statuses(before) == expected  # each row as its shard's checkpoint holds it
    assert before.loc[before["status"] == "ok", "response"].notna().all()
    assert before.loc[before["status"] == "pending", "response"].isna().all()
    assert list(before["text"]) == [row["text"] for row in ROWS]  # the kept column beside its own row
    state = batch.status(job)  # the same counts `batch status` shows for each shard
    assert [shard["pending"] for shard in state["shards"]] == [0, 0, len(late) - 5]
    assert state["ok"] == list(expected.values()).count("ok") and state["failed"] == list(expected.values()).count(
        "failed")

    code, out, err = run_cli("export", job, "--format", "csv", "--to", tmp_path / "all.csv")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "shard 2/3 (not finished)" in err and "batch merge" in err
    assert "shard 0/3" not in err and "shard 1/3 (" not in err
    assert not (tmp_path / "all.csv").exists()

    code, out, err = run_cli("export", job, "--shard", "1/3", "--format", "csv", "--to", tmp_path / "one.csv")
    assert code == 0, err  # a finished shard's rows alone
    one = pd.read_csv(tmp_path / "one.csv")
    assert list(one["review_id"]) == [row["review_id"] for row in shard_rows(ROWS, 1, 3)]
    assert statuses(one) == {key: expected[key] for key in one["review_id"]}
    code, _, err = run_cli("export", job, "--shard", "2/3", "--format", "csv", "--to", tmp_path / "two.csv")
    assert code == 2 and "cannot export shard 2/3 yet (not finished)" in err and "--shard 2/3" in err
    assert err.count("\n") == 1

    code, _, err = run_cli("merge", job, "--partial")  # what is there: not the job's answers yet
    assert code == 0, err
    code, _, err = run_cli("export", job, "--format", "csv", "--to", tmp_path / "all.csv")
    assert code == 2 and "shard 2/3 (not finished)" in err
    assert statuses(batch.read_results(job)) == expected

    code, _, err = run_cli("run", job, "--shard", "2/3")
    assert code in (0, 1), err
    code, _, err = run_cli("export", job, "--format", "csv", "--to", tmp_path / "all.csv")
    assert code == 2 and err.count("\n") == 1  # the partial merge is out of date
    assert "every shard has finished" in err and "not merged from their records as they are now" in err
    assert f"batch merge {job}" in err
    finished = {row["review_id"]: expected_status(row) for row in ROWS}
    assert statuses(batch.read_results(job)) == finished

    code, _, err = run_cli("merge", job)
    assert code == 0, err
    merged = pd.read_parquet(output)
    pd.testing.assert_frame_equal(batch.read_results(job), merged, check_dtype=False)  # the merged output
    code, out, err = run_cli("export", job, "--format", "jsonl", "--to", tmp_path / "all.jsonl")
    assert code == 0 and "exported 90 rows" in out, err
    exported = pd.read_json(tmp_path / "all.jsonl", lines=True)
    assert list(exported["review_id"]) == list(merged["review_id"]) and statuses(exported) == finished

    edited = [dict(row) for row in ROWS]
    changed = shard_rows(edited, 1, 3)[0]
    changed["text"] = "a new prompt"  # its answer is for the old one: pending again, in shard 1
    pd.DataFrame(edited).to_csv(job.parent / "reviews.csv", index=False)
    code, _, err = run_cli("export", job, "--format", "csv", "--to", tmp_path / "again.csv")
    assert code == 2 and "shard 1/3 (1 row pending)" in err and "shard 0/3" not in err
    assert statuses(batch.read_results(job)) == {**finished, changed["review_id"]: "pending"}


def test_a_shard_killed_with_answers_only_in_its_log_reads_them(start_sim, make_job, run_cli):
    """A shard killed -9: the answers in its write-ahead log count, as `batch status` counts them."""
    sim = start_sim(latency_ms=20)
    rows = [{"review_id": f"k{i:03d}", "text": f"killed {i}"} for i in range(60)]
    job = make_job(sim, rows=rows, shards=2, limits={"concurrency": 2},
                   output={"checkpoint_rows": 100_000, "checkpoint_seconds": 3600})  # no part: every answer logged
    wal = job.parent / "out" / "result.checkpoint" / "shard=0-of-2" / "wal.jsonl"
    victim = subprocess.Popen([sys.executable, "-m", "batch", "run", str(job)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "JOB_COMPLETION_INDEX": "0"})
    try:
        wait_until(lambda: wal.exists() and wal.read_text().count("\n") >= 5, "five answers in shard 0's log")
        victim.kill()
        victim.wait(timeout=10)
    finally:
        victim.kill()
    logged = {json.loads(line)["id"] for line in wal.read_text().splitlines() if line.strip().endswith("}")}
    frame = batch.read_results(job)
    assert set(frame.loc[frame["status"] == "ok", "review_id"]) == logged
    assert len(frame) == 60 and frame["review_id"].is_unique
    assert batch.status(job)["ok"] == len(logged)


def test_estimate_counts_every_shards_checkpoint_and_shows_each_shares_budget(sim, make_job, run_cli):
    rows = [{"review_id": f"e{i:03d}", "text": f"estimate me {i}"} for i in range(60)]
    job = make_job(sim, rows=rows, shards=3, budget={"max_cost": 3.0}, pricing={"input": 100, "output": 200})
    code, _, err = run_cli("run", job, "--shard", "0/3")
    assert code == 0, err
    code, _, err = run_cli("run", job, "--shard", "1/3", "--limit", "4")
    assert code == 0, err
    sent = sim.stats()["requests"]
    done = len(shard_rows(rows, 0, 3)) + 4
    code, out, err = run_cli("estimate", job, "--json")
    assert code == 0, err
    found = json.loads(out)
    assert (found["rows_done_before"], found["rows_to_do"]) == (done, 60 - done)
    state = batch.status(job)
    assert found["cost_spent"] == pytest.approx(state["cost"]) and state["cost"] > 0
    assert [shard["rows_done_before"] for shard in found["shards"]] == [len(shard_rows(rows, 0, 3)), 4, 0]
    assert [shard["rows_to_do"] for shard in found["shards"]] == [0, len(shard_rows(rows, 1, 3)) - 4,
                                                                  len(shard_rows(rows, 2, 3))]
    assert [shard["cost_spent"] for shard in found["shards"]] == pytest.approx([s["cost"] for s in state["shards"]])
    assert {shard["budget_max_cost"] for shard in found["shards"]} == {1.0}  # the static split: 3.0 / 3
    assert found["budget_max_cost"] == 3.0 and found["cost_expected"] == pytest.approx(
        sum(shard["cost_expected"] for shard in found["shards"]))
    assert found["shards"][0]["cost_expected"] == 0  # nothing left to send in shard 0
    assert batch.estimate(job) == found  # the Python API reads the shards the same way

    code, text, err = run_cli("estimate", job)
    assert code == 0, err
    assert f"({found['model']}), 3 shards: {60 - done} rows to send ({done} done before" in text
    assert "each shard keeps to its share of the budget (the job's / 3):" in text
    lines = [line for line in text.splitlines() if line.startswith("    shard ")]
    assert len(lines) == 3 and all("its budget: max_cost 1" in line for line in lines)
    assert lines[1].startswith(f"    shard 1/3: {len(shard_rows(rows, 1, 3)) - 4} rows to send (4 done before)")
    assert sim.stats()["requests"] == sent  # an estimate sends nothing


def test_shards_on_s3_read_and_export_from_the_bucket(sim, make_job, run_cli, s3: S3Bucket, tmp_path):
    rows = ROWS[:40]
    s3.client().put_object(Bucket=s3.name, Key="in/reviews.csv", Body=pd.DataFrame(rows).to_csv(index=False).encode())
    job = make_job(sim, rows=rows, input_file="unused.csv", shards=2, input={"path": f"{s3.url}/in/reviews.csv"},
                   output={"path": f"{s3.url}/out/result.parquet", "local_dir": str(tmp_path / "local")})
    code, _, err = run_cli("run", job, "--shard", "1/2")
    assert code in (0, 1), err
    expected = {row["review_id"]: "pending" for row in shard_rows(rows, 0, 2)}
    expected.update({row["review_id"]: expected_status(row) for row in shard_rows(rows, 1, 2)})
    frame = batch.read_results(job)
    assert list(frame["review_id"]) == [row["review_id"] for row in rows] and statuses(frame) == expected
    code, _, err = run_cli("export", job, "--format", "parquet", "--to", tmp_path / "all.parquet")
    assert code == 2 and "shard 0/2 (not finished)" in err and err.count("\n") == 1

    code, _, err = run_cli("run", job, "--shard", "0/2")
    assert code in (0, 1), err
    code, _, err = run_cli("merge", job)
    assert code == 0, err
    stored_bytes = s3.client().get_object(Bucket=s3.name, Key="out/result.parquet")["Body"].read()
    stored = pd.read_parquet(io.BytesIO(stored_bytes))
    pd.testing.assert_frame_equal(batch.read_results(job), stored, check_dtype=False)
    code, out, err = run_cli("export", job, "--format", "parquet", "--to", tmp_path / "all.parquet")
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "all.parquet"), stored)


def said_twice(line: str, *names: object) -> set[str]:
    """The pairs of words `line` says more than once, the commands it quotes (in backticks) and the paths `names`
    left out: 'has not finished (not finished)' says 'not finished' twice."""
    for name in names:
        line = line.replace(str(name), " ")
    words = re.findall(r"[a-z']+", re.sub(r"`[^`]*`", " ", line.lower()))
    return {" ".join(pair) for pair, times in Counter(zip(words, words[1:])).items() if times > 1}


@contextlib.contextmanager
def shard_in(state: str, job, run_cli, rows: list[dict]) -> Iterator[None]:
    """Shard 1/2 of `job` in `state` (a key of SHARD_STATES) while the context is open."""
    if state == "stopped part way":
        code, _, err = run_cli("run", job, "--shard", "1/2", "--limit", "2")
        assert code == 0, err
    if state == "rows pending again":
        code, _, err = run_cli("run", job, "--shard", "1/2")
        assert code in (0, 1), err
        edited = [dict(row) for row in rows]
        shard_rows(edited, 1, 2)[0]["text"] = "a new prompt"  # its answer is for the old one: pending again
        pd.DataFrame(edited).to_csv(job.parent / "reviews.csv", index=False)
    lock = RunLock(load_job(job).for_shard(Shard(1, 2)).local_dir)
    if state == "running":  # a live run of it: the holder of its run lock (this process)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


SHARD_STATES = {"no checkpoint": "not finished", "stopped part way": "not finished",
                "running": f"running, pid {os.getpid()}", "rows pending again": "1 row pending"}


@pytest.mark.parametrize("state", SHARD_STATES)
def test_every_line_on_a_shard_not_ready_says_why_once(sim, make_job, run_cli, tmp_path, state):
    """export --shard, export and merge, refusing while shard 1/2 is in each state it can be in: one line naming the
    shard and why, each thing said once."""
    rows = ROWS[:30]
    job = make_job(sim, rows=rows, shards=2)
    code, _, err = run_cli("run", job, "--shard", "0/2")
    assert code in (0, 1), err
    with shard_in(state, job, run_cli, rows):
        for command in (["export", "--shard", "1/2"], ["export"], ["merge"]):
            target = ["--format", "csv", "--to", tmp_path / "rows.csv"] if command[0] == "export" else []
            code, out, err = run_cli(command[0], job, *command[1:], *target)
            assert code == 2 and out == "" and err.count("\n") == 1, err
            why = SHARD_STATES[state]
            assert err.count(why) == 1 and ("shard 1/2 yet (" if "--shard" in command else "shard 1/2 (") + why in err
            assert said_twice(err, job, load_job(job).output.path) == set(), err
            told = re.sub(r"`[^`]*`", "", err)
            assert [told.count(word) for word in ("finished", "running", "pending")] == [
                why.count(word) for word in ("finished", "running", "pending")], err
    assert not (tmp_path / "rows.csv").exists()


@settings(max_examples=100)
@given(finished=st.booleans(), running_pid=st.none() | st.integers(1, 2**22), pending=st.integers(0, 10**6))
def test_why_a_shard_is_waited_for_is_one_reason_said_once(finished, running_pid, pending):
    why = why_waiting({"finished": finished, "running_pid": running_pid}, pending)
    assert (why is None) == (finished and not running_pid and not pending)
    if why is not None:
        assert said_twice(f"shard 1/2 ({why})") == set()
        assert why.count("finished") + why.count("running") + why.count("pending") == 1, why


# -- a property: any split of rows among shards, each row in any state --------------------------------------------

@pytest.fixture(scope="module")
def shared_sim():
    from batch.simulator import SimConfig, SimulatorThread

    sim = SimulatorThread(SimConfig())
    sim.start()
    yield sim
    sim.stop()


STATES = st.sampled_from(["ok", "failed", "pending"])


@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(numbers=st.lists(st.integers(0, 10_000), min_size=1, max_size=24, unique=True),
       wanted=st.lists(STATES, min_size=24, max_size=24), count=st.integers(1, 4), merge=st.booleans())
def test_read_results_gives_each_id_once_with_the_state_its_shard_holds(shared_sim, tmp_path_factory, numbers, wanted,
                                                                        count, merge):
    """Rows in any order, split among any number of shards, each answered, failed or never sent: read_results gives
    every id once, in input order, in the state its own shard's checkpoint holds (after a partial merge too)."""
    from batch.cli import main
    from batch.config import dump_job

    folder = tmp_path_factory.mktemp("prop")
    rows = [{"review_id": f"p{n}", "text": f"row {n}" + (FAIL if state == "failed" else "")}
            for n, state in zip(numbers, wanted)]
    state_of = {row["review_id"]: state for row, state in zip(rows, wanted)}
    job = folder / "job.yaml"
    spec = {"name": "prop", "input": {"path": "rows.csv", "id_column": "review_id"}, "shards": count,
            "prompt": {"template": "Classify: {text}"},
            "model": {"provider": "local", "name": "glm-4-flash", "base_url": shared_sim.url,
                      "params": {"max_tokens": 16}},
            "retry": {"max_attempts": 1}, "output": {"path": "out/result.parquet", "keep_columns": ["text"]}}
    job.write_text(dump_job(spec), encoding="utf-8")
    sent = [row for row in rows if state_of[row["review_id"]] != "pending"]
    (folder / "rows.csv").write_text(pd.DataFrame(sent or rows[:0], columns=["review_id", "text"]).to_csv(index=False))
    for index in range(count):
        if any(shard_of(pa.array([row["review_id"]]), count)[0] == index for row in sent):
            assert main(["run", str(job), "--shard", f"{index}/{count}"]) in (0, 1)
    # The rows never sent join the input afterwards: pending in their shard, whether it ran or not.
    (folder / "rows.csv").write_text(pd.DataFrame(rows).to_csv(index=False))
    if merge:  # with no shard run yet there is nothing to merge: refused, as an output of nothing would be
        assert main(["merge", str(job), "--partial"]) == (0 if sent else 2)

    frame = batch.read_results(job)
    assert list(frame["review_id"]) == [row["review_id"] for row in rows]
    assert statuses(frame) == state_of
    assert frame.loc[frame["status"] == "ok", "response"].notna().all()
    assert frame.loc[frame["status"] != "ok", "response"].isna().all()
    assert list(frame["text"]) == [row["text"] for row in rows]


@pytest.mark.parametrize("command", ["status", "estimate"])
def test_status_and_estimate_of_one_shard_name_it_as_its_run_does(sim, make_job, run_cli, command):
    """`status`/`estimate --shard K/N` read one shard: their first line and their JSON name it, as its run's summary
    and log lines do ("shard 1/3"); of the whole job, each shard's entry names its own and the whole names none."""
    job = make_job(sim, rows=ROWS[:30], shards=3)
    code, ran, err = run_cli("run", job, "--shard", "1/3", "-v")  # -v: a line for the row that fails
    assert code in (0, 1), err
    logged = (load_job(job).for_shard(Shard(1, 3)).local_dir / "batch.log").read_text()
    assert ran.startswith("job test-job, shard 1/3 (") and "shard 1/3: " in logged  # its summary, its log lines
    for which in (["--shard", "1/3"], ["--shards", "3"]):
        code, text, err = run_cli(command, job, *which)
        assert code == 0, err
        code, out, err = run_cli(command, job, *which, "--json")
        assert code == 0, err
        found = json.loads(out)
        heading = text.splitlines()[0]
        if which[0] == "--shard":
            assert found["shard"] == "shard 1/3" and "job test-job, shard 1/3" in heading, heading
        else:
            assert "shard" not in found and "shard " not in heading, heading
            assert [entry["shard"] for entry in found["shards"]] == ["shard 0/3", "shard 1/3", "shard 2/3"]


def test_cancel_and_export_of_one_shard_name_it(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS[:30], shards=3)
    code, _, err = run_cli("run", job, "--shard", "1/3")
    assert code in (0, 1), err
    code, out, err = run_cli("cancel", job, "--shard", "1/3")
    assert (code, out) == (0, "job test-job, shard 1/3: no live Batch API batch\n"), err
    code, out, err = run_cli("export", job, "--shard", "1/3", "--format", "csv", "--to", tmp_path / "one.csv")
    rows = len(shard_rows(ROWS[:30], 1, 3))
    assert (code, out) == (0, f"exported {rows} rows of shard 1/3 to {tmp_path / 'one.csv'}\n"), err
