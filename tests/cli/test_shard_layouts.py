"""A job's checkpoint answers its rows in one layout: unsharded (records at its root) or N shards (shard=K-of-N
folders). A run in another layout would read none of those answers and pay for their rows again (past the job's
whole budget), so the preflight refuses it in one line, naming what the checkpoint holds and what to do, before it
writes or sends anything; `validate` says the same. A plain rerun of a job whose shards all finished and are merged
is a no-op. `merge` never writes a row pending again as answered, and never an output of nothing from a split the
checkpoint does not hold. The CLI against the simulator over HTTP; local folders and a moto S3 server."""

from __future__ import annotations

import io
import json
import shutil
import signal
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from helpers import start_run, wait_until
from s3_helpers import S3Bucket

from batch.checkpoint.layout import LAYOUT_NAME, LayoutTaken, claim_layout, read_layout
from batch.shard import shard_of
from batch.wording import counted

ROWS = [{"review_id": f"l{i:03d}", "text": f"layout review {i}"} for i in range(40)]


def checkpoint(job: Path) -> Path:
    return job.parent / "out" / "result.checkpoint"


def output(job: Path) -> Path:
    return job.parent / "out" / "result.parquet"


def run_all_shards(run_cli, job: Path, count: int, *extra: str) -> None:
    for index in range(count):
        code, _, err = run_cli("run", job, "--shard", f"{index}/{count}", *extra)
        assert code == 0, err


def refused(run_cli, *args) -> str:
    """The one line a refused command prints; it exits 2 and prints nothing else."""
    code, out, err = run_cli(*args)
    assert code == 2 and out == "" and err.count("\n") == 1, (code, out, err)
    return err


def test_a_plain_rerun_of_a_sharded_job_is_refused_until_merged_then_a_no_op(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS)
    run_all_shards(run_cli, job, 2)
    sent = sim.stats()["requests"]
    assert sent == len(ROWS)

    for command in ("run", "validate"):  # finished, not merged: a plain run would answer every row again
        err = refused(run_cli, command, job)
        assert f"{checkpoint(job)} holds answers of 2 shards (shard=K-of-2), and this run is unsharded" in err
        assert "--shard K/2" in err and "batch merge" in err and "new output.path" in err
    assert not list(checkpoint(job).glob("part-*")) and not (checkpoint(job) / "fingerprint.json").exists()

    code, _, err = run_cli("merge", job)
    assert code == 0, err
    merged = output(job).read_bytes()
    code, out, err = run_cli("run", job)  # the cron pattern: a complete job reruns as a no-op
    assert code == 0, err
    assert "this run: ok 0, failed 0, skipped (done before) 40" in out and "all runs: ok 40, failed 0, pending 0" in out
    assert "nothing sent: the job's shards (shard=K-of-2) have all finished and its output is merged from them" in out
    code, out, err = run_cli("validate", job)
    assert code == 0 and "complete: the job's shards (shard=K-of-2)" in out, err
    assert sim.stats()["requests"] == sent and output(job).read_bytes() == merged
    assert not list(checkpoint(job).glob("part-*")) and not (checkpoint(job) / "wal.jsonl").exists()
    code, _, err = run_cli("export", job, "--format", "csv", "--to", job.parent / "all.csv")
    assert code == 0, err  # the output is still the merged one

    rows = pd.DataFrame([*ROWS, {"review_id": "l999", "text": "added after the merge"}])
    rows.to_csv(job.parent / "reviews.csv", index=False)
    err = refused(run_cli, "run", job)  # a row to answer: its shard's, not a plain run's
    assert "holds answers of 2 shards (shard=K-of-2)" in err
    assert sim.stats()["requests"] == sent


def test_a_sharded_run_after_an_unsharded_one_is_refused(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS)
    code, _, err = run_cli("run", job, "--limit", "15")
    assert code == 0, err
    for args in (["run", job, "--shard", "0/2"], ["validate", job, "--shard", "1/2"],
                 ["validate", job, "--shards", "2"]):
        err = refused(run_cli, *args)
        assert f"{checkpoint(job)} holds answers of an unsharded run, and this run is " in err
        assert "run it unsharded" in err and "new output.path" in err
    assert not list(checkpoint(job).glob("shard=*"))
    assert sim.stats()["requests"] == 15
    code, out, err = run_cli("run", job)  # the unsharded run goes on where it stopped
    assert code == 0, err
    assert "this run: ok 25, failed 0, skipped (done before) 15" in out
    assert sim.stats()["requests"] == len(ROWS)


def test_a_new_shard_count_is_refused_and_the_whole_budget_holds(sim, make_job, run_cli):
    budget = 2400
    job = make_job(sim, rows=ROWS, budget={"max_total_tokens": budget})
    run_all_shards(run_cli, job, 4, "--limit", "3")
    sent = sim.stats()["requests"]
    assert sent == 12
    for args, this in ((["--shard", "0/3"], "shard 0/3"), ([], "unsharded"), (["--shard", "1/2"], "shard 1/2")):
        for command in ("run", "validate"):
            err = refused(run_cli, command, job, *args)
            assert f"holds answers of 4 shards (shard=K-of-4), and this run is {this}: it would send their rows " \
                   "again and pay for them twice" in err
    assert sim.stats()["requests"] == sent and set(sim.stats()["by_prompt"].values()) == {1}
    code, out, err = run_cli("status", job, "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["shard_count"] == 4 and status["ok"] == sent
    assert status["prompt_tokens"] + status["completion_tokens"] <= budget


def test_status_estimate_and_export_of_two_layouts_say_so_in_one_line(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS)
    code, _, err = run_cli("run", job, "--limit", "10")
    assert code == 0, err
    # Answers of another layout in the same checkpoint, as a batch older than this check could leave them.
    other = tmp_path / "other.yaml"
    other.write_text(job.read_text().replace("out/result.parquet", "elsewhere/result.parquet"))
    code, _, err = run_cli("run", other, "--shard", "0/3", "--limit", "5")
    assert code == 0, err
    shutil.move(tmp_path / "elsewhere" / "result.checkpoint" / "shard=0-of-3", checkpoint(job) / "shard=0-of-3")
    both = "holds answers of an unsharded run and of 3 shards (shard=K-of-3)"
    for args in (["status", job], ["status", job, "--json"], ["estimate", job],
                 ["export", job, "--format", "csv", "--to", tmp_path / "x.csv"], ["merge", job], ["run", job],
                 ["run", job, "--shard", "1/3"]):
        assert both in refused(run_cli, *args)
    for args in (["status", job], ["estimate", job], ["merge", job]):  # the ones that read say how to read one
        assert refused(run_cli, *args).endswith(
            ": read one layout at a time, without --shards or shards: N or with --shards 3; the answers of the others "
            "are left out of it\n")
    assert sim.stats()["requests"] == 15


def test_merge_refuses_a_finished_shard_whose_rows_are_pending_again(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS)
    run_all_shards(run_cli, job, 2)
    code, _, err = run_cli("merge", job)
    assert code == 0, err
    merged = output(job).read_bytes()
    edited = [dict(row) for row in ROWS]
    edited[4]["text"] = "layout review 4, edited"
    added = [*edited, {"review_id": "l998", "text": "appended"}]
    pd.DataFrame(added).to_csv(job.parent / "reviews.csv", index=False)
    changed = shard_of(pa.array(["l004", "l998"]), 2).tolist()
    waiting = sorted({f"shard {index}/2 ({counted(changed.count(index), 'row')} pending)" for index in changed})

    err = refused(run_cli, "merge", job)
    assert "cannot merge yet: " in err and all(shard in err for shard in waiting), err
    assert output(job).read_bytes() == merged  # nothing written
    export = refused(run_cli, "export", job, "--format", "csv", "--to", job.parent / "x.csv")
    assert all(shard in export for shard in waiting)  # the same check as export's

    code, out, err = run_cli("merge", job, "--partial")  # asked for: written as it is
    assert code == 0 and "pending 2" in out, err
    for index in sorted(set(changed)):
        code, _, err = run_cli("run", job, "--shard", f"{index}/2")
        assert code == 0, err
    code, _, err = run_cli("merge", job)
    assert code == 0, err
    final = pd.read_parquet(output(job))
    assert len(final) == 41 and (final["status"] == "ok").all()
    assert final.set_index("review_id").loc["l004", "text"] == "layout review 4, edited"


def test_merge_with_a_count_the_checkpoint_does_not_hold_writes_nothing(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS)
    for args in (["merge", job, "--partial", "--shards", "3"], ["merge", job, "--shards", "2"]):
        err = refused(run_cli, *args)  # nothing run yet: nothing to merge
        assert "nothing to merge" in err and "shard=K-of-" in err
    assert not output(job).exists()
    run_all_shards(run_cli, job, 2)
    code, _, err = run_cli("merge", job)
    assert code == 0, err
    merged = output(job).read_bytes()
    for args in (["merge", job, "--partial", "--shards", "5"], ["merge", job, "--shards", "3"],
                 ["status", job, "--shards", "5"]):
        err = refused(run_cli, *args)
        assert f"{checkpoint(job)} holds answers of 2 shards (shard=K-of-2), none of " in err
        assert err.endswith(": read it with --shards 2\n"), err  # it said "pass --shards N", which was passed
    assert output(job).read_bytes() == merged


def test_a_batch_api_shard_with_batches_only_holds_its_layout(start_sim, make_job, run_cli):
    sim = start_sim(batch_speed=0)  # the batches never end: the shard holds rows sent, no answer yet
    job = make_job(sim, rows=ROWS, mode="batch_api", batch_api={"max_requests_per_file": 20, "poll_interval_s": 0.05})
    code, _, err = run_cli("run", job, "--shard", "0/2")
    assert code == 6, err  # its batches still being worked on
    assert not list((checkpoint(job) / "shard=0-of-2").glob("part-*"))
    submitted = len(sim.stats()["batch_api"]["custom_ids"])
    assert submitted > 0
    err = refused(run_cli, "run", job)
    assert "holds answers of 2 shards (shard=K-of-2), and this run is unsharded" in err
    assert len(sim.stats()["batch_api"]["custom_ids"]) == submitted


def test_layouts_on_s3_are_read_from_the_bucket(sim, make_job, run_cli, s3: S3Bucket, tmp_path):
    body = pd.DataFrame(ROWS).to_csv(index=False).encode()
    s3.client().put_object(Bucket=s3.name, Key="in/reviews.csv", Body=body)
    job = make_job(sim, rows=ROWS, input_file="unused.csv", input={"path": f"{s3.url}/in/reviews.csv"},
                   output={"path": f"{s3.url}/out/result.parquet", "local_dir": str(tmp_path / "local")})
    for index in range(2):
        code, _, err = run_cli("run", job, "--shard", f"{index}/2")
        assert code == 0, err
    shutil.rmtree(tmp_path / "local")  # another host: only the bucket says what the checkpoint holds
    for args, this in ((["run", job], "unsharded"), (["run", job, "--shard", "0/3"], "shard 0/3"),
                       (["validate", job, "--shard", "2/3"], "shard 2/3")):
        err = refused(run_cli, *args)
        assert f"{s3.url}/out/result.checkpoint holds answers of 2 shards (shard=K-of-2), and this run is {this}" in err
    # the shards' first run claimed their layout; nothing else is outside their folders, no run of 3 wrote anything
    assert [key for key in s3.keys("out/result.checkpoint/") if "shard=" not in key or "-of-3" in key] == [
        f"out/result.checkpoint/{LAYOUT_NAME}"]
    code, _, err = run_cli("merge", job)
    assert code == 0, err
    code, out, err = run_cli("run", job)
    assert code == 0 and "nothing sent: the job's shards" in out, err
    assert sim.stats()["requests"] == len(ROWS)
    stored = s3.client().get_object(Bucket=s3.name, Key="out/result.parquet")["Body"].read()
    assert (pd.read_parquet(io.BytesIO(stored))["status"] == "ok").all()
    err = refused(run_cli, "merge", job, "--partial", "--shards", "5")
    assert "holds answers of 2 shards (shard=K-of-2), none of 5 shards" in err


@pytest.mark.parametrize("count", [1, 3])
def test_the_run_layout_that_holds_the_answers_goes_on(sim, make_job, run_cli, count):
    job = make_job(sim, rows=ROWS, shards=count)
    run_all_shards(run_cli, job, count, "--limit", "2")
    run_all_shards(run_cli, job, count)
    assert sim.stats()["requests"] == len(ROWS) and set(sim.stats()["by_prompt"].values()) == {1}
    code, _, err = run_cli("merge", job)
    assert code == 0, err


def test_a_run_of_another_layout_is_refused_while_the_first_has_answers_in_its_log_alone(
        start_sim, make_job, run_cli, s3: S3Bucket, tmp_path):
    """With the checkpoint on a bucket, a shard killed before its first part (or still running) holds its answers in
    its write-ahead log alone, on its host's disk: a run of another layout found no answer of it in the bucket and
    paid for its rows again. The shard's first run claimed the layout (_LAYOUT) before it sent anything: the other
    layout is refused, and the shard resumes."""
    sim = start_sim(latency_ms=200)
    job = make_job(sim, rows=ROWS, limits={"concurrency": 2},
                   output={"path": f"{s3.url}/out/result.parquet", "local_dir": str(tmp_path / "local"),
                           "checkpoint_seconds": 3600})
    shard = start_run(job, "--shard", "0/2")
    wait_until(lambda: sim.stats()["requests"] >= 3, "shard 0/2 answering")
    shard.send_signal(signal.SIGKILL)
    shard.communicate(timeout=60)
    assert not [key for key in s3.keys("out/") if "part-" in key]  # its answers are in its write-ahead log alone
    sent = sim.stats()["requests"]
    for command in ("validate", "run"):
        err = refused(run_cli, command, job)
        assert "holds answers of 2 shards (shard=K-of-2), and this run is unsharded" in err
    err = refused(run_cli, "run", job, "--shard", "0/3")
    assert "holds answers of 2 shards (shard=K-of-2), and this run is shard 0/3" in err
    assert sim.stats()["requests"] == sent
    run_all_shards(run_cli, job, 2)
    assert sim.stats()["requests"] <= len(ROWS) + 2  # at most what was in flight at the kill, sent again


@pytest.mark.parametrize("attempt", range(3))
def test_runs_of_two_layouts_started_at_once_never_both_send(start_sim, make_job, attempt):
    """Both pass the preflight (nothing is claimed yet); each takes its own lock; one makes _LAYOUT, the other finds
    it made for another layout and stops, exit 2, having sent nothing: every row is sent once."""
    sim = start_sim(latency_ms=1000)  # no answer is written before every run's preflight has looked
    job = make_job(sim, rows=ROWS[:12])
    runs = [start_run(job), start_run(job, "--shard", "0/2"), start_run(job, "--shard", "1/3")]
    ended = [(run.wait(timeout=120), run.communicate()[1]) for run in runs]
    codes = sorted(code for code, _ in ended)
    assert codes[0] == 0 and codes[1:] == [2, 2], "\n".join(f"{code}: {err}" for code, err in ended)
    winner = next(index for index, (code, _) in enumerate(ended) if code == 0)
    for code, err in ended:
        if code == 2:
            assert err.count("\n") == 1 and "it would send their rows again and pay for them twice" in err, err
    ids = pa.array([row["review_id"] for row in ROWS[:12]])
    rows = [len(ids), int((shard_of(ids, 2) == 0).sum()), int((shard_of(ids, 3) == 1).sum())][winner]
    assert sim.stats()["requests"] == rows  # each of the winner's rows once, no other sent


def test_a_layout_is_claimed_once_and_never_replaced(tmp_path):
    root = tmp_path / "result.checkpoint"
    root.mkdir()
    assert read_layout(root) == (False, None)
    claim_layout(root, 4)
    claim_layout(root, 4)  # the same layout again: another shard of it, or a rerun
    for other in (None, 3):
        with pytest.raises(LayoutTaken) as taken:
            claim_layout(root, other)
        assert taken.value.claimed == 4
    assert read_layout(root) == (True, 4)
    (root / LAYOUT_NAME).write_text("not json")  # no run writes this: no claim, the checkpoint's answers tell
    assert read_layout(root) == (False, None)
