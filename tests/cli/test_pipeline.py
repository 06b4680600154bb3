"""End to end over real HTTP: input table -> simulator -> checkpoint -> final Parquet."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from helpers import DATA, output_of, summary_of

from batch.preflight import preflight
from batch.runner import RunOptions, run_job
from batch.simulator import completion_for

REVIEWS = pd.read_csv(DATA / "reviews.csv")


def expected(text: str, system: str | None = None, max_tokens: int = 64) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": f"Classify: {text}"}]
    return completion_for("glm-4-flash", messages, max_tokens)


@pytest.mark.parametrize("input_file", ["reviews.csv", "reviews.parquet", "reviews.jsonl"])
def test_every_row_answered_in_input_order(sim, make_job, run_cli, input_file):
    job = make_job(sim, input_file=input_file, prompt={"system": "Be brief.", "template": "Classify: {text}"})
    code, out, err = run_cli("run", job)
    assert code == 0, err
    result = output_of(job)
    assert list(result["review_id"]) == list(REVIEWS["review_id"])
    assert list(result["text"]) == list(REVIEWS["text"])
    assert set(result["status"]) == {"ok"}
    for row in result.itertuples():
        want = expected(row.text, "Be brief.")
        assert row.response == want["content"]
        assert row.prompt_tokens == want["prompt_tokens"]
        assert row.completion_tokens == want["completion_tokens"]
        assert row.total_tokens == want["prompt_tokens"] + want["completion_tokens"]
        assert row.finish_reason == "stop" and row.attempts == 1 and row.cost == 0.0
    summary = summary_of(job)
    assert summary["run"]["ok"] == len(REVIEWS)
    assert summary["run"]["total_tokens"] == int(result["total_tokens"].sum())
    assert "ok 12, failed 0" in out
    assert sim.stats()["requests"] == len(REVIEWS)


def test_rerun_of_complete_job_sends_nothing(sim, make_job, run_cli):
    job = make_job(sim)
    assert run_cli("run", job)[0] == 0
    final = job.parent / "out" / "result.parquet"
    mtime = final.stat().st_mtime_ns
    code, out, _ = run_cli("run", job)
    assert code == 0
    assert sim.stats()["requests"] == len(REVIEWS)
    assert "skipped (done before) 12" in out
    assert final.stat().st_mtime_ns == mtime  # a no-op: the final file is not rewritten


def test_resume_sends_only_unanswered_rows(start_sim, make_job, run_cli):
    # The first server stops the job after 5 answers (1113 arrears), the second finishes it.
    failing = start_sim(fail_after=5, fail_status=429, fail_code="1113")
    job = make_job(failing, limits={"concurrency": 1})
    code, _, err = run_cli("run", job)
    assert code == 3
    assert "1113" in err
    assert not (job.parent / "out" / "result.parquet").exists()  # not written while rows are pending

    healthy = start_sim()
    job = make_job(healthy, limits={"concurrency": 1})
    code, out, _ = run_cli("run", job)
    assert code == 0
    assert healthy.stats()["requests"] == len(REVIEWS) - 5
    # Concurrency 1 answers rows in order: the first five were paid for and are never asked again.
    prompts = [f"Classify: {text}" for text in REVIEWS["text"]]
    assert set(healthy.stats()["by_prompt"]) == set(prompts[5:])
    result = output_of(job)
    assert list(result["review_id"]) == list(REVIEWS["review_id"])
    assert set(result["status"]) == {"ok"}


def test_messages_column_and_derived_ids(sim, make_job, run_cli):
    rows = [
        {"messages": json.dumps([{"role": "user", "content": "你好"}], ensure_ascii=False)},
        {"messages": json.dumps([{"role": "user", "content": "Hello"}])},
        {"messages": json.dumps([{"role": "user", "content": "Hello"}])},  # same content: its own id
    ]
    job = make_job(sim, rows=rows, input={"path": "questions.csv", "id_column": None},
                   input_file="questions.csv", prompt={"template": None, "messages_column": "messages"},
                   output={"keep_columns": []})
    code, _, err = run_cli("run", job)
    assert code == 0, err
    result = output_of(job)
    assert len(result) == 3 and result["row_id"].is_unique
    assert result["row_id"][2] == result["row_id"][1] + "-2"
    assert result["response"][0] == completion_for("glm-4-flash", [{"role": "user", "content": "你好"}], 64)["content"]
    # The repeated request was sent once; the copy is marked and costs nothing.
    assert sim.stats()["requests"] == 2
    assert list(result["cache_hit"]) == [False, False, True]
    assert result["response"][2] == result["response"][1] and result["cost"][2] == 0.0
    # Ids are stable across runs: a rerun finds them all answered.
    assert run_cli("run", job)[0] == 0
    assert sim.stats()["requests"] == 2


def test_empty_prompt_fails_the_row_without_a_request(sim, make_job, run_cli):
    rows = [{"review_id": "a", "text": "fine"}, {"review_id": "b", "text": ""}, {"review_id": "c", "text": "good"}]
    job = make_job(sim, rows=rows)
    code, out, _ = run_cli("run", job)
    assert code == 1
    result = output_of(job).set_index("review_id")
    assert result.loc["b", "status"] == "failed"
    assert result.loc["b", "error_class"] == "bad_prompt"
    assert "text" in result.loc["b", "error"]
    assert result.loc["b", "attempts"] == 0
    assert sim.stats()["requests"] == 2


@pytest.mark.asyncio
async def test_run_job_api_and_finish_reason_length(sim, make_job):
    job = make_job(sim, model={"params": {"max_tokens": 3}})
    summary = await run_job(preflight(job), RunOptions(tty=False))
    assert summary["exit_code"] == 0
    assert summary["run"]["finish_reasons"] == {"length": len(REVIEWS)}
    result = output_of(job)
    assert (result["completion_tokens"] == 3).all()
    assert (result["finish_reason"] == "length").all()


def test_failed_rows_are_retried_only_with_retry_failed(sim, make_job, run_cli):
    rows = [{"review_id": "a", "text": "fine"}, {"review_id": "b", "text": "needs luck [[flaky:3]]"}]
    job = make_job(sim, rows=rows, retry={"max_attempts": 2})
    assert run_cli("run", job)[0] == 1
    assert output_of(job).set_index("review_id").loc["b", "status"] == "failed"

    assert run_cli("run", job)[0] == 1  # a plain rerun leaves the failure alone
    assert sim.stats()["requests"] == 3

    code, out, err = run_cli("run", job, "--retry-failed")
    assert code == 0, out + err
    result = output_of(job).set_index("review_id")
    assert result.loc["b", "status"] == "ok" and result.loc["b", "attempts"] == 4  # 2 in the first run, 2 now
    assert len(result) == 2  # the retried row replaced its failure, once
    assert sim.stats()["requests"] == 5


def test_zhipu_key_from_a_dotenv_beside_the_job(start_sim, make_job, run_cli, monkeypatch, tmp_path):
    monkeypatch.delenv("ZHIPU_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    sim = start_sim(api_key="key-from-dotenv-0123456789")
    job = make_job(sim, model={"provider": "zhipu", "base_url": sim.url.replace("/v1", "/api/paas/v4/")})
    (job.parent / ".env").write_text("ZHIPU_API_KEY=key-from-dotenv-0123456789\n")
    code, out, err = run_cli("run", job)
    assert code == 0, err
    assert sim.stats()["by_status"] == {"200": len(REVIEWS)}
    assert "key-from-dotenv" not in out + err


def test_simulate_subcommand_runs_a_command_against_the_simulator():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "batch", "simulate", "--port", "0", "--",
         sys.executable, "-c", "import os; print(os.environ['BATCH_SIMULATOR_URL'])"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("http://127.0.0.1:")
