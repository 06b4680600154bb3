"""What crosses the HTTP boundary, over real HTTP: answers of the wrong shape, a key the server repeats,
answers too big to hold, and how errors and requests are reported."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import output_of, wait_until

from batch.config import load_job

FINE = {"review_id": "r0", "text": "a fine review"}
KEY = "sk-boundary-SECRET-4f2a9c81e7d3"


def rows_with(marker: str) -> list[dict[str, str]]:
    return [FINE, {"review_id": "r1", "text": f"an odd one {marker}"}]


def records_of(job: Path, row_id: str) -> list[dict]:
    """Every record the checkpoint holds for a row: its parts and its write-ahead log."""
    folder = load_job(job).checkpoint_dir
    records = [r for part in sorted(folder.glob("part-*.parquet")) for r in pq.read_table(part).to_pylist()]
    wal = folder / "wal.jsonl"
    if wal.exists():
        records += [json.loads(line) for line in wal.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if r["id"] == row_id]


# Item 3: every answer is checked at the boundary -------------------------------------------------------

@pytest.mark.parametrize(("setting", "field"), [
    ('usage.prompt_tokens="abc"', "usage.prompt_tokens"),
    ("usage.prompt_tokens=-1", "usage.prompt_tokens"),
    ("usage.completion_tokens=1.5", "usage.completion_tokens"),
    ("usage.total_tokens=true", "usage.total_tokens"),
    ("usage.prompt_tokens=99999999999999999999", "usage.prompt_tokens"),  # over int64
    ('usage="lots"', "usage"),
    ('usage.prompt_tokens_details.cached_tokens="x"', "usage.prompt_tokens_details.cached_tokens"),
    ("choices={}", "choices"),
    ("choices.0=1", "choices[0]"),
    ('choices.0.message="hi"', "choices[0].message"),
    ("choices.0.message=null", "choices[0].message"),
    ("choices.0.message.content=5", "choices[0].message.content"),
    ('choices.0.message.content={"text": "hi"}', "choices[0].message.content"),
    ('choices.0.message.content="broken \\ud800 text"', "choices[0].message.content"),  # a lone surrogate
    ("choices.0.message.reasoning_content=7", "choices[0].message.reasoning_content"),
    ("choices.0.finish_reason=1", "choices[0].finish_reason"),
    ("model=5", "model"),
    ('id={"a": 1}', "id"),
    ("request_id=12", "request_id"),
])
def test_an_answer_of_the_wrong_shape_is_a_retried_bad_response_that_never_reaches_the_checkpoint(
        sim, make_job, run_cli, setting, field):
    job = make_job(sim, rows=rows_with(f"[[set:{setting}]]"))
    code, out, err = run_cli("run", job)
    assert code == 1, err
    result = output_of(job).set_index("review_id")
    assert result.loc["r0", "status"] == "ok"
    bad = result.loc["r1"]
    assert (bad["status"], bad["error_class"], bad["attempts"]) == ("failed", "bad_response", 3)
    assert f" {field} " in bad["error"] or f" {field}," in bad["error"], bad["error"]
    assert [r["status"] for r in records_of(job, "r1")] == ["failed"]  # the odd answer was never recorded
    assert run_cli("status", job)[0] == 0  # and the checkpoint still reads


def test_a_count_sent_as_a_string_of_digits_is_taken_as_that_number(sim, make_job, run_cli):
    job = make_job(sim, rows=rows_with('[[set:usage.prompt_tokens="3"]]'))
    code, _, err = run_cli("run", job)
    assert code == 0, err
    row = output_of(job).set_index("review_id").loc["r1"]
    assert (row["status"], row["prompt_tokens"], row["attempts"]) == ("ok", 3, 1)
    assert run_cli("run", job)[0] == 0 and run_cli("status", job)[0] == 0


# Item 5: the key never reaches disk or the terminal, even when the server repeats it --------------------

def leaks(folder: Path, secret: str) -> list[str]:
    """The files under `folder` holding `secret` (Parquet read as values: its pages may be compressed)."""
    found = []
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix == ".parquet":
            text = json.dumps(pq.read_table(path).to_pylist(), ensure_ascii=False, default=str)
        else:
            text = path.read_bytes().decode("utf-8", "replace")
        if secret in text:
            found.append(str(path.relative_to(folder)))
    return found


def test_a_key_echoed_in_errors_and_answers_is_masked_everywhere(start_sim, make_job, run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("BOUNDARY_KEY", KEY)
    sim = start_sim(api_key=KEY, echo_key=True)
    rows = [FINE, {"review_id": "r1", "text": "refused [[error:400:1214]]"},
            {"review_id": "r2", "text": "broken [[error:500:1200]]"}]
    job = make_job(sim, rows=rows, model={"api_key_env": "BOUNDARY_KEY"})
    code, out, err = run_cli("run", job, "-v")
    assert code == 1, err
    result = output_of(job).set_index("review_id")
    # The server did repeat the key, and batch kept the message with the key masked.
    assert "you sent Authorization: Bearer ***" in result.loc["r1", "error"]
    assert "you sent Authorization: Bearer ***" in result.loc["r2", "error"]
    assert result.loc["r0", "response"].endswith("(you sent Authorization: Bearer ***)")
    assert KEY not in out and KEY not in err
    assert leaks(tmp_path, KEY) == []


def test_a_401_echoing_the_key_is_masked_in_the_summary_and_the_error_line(start_sim, make_job, run_cli, monkeypatch,
                                                                          tmp_path):
    monkeypatch.setenv("BOUNDARY_KEY", KEY)
    sim = start_sim(api_key="the-server-wants-another-key", echo_key=True)
    job = make_job(sim, rows=rows_with(""), model={"api_key_env": "BOUNDARY_KEY"})
    code, out, err = run_cli("run", job)
    assert code == 3, err
    assert "stopped: the API refused the job: auth: HTTP 401 code 1000" in out and "Bearer ***" in out
    summary = json.loads((load_job(job).checkpoint_dir / "summary.json").read_text(encoding="utf-8"))
    assert "Bearer ***" in summary["stopped"]
    assert KEY not in out and KEY not in err
    assert leaks(tmp_path, KEY) == []


# Item 11: what one answer can cost is bounded ------------------------------------------------------------

def test_an_answer_over_max_response_bytes_is_a_bad_response_giving_its_size(sim, make_job, run_cli):
    rows = [FINE, {"review_id": "r1", "text": "huge [[bigbody:300000]]"},
            {"review_id": "r2", "text": "long but fine [[bigbody:30000]]"}]
    job = make_job(sim, rows=rows, limits={"max_response_bytes": 65536})
    code, _, err = run_cli("run", job)
    assert code == 1, err
    result = output_of(job).set_index("review_id")
    assert list(result["status"]) == ["ok", "failed", "ok"]
    assert len(result.loc["r2", "response"]) == 30000
    assert result.loc["r1", "error_class"] == "bad_response"
    size = re.fullmatch(r"HTTP 200 with an answer of (\d+) bytes, over limits\.max_response_bytes \(65536\)",
                        result.loc["r1", "error"])
    assert size and int(size.group(1)) > 300000


def test_an_answer_of_unknown_length_is_read_no_further_than_the_cap(sim, make_job, run_cli):
    job = make_job(sim, rows=rows_with("[[bigstream:32000000]]"), limits={"max_response_bytes": 65536})
    code, _, err = run_cli("run", job)
    assert code == 1, err
    bad = output_of(job).set_index("review_id").loc["r1"]
    assert (bad["error_class"], bad["attempts"]) == ("bad_response", 3)
    assert bad["error"] == ("HTTP 200 with an answer of more than 65536 bytes, "
                            "over limits.max_response_bytes (65536)")
    # batch hung up after the cap: the server could not send any of the three 32 MB answers whole.
    wait_until(lambda: sim.stats()["by_status"].get("disconnected", 0) >= 3, "the server to see three hang-ups")
    assert sim.stats()["by_status"] == {"200": 1, "disconnected": 3}


def test_max_response_bytes_is_checked_in_the_job_file(sim, make_job, run_cli):
    job = make_job(sim, rows=rows_with(""), limits={"max_response_bytes": 10})
    code, _, err = run_cli("run", job)
    assert code == 2 and "limits.max_response_bytes: Input should be greater than or equal to 1024" in err
    assert sim.stats()["requests"] == 0


# Item 15: statuses and request counts as they were --------------------------------------------------------

@pytest.mark.parametrize(("code", "error_class", "attempts"), [
    ("1301", "content_filter", 1),
    ("1302", "rate_limited", 3),
    ("1200", "server_error", 3),
])
def test_a_200_carrying_an_error_code_is_judged_by_its_code_and_reported_as_http_200(
        sim, make_job, run_cli, code, error_class, attempts):
    job = make_job(sim, rows=rows_with(f"[[error:200:{code}]]"))
    assert run_cli("run", job)[0] == 1
    bad = output_of(job).set_index("review_id").loc["r1"]
    assert (bad["error_class"], bad["attempts"]) == (error_class, attempts)
    assert bad["error"].startswith(f"HTTP 200 code {code}: ")


def test_arrears_in_a_200_stop_the_job_reported_as_http_200(sim, make_job, run_cli):
    job = make_job(sim, rows=rows_with("[[error:200:1113]]"), limits={"concurrency": 1})
    code, out, _ = run_cli("run", job)
    assert code == 3
    assert "stopped: the API refused the job: account: HTTP 200 code 1113: " in out


def test_the_summary_counts_the_requests_of_a_run_stopped_by_a_fatal_answer(start_sim, make_job, run_cli):
    sim = start_sim(fail_after=0)  # every answer: 429 with code 1113 (arrears)
    rows = [{"review_id": f"r{i}", "text": f"review {i}"} for i in range(8)]
    job = make_job(sim, rows=rows, limits={"concurrency": 4})
    code, out, _ = run_cli("run", job)
    assert code == 3
    sent = sim.stats()["requests"]
    assert sent > 0
    summary = json.loads((load_job(job).checkpoint_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["run"]["attempts"] == sent
    assert f", {sent} requests" in out
