"""The Python API over the simulator: DataFrames in and out, resume, a running loop, Ctrl-C, keys, status."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers import DATA

import batch
from batch.simulator import SimulatorThread, answer_for

KEY = "sk-explicit-0123456789abcdef"


def local_model(sim: SimulatorThread) -> dict[str, Any]:
    return {"provider": "local", "name": "glm-4-flash", "base_url": sim.url, "params": {"max_tokens": 64}}


def reviews(count: int) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"review number {i}" for i in range(count)], "stars": [i % 5 for i in range(count)]},
                        index=pd.Index([f"r{i:03d}" for i in range(count)], name="review_id"))


def expected_answer(text: str) -> str:
    return answer_for("glm-4-flash", [{"role": "user", "content": f"Classify: {text}"}])


def when(condition: Callable[[], bool], then: Callable[[], None], timeout_s: float = 30) -> threading.Thread:
    """In a thread: wait (polling, with a deadline) until `condition` holds, then call `then`."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def ctrl_c() -> None:
    """A real SIGINT to the main thread, as a terminal's or a notebook's interrupt sends it."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


def test_run_frame_answers_every_row_and_a_second_call_sends_nothing(sim, tmp_path):
    frame = reviews(200)
    output = tmp_path / "out" / "sentiment.parquet"
    settings = {"template": "Classify: {text}", "model": local_model(sim), "output": output, "progress": False,
                "limits": {"concurrency": 8}}
    answered = batch.run_frame(frame, **settings)

    assert answered.index.equals(frame.index) and list(answered.columns[:2]) == ["text", "stars"]
    assert (answered["status"] == "ok").all()
    assert answered["response"].tolist() == [expected_answer(t) for t in frame["text"]]
    assert answered.attrs["batch_summary"]["job_totals"]["ok"] == 200
    assert sim.stats()["requests"] == 200
    written = {path: path.stat().st_mtime_ns for path in files_under(tmp_path / "out") if path.suffix != ".json"}

    again = batch.run_frame(frame, **settings)
    assert sim.stats()["requests"] == 200  # nothing sent
    pd.testing.assert_frame_equal(again, answered)
    input_file = tmp_path / "out" / "sentiment.input.parquet"
    assert input_file.stat().st_mtime_ns == written[input_file]  # the frame was written once
    assert output.stat().st_mtime_ns == written[output]
    # The job file beside the output is an ordinary job: the command line reads it too.
    assert batch.status(tmp_path / "out" / "sentiment.job.yaml")["ok"] == 200
    assert batch.status(output)["ok"] == 200


def test_run_frame_sends_a_changed_row_again(sim, tmp_path):
    frame = reviews(20)
    settings = {"template": "Classify: {text}", "model": local_model(sim), "output": tmp_path / "o.parquet",
                "progress": False}
    batch.run_frame(frame, **settings)
    frame.loc["r003", "text"] = "edited review"
    answered = batch.run_frame(frame, **settings)
    assert sim.stats()["requests"] == 21
    assert answered.loc["r003", "response"] == expected_answer("edited review")


def test_run_frame_keeps_the_frames_columns_and_prefixes_a_clashing_result_column(sim, tmp_path):
    frame = pd.DataFrame({"text": ["a", "b"], "status": ["new", "old"]})
    answered = batch.run_frame(frame, template="Classify: {text}", model=local_model(sim),
                               output=tmp_path / "o.parquet", progress=False)
    assert answered["status"].tolist() == ["new", "old"]
    assert answered["batch_status"].tolist() == ["ok", "ok"]


def test_run_frame_refuses_a_duplicate_index_before_writing_anything(sim, tmp_path):
    frame = pd.DataFrame({"text": ["a", "b"]}, index=[7, 7])
    with pytest.raises(batch.ConfigError, match="index holds '7' more than once"):
        batch.run_frame(frame, template="Classify: {text}", model=local_model(sim), output=tmp_path / "o.parquet")
    with pytest.raises(batch.ConfigError, match="names column 'txt', which the frame does not have"):
        batch.run_frame(frame.reset_index(drop=True), template="{txt}", model=local_model(sim),
                        output=tmp_path / "o.parquet")
    assert files_under(tmp_path) == [] and sim.stats()["requests"] == 0


@pytest.mark.parametrize(("call", "message"), [
    (lambda out: batch.run(None), "a job is its job file's path, a JobSpec or a mapping of its keys, not NoneType"),
    (lambda out: batch.run(pd.DataFrame({"text": ["a"]})), r"not DataFrame \(for a DataFrame, call run_frame\)"),
    (lambda out: batch.status(5), "not int"),
    (lambda out: batch.run("job.yaml", limit="3"), "limit must be a whole number, 0 or more, not '3'"),
    (lambda out: batch.run_frame([1], template="{text}", model="m", output=out), "takes a pandas DataFrame, not list"),
    (lambda out: batch.run_frame(pd.DataFrame({"text": ["a"]}), template="{text}", model=None, output=out),
     "model is the model's name or a mapping"),
    (lambda out: batch.run_frame(pd.DataFrame({"text": ["a"]}), template="{text}", model="m", output=None),
     "output is the final Parquet file's path, not NoneType"),
    (lambda out: batch.run_frame(pd.DataFrame({"text": ["a"]}), template="{text", model="m", output=out),
     "prompt.template: expected '}'"),
])
def test_a_wrong_argument_is_one_config_error_and_writes_nothing(tmp_path, call, message):
    with pytest.raises(batch.ConfigError, match=message):
        call(tmp_path / "o.parquet")
    assert files_under(tmp_path) == []


def test_run_returns_the_summary_for_a_job_file_a_mapping_or_a_job_spec(sim, make_job, tmp_path):
    job = make_job(sim)
    result = batch.run(job, progress=False)
    assert result.exit_code == 0 and result.complete and result.ok == result.rows_total == 12
    assert result.output == tmp_path / "out" / "result.parquet" and "ok 12, failed 0" in str(result)

    spec = batch.JobSpec.model_validate({
        "name": "spec-job", "input": {"path": str(tmp_path / "reviews.csv"), "id_column": "review_id"},
        "prompt": {"template": "Classify: {text}"}, "model": local_model(sim),
        "output": {"path": str(tmp_path / "spec" / "result.parquet")}})
    assert batch.run(spec, progress=False).ok == 12
    as_mapping = spec.model_dump()
    as_mapping["output"]["path"] = str(tmp_path / "mapping" / "result.parquet")
    assert batch.run(as_mapping, progress=False).ok == 12
    with pytest.raises(batch.ConfigError, match=r"^<job spec>: unknown key 'limts', did you mean 'limits'\?"):
        batch.run({**as_mapping, "limts": {}})


def test_a_stopped_run_raises_with_its_result(start_sim, make_job):
    sim = start_sim(fail_after=0, fail_status=401, fail_code="1000")
    job = make_job(sim)
    with pytest.raises(batch.ApiRefusedError) as stopped:
        batch.run(job, progress=False)
    assert stopped.value.exit_code == 3 and stopped.value.result.pending == 12
    assert isinstance(stopped.value, batch.RunStopped) and isinstance(stopped.value, batch.BatchError)


@pytest.mark.asyncio
async def test_the_sync_form_works_inside_a_running_event_loop(sim, make_job):
    job = make_job(sim)
    asyncio.get_running_loop()  # what Jupyter has: a loop running in this thread
    result = batch.run(job, progress=False)
    assert result.ok == 12 and sim.stats()["requests"] == 12
    answered = batch.run_frame(reviews(10), template="Classify: {text}", model=local_model(sim),
                               output=job.parent / "frame.parquet", progress=False)
    assert (answered["status"] == "ok").all()


@pytest.mark.asyncio
async def test_arun_runs_on_the_callers_loop_without_signal_handlers(start_sim, make_job):
    sim = start_sim(latency_ms=20)
    job = make_job(sim, rows=[{"review_id": f"a{i}", "text": f"t {i}"} for i in range(60)])
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    run = asyncio.create_task(batch.arun(job, progress=False))
    while sim.stats()["requests"] == 0 and not run.done():
        await asyncio.sleep(0)  # let the run start; the simulator answers on its own thread
    during = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    result = await run
    assert result.ok == 60
    assert during == before


@pytest.mark.asyncio
async def test_arun_frame_answers_a_frame(sim, tmp_path):
    answered = await batch.arun_frame(reviews(30), template="Classify: {text}", model=local_model(sim),
                                      output=tmp_path / "o.parquet", progress=False)
    assert (answered["status"] == "ok").all() and sim.stats()["requests"] == 30


def test_keyboard_interrupt_mid_run_stops_gracefully_and_the_next_call_resumes(start_sim, tmp_path):
    sim = start_sim(latency_ms=100)  # 300 rows take ~8 s: the interrupt after 40 always lands mid-run, even under load
    frame = reviews(300)
    settings = {"template": "Classify: {text}", "model": local_model(sim), "output": tmp_path / "o.parquet",
                "progress": False, "limits": {"concurrency": 4}}
    when(lambda: sim.stats()["requests"] >= 40, ctrl_c)
    with pytest.raises(batch.Interrupted) as interrupted:
        batch.run_frame(frame, **settings)
    stopped = interrupted.value.result
    assert isinstance(interrupted.value, KeyboardInterrupt)
    assert stopped is not None and stopped.exit_code == 130 and stopped.stopped == "interrupted by KeyboardInterrupt"
    assert stopped.pending > 0 and stopped.failed == 0 and stopped.ok + stopped.pending == 300
    assert sim.stats()["requests"] == stopped.ok  # the requests in flight finished and were kept

    sim.reconfigure(latency_ms=0)  # the resume only has to be right, not slow
    answered = batch.run_frame(frame, **settings)
    assert (answered["status"] == "ok").all()
    assert answered["response"].tolist() == [expected_answer(t) for t in frame["text"]]
    assert sim.stats()["requests"] == 300  # nothing lost, nothing sent twice
    assert max(sim.stats()["by_prompt"].values()) == 1


@pytest.mark.asyncio
async def test_cancelling_arun_stops_gracefully_and_the_next_call_resumes(start_sim, make_job):
    sim = start_sim(latency_ms=20)
    job = make_job(sim, rows=[{"review_id": f"c{i}", "text": f"t {i}"} for i in range(200)])
    run = asyncio.create_task(batch.arun(job, progress=False))
    while sim.stats()["requests"] < 20:
        await asyncio.sleep(0)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    state = batch.status(job)
    assert state["failed"] == 0 and 0 < state["pending"] < 200
    assert state["last_run"]["stopped"] == "interrupted by cancellation"
    assert (await batch.arun(job, progress=False)).ok == 200
    assert sim.stats()["requests"] == 200


def test_an_explicit_api_key_is_sent_and_masked_in_every_file_and_message(start_sim, make_job, tmp_path):
    sim = start_sim(api_key=KEY, echo_key=True)  # every reply and error quotes the Authorization header
    rows = [{"review_id": f"k{i}", "text": f"t {i}" + (" [[error:400:1214]]" if i % 3 == 0 else "")}
            for i in range(12)]
    job = make_job(sim, rows=rows)
    result = batch.run(job, api_key=KEY, progress=False)
    assert result.exit_code == 1 and result.ok == 8 and result.failed == 4  # the key was sent: the rest answered
    answers = batch.read_results(job)
    assert answers["error"].str.contains("***", regex=False).sum() == 4
    assert KEY not in str(result) + json.dumps(result.summary) + answers.to_json()

    wrong = KEY[::-1]
    refused = make_job(sim, rows=rows, output={"path": "refused/result.parquet"})
    with pytest.raises(batch.ApiRefusedError) as stopped:
        batch.run(refused, api_key=wrong, progress=False)
    assert "***" in str(stopped.value) and wrong not in str(stopped.value)
    for path in files_under(tmp_path):
        data = path.read_bytes()
        assert KEY.encode() not in data and wrong.encode() not in data, path


def test_read_results_of_an_incomplete_job_marks_the_pending_rows(sim, make_job, tmp_path):
    job = make_job(sim, rows=[{"review_id": f"p{i}", "text": f"t {i}"} for i in range(50)])
    assert batch.run(job, limit=20, progress=False).pending == 30
    so_far = batch.read_results(job)
    assert so_far["review_id"].tolist() == [f"p{i}" for i in range(50)]
    assert (so_far["status"] == "ok").sum() == 20 and (so_far["status"] == "pending").sum() == 30
    assert so_far.loc[so_far["status"] == "pending", "response"].isna().all()
    assert so_far["text"].tolist() == [f"t {i}" for i in range(50)]
    # A pending row's integers are missing, not NaN in a float64 column (pandas' nullable Int64, as read_results
    # and run_frame give any integer column holding a null).
    for column in ("prompt_tokens", "completion_tokens", "total_tokens", "attempts"):
        assert str(so_far[column].dtype) in ("Int64", "Int32"), column  # attempts: int32
        assert so_far[column].isna().tolist() == [False] * 20 + [True] * 30

    batch.run(job, progress=False)
    final = batch.read_results(job)
    pd.testing.assert_frame_equal(final, pd.read_parquet(tmp_path / "out" / "result.parquet"))
    kept = so_far["status"] == "ok"
    assert final.loc[kept, "response"].tolist() == so_far.loc[kept, "response"].tolist()
    assert list(final.columns) == list(so_far.columns)


def test_run_frame_with_a_limit_returns_the_pending_rows_marked(sim, tmp_path):
    model = {**local_model(sim), "params": {"response_format": {"type": "json_object"}}}
    settings = {"template": "Classify: {text}", "model": model, "output": tmp_path / "o.parquet", "parse_json": True,
                "progress": False}
    answered = batch.run_frame(reviews(10), limit=4, **settings)
    assert answered["status"].tolist() == ["ok"] * 4 + ["pending"] * 6
    assert answered["label"].notna().tolist() == [True] * 4 + [False] * 6  # the reply's keys, as columns
    assert str(answered["total_tokens"].dtype) == "Int64" and answered["total_tokens"].isna().sum() == 6
    complete = batch.run_frame(reviews(10), **settings)
    assert list(complete.columns) == list(answered.columns)
    assert complete["label"].head(4).tolist() == answered["label"].head(4).tolist()


def test_status_and_estimate_are_the_command_lines_json(sim, make_job, run_cli):
    job = make_job(sim, rows=[{"review_id": f"s{i}", "text": f"t {i}"} for i in range(30)],
                   pricing={"input": 1.0, "output": 2.0})
    batch.run(job, limit=10, progress=False)
    for command, call in (("status", batch.status), ("estimate", batch.estimate)):
        code, out, _ = run_cli(command, job, "--json")
        assert code == 0
        assert call(job) == json.loads(out)
    assert batch.status(job)["pending"] == 20
    code, out, _ = run_cli("estimate", job, "--json", "--retry-failed")
    assert batch.estimate(job, retry_failed=True) == json.loads(out)


def test_handle_signals_lets_the_runs_own_handlers_take_sigint(start_sim, make_job):
    sim = start_sim(latency_ms=20)
    job = make_job(sim, rows=[{"review_id": f"h{i}", "text": f"t {i}"} for i in range(200)])
    when(lambda: sim.stats()["requests"] >= 20, ctrl_c)
    with pytest.raises(batch.Interrupted) as interrupted:
        batch.run(job, progress=False, handle_signals=True)
    assert interrupted.value.result.stopped == "interrupted by SIGINT"  # the command line's handler, not ours
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert batch.run(job, progress=False).ok == 200 and sim.stats()["requests"] == 200


def test_a_second_keyboard_interrupt_stops_at_once_and_the_rows_cut_off_stay_pending(start_sim, make_job, tmp_path):
    sim = start_sim(latency_ms=60_000)  # no answer comes within the grace a first interrupt gives
    job = make_job(sim, rows=[{"review_id": f"d{i}", "text": f"t {i}"} for i in range(20)])
    log_file = tmp_path / "out" / "result.checkpoint" / "batch.log"

    def logged(text: str) -> Callable[[], bool]:
        return lambda: log_file.exists() and text in log_file.read_text(encoding="utf-8")

    when(lambda: sim.stats()["requests"] >= 4, ctrl_c)
    when(logged("KeyboardInterrupt: taking no more rows"), ctrl_c)
    with pytest.raises(batch.Interrupted) as interrupted:
        batch.run(job, progress=False)
    assert logged("KeyboardInterrupt again: stopping now")()
    assert interrupted.value.result.ok == 0 and interrupted.value.result.pending == 20
    assert batch.status(job)["failed"] == 0


@pytest.mark.parametrize(("section", "values", "message"), [
    ("output", {"json_schema": {"type": "object", "properties": {2024: {"type": "integer"}}}},
     "json_schema.properties: the key 2024 is a number; JSON keys are text: write '2024'"),
    ("model", {"params": {"metadata": {True: "x"}}}, "params.metadata: the key True is a boolean"),
])
def test_a_python_job_whose_schema_or_params_have_keys_that_are_not_text_is_refused(sim, tmp_path, section, values,
                                                                                    message):
    """A job file's keys are read as the text written; a job built in Python must write them so too (JSON's keys
    are text), rather than reach the request as one key and the columns as another."""
    job = {"name": "keys", "input": {"path": str(DATA / "reviews.csv"), "id_column": "review_id"},
           "prompt": {"template": "Classify: {text}"}, "model": local_model(sim),
           "output": {"path": str(tmp_path / "out" / "result.parquet")}}
    job[section] = {**job[section], **values}
    with pytest.raises(batch.ConfigError, match=re.escape(message)):
        batch.run(job, progress=False)
    assert sim.stats()["requests"] == 0 and not (tmp_path / "out").exists()
