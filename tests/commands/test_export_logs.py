"""`batch export` (the final table as CSV, JSONL or Parquet) and logging (text/JSON, file log, redaction)."""

from __future__ import annotations

import json
import logging
import math
import re
import resource
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import batch
from batch import logs
from batch.commands.export import export_file, export_output
from batch.config import JobSpec, load_job
from batch.errors import ConfigError
from batch.logs import RedactSecrets, redact_everywhere, run_log, setup_logging

ROWS = [
    {"review_id": "r1", "text": "物流很快，包装也很好，五星好评！"},
    {"review_id": "r2", "text": "Battery lasts two days. Love it!"},
    {"review_id": "r3", "text": "屏幕太暗了 [[error:400:1301]]"},  # refused: response, tokens and cost are null
    {"review_id": "r4", "text": 'quotes "and", commas\nand a newline'},
]
SECRET = "sk-test-SECRET-never-print-me-123"


@pytest.fixture(autouse=True)
def restore_batch_logger():
    """Each test configures the "batch" logger its own way; put it back as it was afterwards."""
    logger = logging.getLogger("batch")
    saved = (list(logger.handlers), logger.level, logger.propagate, list(logs.SECRETS.secrets))
    yield
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:], logger.level, logger.propagate = saved[:3]
    logs.SECRETS.secrets[:] = saved[3]


@pytest.fixture
def finished(sim, make_job, run_cli) -> JobSpec:
    """A job run to completion against the simulator: one row refused, no known price (null costs)."""
    job = make_job(sim, rows=ROWS, model={"name": "mystery-model"})
    code, _, err = run_cli("run", job)
    assert code == 1, err  # a row failed, the job is complete
    spec = load_job(job)
    assert spec.output.path.is_file()
    return spec


def final_rows(spec: JobSpec) -> list[dict]:
    return pq.read_table(spec.output.path).to_pylist()


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# -- export --------------------------------------------------------------------------------------------
def test_final_table_has_chinese_text_and_nulls(finished):
    rows = {r["review_id"]: r for r in final_rows(finished)}
    assert rows["r1"]["status"] == "ok" and "物流很快" in rows["r1"]["response"]
    assert rows["r3"]["status"] == "failed" and rows["r3"]["response"] is None
    assert all(r["cost"] is None for r in rows.values())
    assert isinstance(rows["r1"]["latency_s"], float)


def test_export_parquet_is_the_same_table(finished, tmp_path):
    to = tmp_path / "exports" / "copy.parquet"
    assert export_output(finished, "parquet", to) == len(ROWS)
    assert pq.read_table(to).equals(pq.read_table(finished.output.path))
    assert leftovers(to.parent) == []


def test_export_jsonl_one_object_per_line_with_nulls_and_numbers(finished, tmp_path):
    to = tmp_path / "copy.jsonl"
    assert export_output(finished, "jsonl", to) == len(ROWS)
    text = to.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) == len(ROWS) and text.endswith("\n")
    assert [json.loads(line) for line in lines] == final_rows(finished)
    assert "物流很快，包装也很好" in text  # ensure_ascii=False: the characters, not \\u escapes
    first = json.loads(lines[0])
    assert isinstance(first["latency_s"], float) and isinstance(first["prompt_tokens"], int)
    refused = json.loads(lines[2])
    assert refused["response"] is None and refused["cost"] is None
    assert '"response": null' in lines[2]


def test_export_csv_round_trips(finished, tmp_path):
    to = tmp_path / "copy.csv"
    assert export_output(finished, "csv", to) == len(ROWS)
    schema = pq.read_schema(finished.output.path)
    back = pacsv.read_csv(to, convert_options=pacsv.ConvertOptions(
        column_types=schema, strings_can_be_null=True))
    assert back.column_names == schema.names
    assert back.to_pylist() == final_rows(finished)
    raw = to.read_text(encoding="utf-8")
    assert raw.splitlines()[0].startswith('"review_id","text"')
    assert "物流很快，包装也很好，五星好评！" in raw


def test_export_streams_many_batches_and_odd_types(make_job, tmp_path):
    spec = load_job(make_job())
    table = pa.table({
        "id": [f"r{i}" for i in range(5000)],
        "text": ["中文 text"] * 4999 + [None],
        "score": [0.5] * 4998 + [float("nan"), None],
        "tags": [["a", "标签"]] * 5000,
        "kind": pa.array(["x", "y"] * 2500).dictionary_encode(),
    })
    spec.output.path.parent.mkdir(parents=True)
    pq.write_table(table, spec.output.path, row_group_size=700)

    assert export_file(spec.output.path, "jsonl", tmp_path / "t.jsonl") == 5000
    lines = (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"id": "r0", "text": "中文 text", "score": 0.5, "tags": ["a", "标签"], "kind": "x"}
    assert json.loads(lines[-2])["score"] is None  # NaN is not JSON: null
    assert json.loads(lines[-1])["text"] is None

    assert export_file(spec.output.path, "csv", tmp_path / "t.csv") == 5000
    back = pacsv.read_csv(tmp_path / "t.csv").to_pylist()
    assert len(back) == 5000
    assert json.loads(back[0]["tags"]) == ["a", "标签"] and back[1]["kind"] == "y"
    assert back[-2]["score"] is None or math.isnan(back[-2]["score"])

    assert export_file(spec.output.path, "parquet", tmp_path / "t.parquet") == 5000
    copy, original = pq.read_table(tmp_path / "t.parquet"), pq.read_table(spec.output.path)
    assert copy.schema == original.schema
    assert copy.drop_columns(["score"]).equals(original.drop_columns(["score"]))
    assert copy.column("score").to_pylist()[:4998] == [0.5] * 4998  # NaN != NaN, so the tail by hand
    assert math.isnan(copy.column("score")[4998].as_py()) and copy.column("score")[4999].as_py() is None


def test_export_replaces_an_older_file_whole(finished, tmp_path):
    to = tmp_path / "copy.csv"
    to.write_text("old\n")
    assert export_output(finished, "csv", to) == len(ROWS)
    assert to.read_text(encoding="utf-8").count("\n") > len(ROWS)


def test_a_failed_export_leaves_the_target_untouched(finished, tmp_path):
    to = tmp_path / "copy.jsonl"
    to.write_text("previous export\n")
    # Writes past 100 bytes fail with EFBIG, as on a full disk: the export fails half written.
    done = subprocess.run([sys.executable, "-m", "batch", "export", str(finished.job_path), "--format", "jsonl",
                           "--to", str(to)], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"batch: error: {to}: cannot write the export: File too large"), done.stderr
    assert "Traceback" not in done.stderr
    assert to.read_text() == "previous export\n"
    assert leftovers(tmp_path) == []


def test_export_before_the_job_is_complete_is_one_line_error(sim, make_job, tmp_path):
    spec = load_job(make_job(sim, rows=ROWS))
    with pytest.raises(ConfigError) as caught:
        export_output(spec, "csv", tmp_path / "x.csv")
    message = str(caught.value)
    assert "\n" not in message
    assert str(spec.output.path) in message
    assert "not complete" in message and "batch status" in message
    assert not (tmp_path / "x.csv").exists()


def test_export_to_a_folder_that_cannot_be_made(finished, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("I am a file")
    to = blocker / "sub" / "copy.csv"
    with pytest.raises(ConfigError) as caught:
        export_output(finished, "csv", to)
    assert str(to.parent) in str(caught.value) and "\n" not in str(caught.value)


def test_export_onto_a_folder_names_it(finished, tmp_path):
    to = tmp_path / "already-a-folder"
    to.mkdir()
    with pytest.raises(ConfigError) as caught:
        export_output(finished, "parquet", to)
    assert f"--to {to} is a folder: name the file to write" in str(caught.value)
    assert to.is_dir() and leftovers(tmp_path) == []


def test_export_unknown_format(finished, tmp_path):
    with pytest.raises(ConfigError, match="xlsx"):
        export_output(finished, "xlsx", tmp_path / "x.xlsx")  # type: ignore[arg-type]


# -- logging -------------------------------------------------------------------------------------------
log = logging.getLogger("batch")


def test_text_format(capsys):
    setup_logging(verbose=False)
    log.info("hello %s", "世界")
    log.debug("not shown unless verbose")
    err = capsys.readouterr().err
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d batch INFO hello 世界\n", err)


@pytest.mark.parametrize("verbose", [False, True])
def test_other_libraries_records_are_one_line_under_v_and_unseen_otherwise(capsys, monkeypatch, verbose):
    """gcsfs logs each request it gives up on with its traceback, beside batch's own line: without a handler of the
    command line's, Python's last resort printed it whole on stderr."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # the root logger as a program has it (not pytest's)
    setup_logging(verbose=verbose)
    logs.keep_secret(SECRET)
    try:
        raise ConnectionRefusedError(111, f"Connect call failed for {SECRET}")
    except ConnectionRefusedError:
        logging.getLogger("gcsfs").exception("_request out of retries on exception: %s\nsecond line", "refused")
    logging.getLogger("botocore.credentials").warning("Found credentials in environment variables.")
    err = capsys.readouterr().err
    if not verbose:
        assert err == ""
        return
    lines = err.splitlines()
    assert len(lines) == 2 and "Traceback" not in err and SECRET not in err, err
    assert lines[0].endswith(" ERROR gcsfs: _request out of retries on exception: refused")
    assert lines[1].endswith(" WARNING botocore.credentials: Found credentials in environment variables.")


def test_json_lines_parse_and_carry_fields(capsys):
    setup_logging(verbose=True, log_format="json")
    log.info("progress %d/%d rows", 3, 10, extra={"fields": {"done": 3, "total": 10, "名字": "值"}})
    logging.getLogger("batch.online.pool").debug("from a child logger")
    log.warning("plain")
    lines = capsys.readouterr().err.splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) == 3
    first = entries[0]
    assert first["level"] == "INFO" and first["logger"] == "batch"
    assert first["message"] == "progress 3/10 rows"
    assert first["done"] == 3 and first["total"] == 10 and first["名字"] == "值"
    assert "名字" in lines[0]  # not escaped
    when = datetime.fromisoformat(first["time"])
    assert when.tzinfo is not None and abs((datetime.now(when.tzinfo) - when).total_seconds()) < 60
    assert entries[1]["level"] == "DEBUG" and entries[1]["logger"] == "batch.online.pool"
    assert entries[2]["level"] == "WARNING" and entries[2]["message"] == "plain"
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)


def test_json_exception_is_one_line(capsys):
    setup_logging(verbose=False, log_format="json")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "ERROR" and "ValueError: boom" in entry["exception"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_file_log_appends_in_the_same_format(tmp_path, capsys, log_format):
    folder = tmp_path / "new" / "job.checkpoint"
    setup_logging(verbose=False, log_format=log_format)
    with run_log(folder, log_format):
        log.info("first run")
    setup_logging(verbose=False, log_format=log_format)  # a second run
    with run_log(folder, log_format):
        log.info("second run")
    log.info("after the run")  # stderr only
    lines = (folder / "batch.log").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    if log_format == "json":
        assert [json.loads(line)["message"] for line in lines] == ["first run", "second run"]
    else:
        assert lines[0].endswith("batch INFO first run") and lines[1].endswith("batch INFO second run")
    assert capsys.readouterr().err.splitlines()[:2] == lines  # the same lines on stderr


def test_file_log_in_an_unwritable_place_is_a_config_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    setup_logging(verbose=False)
    with pytest.raises(ConfigError) as caught:
        with run_log(blocker / "logs", "text"):
            pass
    assert str(blocker / "logs") in str(caught.value)


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("file_first", [True, False])
def test_a_secret_never_reaches_stderr_or_the_file(tmp_path, capsys, log_format, file_first):
    folder = tmp_path / "ckpt"
    setup_logging(verbose=True, log_format=log_format)
    if not file_first:  # a file opened after redact_everywhere() is covered too
        redact_everywhere([SECRET])
    with run_log(folder, log_format):
        if file_first:
            redact_everywhere([SECRET])
        log.warning("key is %s", SECRET)
        log.info("inline " + SECRET)
        log.info("headers %r", {"Authorization": f"Bearer {SECRET}"})
        log.info("with fields", extra={"fields": {"key": SECRET, "nested": {"k": [SECRET]}}})
        try:
            raise RuntimeError(f"request failed with {SECRET}")
        except RuntimeError:
            log.exception("oops %s", SECRET)
    logging.getLogger("batch.online.pool").debug("child %s", SECRET)  # stderr only: batch.log is the "batch" logger's
    err = capsys.readouterr().err
    written = (folder / "batch.log").read_text(encoding="utf-8")
    for text in (err, written):
        assert SECRET not in text
        assert text.count("***") >= 5
        assert "key is ***" in text and "Bearer ***" in text and "request failed with ***" in text
    assert "child ***" in err
    if log_format == "json":
        entries = [json.loads(line) for line in err.splitlines()]
        assert entries[3]["key"] == "***" and entries[3]["nested"] == {"k": ["***"]}


def test_redact_secrets_filter_rules():
    assert RedactSecrets(["", "abc", "12345"]).secrets == []  # too short to redact safely
    redact = RedactSecrets(["abcdef", "abcdefgh-longer"])
    record = logging.LogRecord("batch", logging.INFO, __file__, 1, "a=%s b=%s", ("abcdefgh-longer", "abcdef"), None)
    assert redact.filter(record) is True
    assert record.getMessage() == "a=*** b=***"
    bad = logging.LogRecord("batch", logging.INFO, __file__, 1, "no placeholder", ("abcdef",), None)
    redact.filter(bad)
    assert "abcdef" not in bad.getMessage()


# CLI wiring -------------------------------------------------------------------------------------------
# These go through `python -m batch` and pass once cli.py calls export_output / setup_logging(log_format)
# / run_log(spec.checkpoint_dir, ...) / redact_everywhere([api_key]).


def test_cli_export_csv(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS, model={"name": "mystery-model"})
    assert run_cli("run", job)[0] == 1
    to = tmp_path / "exports" / "result.csv"
    code, out, err = run_cli("export", job, "--format", "csv", "--to", to)
    assert code == 0, err
    assert out.strip() == f"exported {len(ROWS)} rows to {to}"
    assert len(pacsv.read_csv(to).to_pylist()) == len(ROWS)
    for fmt in ("jsonl", "parquet"):
        code, out, err = run_cli("export", job, "--format", fmt, "--to", tmp_path / f"result.{fmt}")
        assert code == 0, err
        assert f"exported {len(ROWS)} rows" in out


def test_cli_export_before_the_run_is_a_one_line_error(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS)
    code, out, err = run_cli("export", job, "--format", "jsonl", "--to", tmp_path / "x.jsonl")
    assert code == 2
    assert err.startswith("batch: error:") and "not complete" in err and "batch status" in err
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_run_log_format_json(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, model={"name": "mystery-model"})  # no known price: a warning line
    code, _, err = run_cli("run", job, "--log-format", "json")
    assert code == 1
    entries = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert entries
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e["level"] == "WARNING" and "no known price" in e["message"] for e in entries)


def test_cli_run_writes_batch_log_in_the_checkpoint_folder(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, model={"name": "mystery-model"})
    code, _, err = run_cli("run", job)
    assert code == 1
    log_file = load_job(job).checkpoint_dir / "batch.log"
    assert log_file.is_file()
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert any("no known price for model mystery-model" in line for line in lines)
    assert set(lines) <= set(err.splitlines())  # the same lines as on stderr


def test_cli_secret_never_in_json_logs_or_batch_log(start_sim, make_job, run_cli, monkeypatch):
    monkeypatch.setenv("BATCH_TEST_KEY", SECRET)
    sim = start_sim(api_key=SECRET)
    job = make_job(sim, rows=ROWS, model={"name": "mystery-model", "api_key_env": "BATCH_TEST_KEY"})
    code, out, err = run_cli("run", job, "--log-format", "json", "-v")
    assert code == 1
    log_file = load_job(job).checkpoint_dir / "batch.log"
    assert SECRET not in out + err
    assert SECRET not in log_file.read_text(encoding="utf-8")


@pytest.mark.parametrize("target", ["input", "job", "output", "wal", "own-checkpoint-new-file"])
def test_export_never_overwrites_the_jobs_own_files(finished, target):
    folder = finished.checkpoint_dir
    to = {"input": finished.input.path, "job": finished.job_path, "output": finished.output.path,
          "wal": folder / "wal.jsonl", "own-checkpoint-new-file": folder / "copy.csv"}[target]
    before = to.read_bytes() if to.exists() else None
    with pytest.raises(ConfigError) as caught:
        export_output(finished, "csv", to)
    assert str(to) in str(caught.value) and "\n" not in str(caught.value)
    assert (to.read_bytes() if to.exists() else None) == before


@pytest.mark.parametrize("shown", [True, False])
def test_progress_lines_only_when_progress_is_shown(shown):
    """Off a terminal a run logs a progress line every interval; with progress off (the Python API's
    progress=False) it logs none."""
    from batch.summary import Progress, RunStats

    logger = logging.getLogger("batch")
    logger.setLevel(logging.INFO)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    progress = Progress(RunStats(3), interval_s=0.0, tty=False, shown=shown)
    progress.refresh()
    progress.close()
    assert progress.bar is None
    assert [line.startswith("progress 0/3 rows") for line in lines] == ([True] if shown else [])


def test_export_after_the_input_changed_refuses_as_read_results_sees_pending_rows(finished, run_cli, tmp_path):
    edited = [{**ROWS[0], "text": "edited: slow delivery"}, *ROWS[1:], {"review_id": "r5", "text": "appended"}]
    pd.DataFrame(edited).to_csv(finished.input.path, index=False)
    assert batch.read_results(finished.job_path)["status"].tolist() == ["pending", "ok", "failed", "ok", "pending"]

    to = tmp_path / "x.csv"
    code, out, err = run_cli("export", finished.job_path, "--format", "csv", "--to", to)
    assert code == 2 and out == ""
    assert err.strip() == (f"batch: error: {finished.output.path}: the job is not complete: 2 rows pending (see "
                           f"`batch status {finished.job_path}`; `batch run` answers them)")
    assert not to.exists()
