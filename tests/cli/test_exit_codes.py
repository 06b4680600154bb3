"""Exit codes and what the terminal shows: unexpected errors (70), --limit (0), and -v's debug lines."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from helpers import output_of

from batch.cli import build_parser, log_folder, report_internal_error
from batch.config import load_job
from batch.logs import redact_everywhere, setup_logging

ROWS = [{"review_id": f"r{i}", "text": f"review number {i}"} for i in range(6)]


def nested_job_file(folder: Path) -> Path:
    """A job file nested deeper than PyYAML's recursive composer can follow: a RecursionError, not a YAMLError."""
    path = folder / "nested.yaml"
    path.write_text("name: " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    return path


def test_an_unexpected_error_exits_70_with_one_line_and_the_traceback_in_a_file(tmp_path, run_cli):
    code, out, err = run_cli("validate", nested_job_file(tmp_path))
    assert code == 70
    assert err.count("\n") == 1 and "Traceback" not in err  # one line, never a raw traceback
    assert err.startswith("batch: internal error: RecursionError in config.py:")
    saved = Path(re.search(r"the traceback is in (\S+)\)", err).group(1))
    try:
        assert "Traceback (most recent call last)" in saved.read_text() and "RecursionError" in saved.read_text()
    finally:
        saved.unlink()


def test_the_traceback_goes_to_batch_log_in_the_checkpoint_folder_with_the_key_masked(tmp_path, make_job):
    job = make_job(rows=ROWS)
    checkpoint = load_job(job).checkpoint_dir
    checkpoint.mkdir(parents=True)
    setup_logging(False)
    redact_everywhere(["sk-very-secret-key"])
    try:
        load_job(nested_job_file(tmp_path))
    except RecursionError as exc:
        exc.args = ("depth exceeded near sk-very-secret-key",)
        line = report_internal_error(exc, checkpoint)
    assert re.fullmatch(r"batch: internal error: RecursionError in config\.py:\d+ \(\w+\): depth exceeded near "
                        rf"\*\*\* \(the traceback is in {re.escape(str(checkpoint / 'batch.log'))}\); please report it",
                        line)
    logged = (checkpoint / "batch.log").read_text()
    assert "Traceback (most recent call last)" in logged and "sk-very-secret-key" not in logged


@pytest.mark.parametrize("named", [["--shard", "1/2"], ["--shards", "2", "JOB_COMPLETION_INDEX=1"],
                                   ["JOB_COMPLETION_INDEX=1"], []])
def test_an_internal_errors_traceback_goes_to_the_batch_log_its_run_writes(sim, make_job, run_cli, monkeypatch,
                                                                           named):
    """A shard's run writes its lines to the batch.log in its own folder: the traceback of an internal error in it
    goes there too, and the error line names that file, however the shard was named (--shard, or --shards / the
    job file's shards: with an array job's index). A run of the whole job: the job's own batch.log."""
    rows = [{"review_id": f"r{i}", "text": f"review {i} [[error:400:1214]]"} for i in range(6)]  # -v logs each
    job = make_job(sim, rows=rows, shards=2 if named[-1:] == ["JOB_COMPLETION_INDEX=1"] and "--shards" not in named
                   else None)
    given = [word for word in named if "=" not in word]
    for variable in (word for word in named if "=" in word):
        monkeypatch.setenv(*variable.split("=", 1))
    code, _, err = run_cli("run", job, *given, "-v")
    assert code == 1, err  # its rows failed (400), each logged
    args = build_parser().parse_args(["run", str(job), *given])
    try:
        raise RuntimeError("a defect")
    except RuntimeError as exc:
        line = report_internal_error(exc, log_folder(args))
    path = Path(re.search(r"the traceback is in (\S+)\)", line).group(1))
    run_folder = load_job(job).checkpoint_dir / ("shard=1-of-2" if named else "")
    assert path == run_folder / "batch.log", line
    logged = path.read_text()
    assert "Traceback (most recent call last)" in logged and "RuntimeError: a defect" in logged
    if named:  # the file the run wrote its own lines to, each naming the shard
        assert "shard 1/2: " in logged.split("Traceback")[0]


def test_a_cache_file_of_another_tool_is_a_one_line_error_before_any_request(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, cache={"path": "other.sqlite"})
    with sqlite3.connect(job.parent / "other.sqlite") as db:
        db.execute("CREATE TABLE answers (id INTEGER, text TEXT)")
    code, _, err = run_cli("run", job)
    assert code == 2, err
    assert "other.sqlite: not an answer cache of batch" in err and "id, text" in err
    assert err.count("\n") == 1
    assert sim.stats()["requests"] == 0


def test_a_damaged_cache_entry_is_sent_again(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, cache={"path": "shared.sqlite"})
    assert run_cli("run", job)[0] == 0
    with sqlite3.connect(job.parent / "shared.sqlite") as db:
        db.execute("UPDATE answers SET record = '{\"response\": \"cut off'")
    again = make_job(sim, rows=ROWS, cache={"path": "shared.sqlite"}, output={"path": "out2/result.parquet"})
    code, _, err = run_cli("run", again)
    assert code == 0, err
    assert sim.stats()["requests"] == 2 * len(ROWS)


def test_a_dotenv_that_is_not_utf8_is_a_one_line_error(sim, make_job, run_cli, monkeypatch):
    monkeypatch.delenv("SIM_TEST_KEY", raising=False)
    job = make_job(sim, rows=ROWS, model={"api_key_env": "SIM_TEST_KEY"})
    (job.parent / ".env").write_bytes(b"SIM_TEST_KEY=\xff\xfe-not-utf8\n")
    code, _, err = run_cli("run", job)
    assert code == 2
    assert err == f"batch: error: {job.parent / '.env'}: cannot read the .env file: not UTF-8 text\n"


def test_limit_with_rows_left_exits_0_even_when_a_limited_row_failed(sim, make_job, run_cli):
    rows = [dict(r) for r in ROWS]
    rows[1]["text"] += " [[error:400:1301]]"
    job = make_job(sim, rows=rows)
    code, out, _ = run_cli("run", job, "--limit", "3")
    assert code == 0, out  # not 1: that says "complete, some rows failed", and 3 rows are still pending
    assert "failed 1, pending 3" in out
    code, out, _ = run_cli("run", job)
    assert code == 1 and "failed 1, pending 0" in out  # complete now, with the failed row


def test_verbose_shows_each_retry_throttle_and_failure(start_sim, make_job, run_cli):
    sim = start_sim()
    rows = [dict(r) for r in ROWS]
    rows[2]["text"] += " [[flaky:1]]"
    rows[4]["text"] += " [[error:400:1301]]"
    rows[5]["text"] += " [[error:429:1302]]"
    job = make_job(sim, rows=rows, limits={"concurrency": 4})
    code, _, err = run_cli("run", job, "-v")
    assert code == 1, err
    assert re.search(r"DEBUG row r2: attempt 1 failed \(server_error: HTTP 500 code 1200.*\); retrying in \d+\.\d+ s",
                     err)
    assert re.search(r"DEBUG throttled \(429\) for a request sent as number \d in flight: "
                     r"concurrency limit \d -> \d", err)
    assert re.search(r"DEBUG row r4 failed after 1 attempt: content_filter: HTTP 400 code 1301", err)
    assert re.search(r"DEBUG row r5 failed after 3 attempts: rate_limited: HTTP 429 code 1302", err)
    assert output_of(job).set_index("review_id").loc["r4", "error_class"] == "content_filter"
    code, _, err = run_cli("run", make_job(sim, rows=rows, output={"path": "quiet/result.parquet"}))
    assert "DEBUG" not in err
