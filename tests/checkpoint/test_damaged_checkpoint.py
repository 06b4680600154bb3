"""A damaged checkpoint never stops a job, and a checkpoint that can no longer be written stops the run at once.

Damage: a log line that is not JSON or has fields of the wrong type, a zero-byte or truncated part, a corrupt
fingerprint.json or summary.json. Each is named in one line, every readable record is kept, and only the rows
whose records were lost are sent again. Write failures (the folder deleted, the disk full, the folder made
immutable) stop the run with exit 70 and one line; at most the requests in flight are lost.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess

import pyarrow.parquet as pq
import pytest
from helpers import can_make_immutable, checkpoint_of, output_of, start_run, wait_until

ROWS = [{"review_id": f"r{i:03d}", "text": f"review {i}"} for i in range(20)]


def prompt_of(row: dict[str, str]) -> str:
    return f"Classify: {row['text']}"


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text


# -- item 3: reading a damaged checkpoint ------------------------------------------------------------

def test_a_log_with_a_line_that_is_not_json_and_a_record_of_wrong_types_is_salvaged(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS)
    assert run_cli("run", job, "--limit", "10")[0] == 0
    folder = checkpoint_of(job)
    # What a killed run may leave: row 10's answer with a count as text (ArrowInvalid when the log was compacted),
    # a line that is not JSON in the middle, and a record with a status that cannot be read.
    odd = {"id": "r010", "seq": 10, "status": "ok", "response": "kept", "finish_reason": "stop",
           "prompt_tokens": "3", "completion_tokens": 2.0, "total_tokens": "5", "cost": "0", "model": "glm-4-flash",
           "attempts": 1, "cache_hit": "no"}
    unreadable = {"id": "r011", "seq": 11, "status": 7, "response": "lost"}
    (folder / "wal.jsonl").write_text(json.dumps(odd) + "\n{not json\n" + json.dumps(unreadable) + "\n")

    for command in ("status", "estimate"):
        code, out, err = run_cli(command, job)
        assert code == 0, err
        no_traceback(out, err)
        assert err.count("wal.jsonl is damaged") == 1, err  # one line, though status reads the log twice
    code, out, _ = run_cli("status", job)
    assert "ok 11, failed 0, pending 9" in out

    code, out, err = run_cli("run", job)
    assert code == 0, err
    no_traceback(out, err)
    assert "wal.jsonl is damaged" in err and "prompt_tokens" in err
    assert (folder / "wal.jsonl.damaged").read_text() == "{not json\n"
    # Row 10's salvaged answer was kept (not sent again); row 11's record could not be read: it was sent.
    asked = sim.stats()["by_prompt"]
    assert prompt_of(ROWS[10]) not in asked and asked[prompt_of(ROWS[11])] == 1
    assert sim.stats()["requests"] == 20 - 1
    out_rows = output_of(job).set_index("review_id")
    assert out_rows.loc["r010", "response"] == "kept" and out_rows.loc["r010", "prompt_tokens"] == 3
    assert (out_rows["status"] == "ok").all() and len(out_rows) == 20


@pytest.mark.parametrize("damage", ["zero_bytes", "truncated"])
def test_a_damaged_part_is_moved_aside_and_only_its_rows_are_sent_again(sim, make_job, run_cli, tmp_path, damage):
    job = make_job(sim, rows=ROWS, output={"checkpoint_rows": 5})
    assert run_cli("run", job, "--limit", "15")[0] == 0
    folder = checkpoint_of(job)
    part = folder / "part-000002.parquet"
    lost = set(pq.read_table(part, columns=["id"]).column("id").to_pylist())
    assert len(lost) == 5
    data = part.read_bytes()
    part.write_bytes(b"" if damage == "zero_bytes" else data[: len(data) // 2])

    for command in ("status", "estimate"):
        code, out, err = run_cli(command, job)
        assert code == 0, err
        no_traceback(out, err)
        assert err.count("part-000002.parquet is damaged") == 1, err
    assert "ok 10, failed 0, pending 10" in run_cli("status", job)[1]
    assert "10 rows to send" in run_cli("estimate", job)[1]

    code, out, err = run_cli("run", job)
    assert code == 0, err
    no_traceback(out, err)
    assert "part-000002.parquet is damaged" in err and "moved aside" in err
    assert (folder / "part-000002.parquet.damaged").stat().st_size == (0 if damage == "zero_bytes" else len(data) // 2)
    # The five rows whose records were lost are done again, and only they: from the answer cache, which
    # still holds their answers, so every request was sent once.
    assert sim.stats()["requests"] == 20
    assert max(sim.stats()["by_prompt"].values()) == 1
    final = output_of(job)
    assert list(final["review_id"]) == [r["review_id"] for r in ROWS]
    assert (final["status"] == "ok").all()
    assert set(final.loc[final["cache_hit"], "review_id"]) == lost
    code, _, err = run_cli("export", job, "--format", "csv", "--to", tmp_path / "out.csv")
    assert code == 0, err


def test_of_a_part_with_a_damaged_row_group_the_other_row_groups_are_kept(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS)
    assert run_cli("run", job)[0] == 0
    part = checkpoint_of(job) / "part-000001.parquet"
    records = pq.read_table(part)
    pq.write_table(records, part, row_group_size=10)  # as a merged part: several row groups
    second = pq.ParquetFile(part).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(part.read_bytes())
    data[second:second + 64] = b"\xff" * 64
    part.write_bytes(bytes(data))
    lost = set(records.column("id").to_pylist()[10:])

    code, out, err = run_cli("status", job)
    assert code == 0, err
    assert "part-000001.parquet is damaged" in err and "ok 10, failed 0, pending 10" in out

    code, out, err = run_cli("run", job)
    assert code == 0, err
    no_traceback(out, err)
    assert "10 of its records were read and kept" in err
    assert (checkpoint_of(job) / "part-000001.parquet.damaged").exists()
    final = output_of(job)
    assert (final["status"] == "ok").all() and len(final) == 20
    assert set(final.loc[final["cache_hit"], "review_id"]) == lost  # done again, from the answer cache
    assert sim.stats()["requests"] == 20


@pytest.mark.parametrize("damage", ['{"model": "glm-4-fl', '["model", "glm-4-flash"]'])
def test_a_damaged_fingerprint_is_a_one_line_error_and_force_writes_it_again(sim, make_job, run_cli, damage):
    job = make_job(sim, rows=ROWS)
    assert run_cli("run", job, "--limit", "5")[0] == 0
    fingerprint = checkpoint_of(job) / "fingerprint.json"
    fingerprint.write_text(damage)  # cut short, or JSON that is not an object

    code, out, err = run_cli("run", job)
    assert code == 2
    no_traceback(out, err)
    assert err.count("\n") == 1 and "fingerprint.json is damaged" in err and "--force" in err
    assert sim.stats()["requests"] == 5  # nothing sent
    code, out, err = run_cli("validate", job)  # validate makes the run's checks: the same line
    assert code == 2 and "fingerprint.json is damaged" in err
    no_traceback(out, err)

    code, _, err = run_cli("run", job, "--force")
    assert code == 0, err
    assert json.loads(fingerprint.read_text())["model"] == "glm-4-flash"
    assert sim.stats()["requests"] == 20


def test_a_damaged_answer_cache_is_a_one_line_error_saying_it_can_be_deleted(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS)
    assert run_cli("run", job, "--limit", "5")[0] == 0
    cache = checkpoint_of(job) / "answers.sqlite"
    cache.write_bytes(b"not a database" * 100)
    code, out, err = run_cli("run", job)
    assert code == 2
    no_traceback(out, err)
    assert err.count("\n") == 1 and "answers.sqlite" in err and "delete it" in err
    cache.unlink()
    assert run_cli("run", job)[0] == 0
    assert sim.stats()["requests"] == 20


@pytest.mark.parametrize("text", ["{not json", "[]", '{"exit_code": 0}'])
def test_status_says_a_damaged_summary_is_unreadable(sim, make_job, run_cli, text):
    job = make_job(sim, rows=ROWS)
    assert run_cli("run", job)[0] == 0
    (checkpoint_of(job) / "summary.json").write_text(text)
    code, out, err = run_cli("status", job)
    assert code == 0, err
    no_traceback(out, err)
    assert "last run: its summary is unreadable" in out and "summary.json is damaged" in out
    assert "ok 20, failed 0, pending 0" in out
    assert json.loads(run_cli("status", job, "--json")[1])["last_run"]["state"] == "unreadable"


# -- item 16: status after a killed run -----------------------------------------------------------------

def test_status_after_kill_9_says_the_last_run_did_not_finish(start_sim, make_job, run_cli):
    sim = start_sim(latency_ms=200)
    job = make_job(sim, rows=ROWS, limits={"concurrency": 2})
    assert run_cli("run", job, "--limit", "2")[0] == 0  # a previous run that ended with exit 0
    process = start_run(job)
    try:
        wait_until(lambda: sim.stats()["requests"] >= 4, "requests of the second run")
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    finally:
        process.kill()
    code, out, err = run_cli("status", job)
    assert code == 0, err
    assert "last run: did not finish (killed or crashed), started " in out and f"pid {process.pid}" in out
    assert "exit 0" not in out
    assert json.loads(run_cli("status", job, "--json")[1])["last_run"]["state"] == "did_not_finish"

    sim.reconfigure(latency_ms=0)  # the latency let the run be killed mid-way; the rerun needs none
    assert run_cli("run", job)[0] == 0
    out = run_cli("status", job)[1]
    assert "last run: finished" in out and "exit 0" in out and "did not finish" not in out


# -- item 4: a checkpoint that can no longer be written ----------------------------------------------

BIG = [{"review_id": f"b{i:03d}", "text": f"big {i}"} for i in range(300)]
CONCURRENCY = 4


def test_deleting_the_checkpoint_mid_run_stops_it_at_once(start_sim, make_job):
    sim = start_sim(latency_ms=40)
    job = make_job(sim, rows=BIG, limits={"concurrency": CONCURRENCY})
    process = start_run(job)
    try:
        wait_until(lambda: sim.stats()["requests"] >= 20, "the first requests")
        shutil.rmtree(checkpoint_of(job), ignore_errors=True)
        assert not (checkpoint_of(job) / "wal.jsonl").exists()
        sent_at_deletion = sim.stats()["requests"]
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 70, err
    no_traceback(out, err)
    error = [line for line in err.splitlines() if line.startswith("batch: error:")]
    assert len(error) == 1 and "wal.jsonl" in error[0] and "deleted" in error[0], err
    # Only the requests in flight when the folder went: no new one.
    assert sim.stats()["requests"] - sent_at_deletion <= CONCURRENCY


def _file_size_limit(limit: int):
    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_file_size


def test_a_full_disk_stops_the_run_at_the_first_failed_write_and_a_rerun_loses_only_what_was_in_flight(
        start_sim, make_job, run_cli):
    sim = start_sim(latency_ms=5)
    job = make_job(sim, rows=BIG, limits={"concurrency": CONCURRENCY}, output={"checkpoint_rows": 10_000})
    # Writes past 48 KB fail with EFBIG, as on a full disk (CPython ignores SIGXFSZ).
    process = start_run(job, preexec_fn=_file_size_limit(48 * 1024))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 70, err
    no_traceback(out, err)
    error = [line for line in err.splitlines() if line.startswith("batch: error:")]
    assert len(error) == 1 and str(checkpoint_of(job)) in error[0], err
    # The log or a part says EFBIG's own words; SQLite reports the same failed write as its generic I/O error.
    assert any(words in error[0] for words in ("File too large", "disk is full", "disk I/O error")), err
    first_run = sim.stats()["requests"]
    assert first_run < len(BIG)
    code, out, _ = run_cli("status", job)
    assert code == 0 and "last run: stopped on an error (exit 70)" in out, out

    code, _, err = run_cli("run", job)
    assert code == 0, err
    # What the first run kept was not sent again: at most the requests in flight at the failure were lost.
    assert sim.stats()["requests"] <= len(BIG) + CONCURRENCY
    assert list(output_of(job)["review_id"]) == [r["review_id"] for r in BIG]


def rows_with_notes(count: int) -> list[dict[str, str]]:
    """Rows that each keep 4 KB of random text in the output, and nowhere in the checkpoint: of the files a run
    writes, the output is by far the largest (~4 KB a row)."""
    return [{"review_id": f"r{i:02d}", "text": f"review {i}", "note": os.urandom(2048).hex()} for i in range(count)]


def test_a_disk_full_while_the_final_file_is_written_stops_the_run_with_70_and_status_names_it(sim, make_job, run_cli):
    rows = rows_with_notes(40)
    job = make_job(sim, rows=rows, output={"keep_columns": ["text", "note"]})
    process = start_run(job, preexec_fn=_file_size_limit(64 * 1024))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 70, err  # stopped by the disk, not 2: 40 answers were received and kept
    no_traceback(out, err)
    output = checkpoint_of(job).parent / "result.parquet"
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("batch: error:")]
    assert str(output) in err and "File too large" in err and "a rerun writes it" in err, err
    assert list(output.parent.iterdir()) == [checkpoint_of(job)]  # no output, half written or whole
    code, out, _ = run_cli("status", job)
    assert code == 0 and "ok 40, failed 0, pending 0" in out
    assert "last run: stopped on an error (exit 70)" in out and f"{output}: cannot write the output" in out, out

    code, _, err = run_cli("run", job)  # room again: the output is written, nothing sent again
    assert code == 0, err
    assert sim.stats()["requests"] == 40
    assert list(output_of(job)["note"]) == [row["note"] for row in rows]


def test_a_disk_that_the_final_file_fills_up_has_room_again_for_the_runs_error(sim, make_job, run_cli, tmp_path):
    """A real full disk (a small tmpfs): the failed output's temp file is closed and deleted, so its space comes
    back at once, and the error the run stopped on is noted for `status`."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and a tmpfs mount")
    try:
        output = disk / "result.parquet"  # 60 rows: ~240 KB, the checkpoint ~50 KB
        job = make_job(sim, rows=rows_with_notes(60), output={"path": str(output), "keep_columns": ["text", "note"]})
        code, out, err = run_cli("run", job)
        assert code == 70, err
        assert err.startswith(f"batch: error: {output}: cannot write the output: No space left on device"), err
        assert sorted(os.listdir(disk)) == ["result.checkpoint"]
        code, out, _ = run_cli("status", job)
        assert "last run: stopped on an error (exit 70)" in out and f"{output}: cannot write the output" in out, out
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("frozen", ["folder_and_files", "folder"])
def test_an_immutable_checkpoint_stops_the_run_with_one_line_not_sigbus(start_sim, make_job, run_cli, tmp_path,
                                                                        frozen):
    if not can_make_immutable(tmp_path):
        pytest.skip("needs root and chattr on a file system that supports it")
    sim = start_sim(latency_ms=40)
    rows_per_part = 10
    job = make_job(sim, rows=BIG, limits={"concurrency": CONCURRENCY}, output={"checkpoint_rows": rows_per_part})
    folder = checkpoint_of(job)
    process = start_run(job)
    try:
        wait_until(lambda: sim.stats()["requests"] >= 20, "the first requests")
        files = [str(f) for f in folder.iterdir()] if frozen == "folder_and_files" else []
        subprocess.run(["chattr", "+i", *files, str(folder)], check=True)
        sent_at_freeze = sim.stats()["requests"]
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
        subprocess.run(["chattr", "-R", "-i", str(folder)], capture_output=True)
    assert process.returncode == 70, err
    no_traceback(out, err)
    error = [line for line in err.splitlines() if line.startswith("batch: error:")]
    assert len(error) == 1 and "Operation not permitted" in error[0], err
    # With the files frozen the next log append fails; with the folder alone, the next part (the log still
    # takes the answers until then, and keeps them).
    in_flight = CONCURRENCY + (rows_per_part if frozen == "folder" else 0)
    assert sim.stats()["requests"] - sent_at_freeze <= in_flight

    sim.reconfigure(latency_ms=0)  # the latency kept requests in flight at the freeze; the rerun needs none
    code, _, err = run_cli("run", job)  # writable again: the answers logged before are kept
    assert code == 0, err
    assert sim.stats()["requests"] <= len(BIG) + CONCURRENCY
