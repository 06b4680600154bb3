"""model.stream: answers read as server-sent events from the simulator, over real HTTP: the same answers, usage and
cost as without streaming, ttft_s, the idle timeout beside the hard cap, and streams that break or lie."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import output_of, start_run, summary_of, wait_until

from batch.config import DEFAULT_STREAM_TIMEOUT_S, load_job
from batch.preflight import resolve
from batch.simulator import answer_for, completion_for

MODEL = "glm-4-flash"
PRICING = {"input": 1.0, "output": 2.0}
KEY = "sk-streaming-test-key-0123456789"


def prompt_rows(*texts: str) -> list[dict[str, str]]:
    return [{"review_id": f"r{i}", "text": text} for i, text in enumerate(texts)]


def streamed(model: dict | None = None, **limits: float) -> dict:
    """make_job overrides for a streamed job (provider local, the /v1 dialect, unless `model` says otherwise)."""
    return {"model": {"stream": True, **(model or {})}, "limits": limits, "pricing": PRICING}


def expected_answer(text: str) -> str:
    return answer_for(MODEL, [{"role": "user", "content": f"Classify: {text}"}])


def only_row(job: Path) -> dict:
    rows = output_of(job).to_dict("records")
    assert len(rows) == 1
    return rows[0]


def test_streamed_answers_match_plain_ones_with_usage_cost_and_ttft(start_sim, make_job, run_cli, tmp_path):
    sim = start_sim(ttft_ms=150, chunk_interval_ms=5)
    rows = prompt_rows("fine", "awful [[think]]", "长一点的中文评论，足够分成好几个片段来流式传输")
    plain_job = make_job(sim, rows=rows, pricing=PRICING, output={"path": "plain/result.parquet"})
    assert run_cli("run", plain_job)[0] == 0
    plain = pd.read_parquet(tmp_path / "plain" / "result.parquet").set_index("review_id")
    job = make_job(sim, rows=rows, **streamed())
    assert run_cli("run", job)[0] == 0
    out = output_of(job).set_index("review_id")

    same = ["status", "response", "reasoning_content", "finish_reason", "prompt_tokens", "completion_tokens",
            "total_tokens", "cost", "model"]
    pd.testing.assert_frame_equal(out[same], plain[same])
    assert out["response"].tolist() == [expected_answer(row["text"]) for row in rows]
    assert out["reasoning_content"].notna().tolist() == [False, True, False]
    assert (out["cost"] > 0).all() and (out["completion_tokens"] > 0).all()  # usage came with the stream
    assert plain["ttft_s"].isna().all()
    # The simulator waits 150 ms before the first token and streams the rest after it.
    assert (out["ttft_s"] >= 0.15).all()
    assert (out["ttft_s"] < out["latency_s"]).all()


def test_zhipu_streams_usage_unasked(start_sim, make_job, run_cli, monkeypatch):
    """Zhipu's endpoint sends usage in the last chunk without stream_options, which batch does not send it."""
    monkeypatch.setenv("ZHIPU_API_KEY", KEY)
    sim = start_sim()
    base_url = sim.url.replace("/v1", "/api/paas/v4")
    job = make_job(sim, rows=prompt_rows("good"), **streamed({"provider": "zhipu", "base_url": base_url}))
    assert run_cli("run", job)[0] == 0
    row = only_row(job)
    assert row["response"] == expected_answer("good")
    assert row["prompt_tokens"] > 0 and row["cost"] > 0 and row["ttft_s"] is not None


def test_v1_stream_without_include_usage_has_no_usage(sim):
    """Why batch sends stream_options.include_usage to OpenAI-style servers: they send no usage otherwise."""
    import urllib.request

    def events(options: dict | None) -> list[dict]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        if options is not None:
            body["stream_options"] = options
        request = urllib.request.Request(sim.url + "/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            lines = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]

    assert not any(chunk.get("usage") for chunk in events(None))
    last = events({"include_usage": True})[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0


def test_idle_timeout_fires_on_a_silent_stream(start_sim, make_job, run_cli):
    sim = start_sim()
    job = make_job(sim, rows=prompt_rows("goes quiet [[stall:2]]"), **streamed(idle_timeout_s=0.3, timeout_s=30))
    assert run_cli("run", job)[0] == 1
    row = only_row(job)
    assert row["status"] == "failed" and row["error_class"] == "timeout" and row["attempts"] == 3
    assert "silent for 0.3 s (limits.idle_timeout_s)" in row["error"]


def test_a_stream_left_open_after_done_is_complete(sim, make_job, run_cli):
    text = "then silence [[stall:99]]"
    job = make_job(sim, rows=prompt_rows(text), **streamed(idle_timeout_s=0.3, timeout_s=30))
    assert run_cli("run", job)[0] == 0
    row = only_row(job)
    assert row["status"] == "ok" and row["attempts"] == 1 and row["response"] == expected_answer(text)


def test_done_ends_the_request_at_once(sim, make_job):
    """A server that keeps the connection open after [DONE] does not hold the row's slot for idle_timeout_s: with one
    slot, three such rows are answered one after the other, long before one idle limit has passed."""
    rows = prompt_rows(*(f"then silence {i} [[stall:99]]" for i in range(3)))
    job = make_job(sim, rows=rows, **streamed(concurrency=1, idle_timeout_s=600, timeout_s=1200))
    run = start_run(job)
    try:
        wait_until(lambda: run.poll() is not None, "the run to end (it waits out idle_timeout_s after [DONE])", 60)
    finally:
        run.kill()
        _, err = run.communicate()
    assert run.returncode == 0, err
    out = output_of(job)
    assert (out["status"] == "ok").all() and (out["attempts"] == 1).all()
    assert out["response"].tolist() == [expected_answer(row["text"]) for row in rows]


def test_a_connection_dropped_after_done_leaves_the_answer_whole(sim, make_job, run_cli):
    text = "then a torn end [[tornend]]"
    job = make_job(sim, rows=prompt_rows(text), **streamed())
    assert run_cli("run", job)[0] == 0
    row = only_row(job)
    assert row["status"] == "ok" and row["attempts"] == 1 and row["response"] == expected_answer(text)


def test_a_lively_stream_outlasts_the_idle_limit_but_not_the_hard_cap(start_sim, make_job, run_cli):
    # About 40 chunks 50 ms apart: two seconds of answer, never silent for one.
    sim = start_sim(chunk_interval_ms=50)
    rows = prompt_rows("a long answer [[bigbody:640]]")
    job = make_job(sim, rows=rows, **streamed(idle_timeout_s=1.0, timeout_s=60))
    assert run_cli("run", job)[0] == 0
    row = only_row(job)
    assert row["status"] == "ok" and len(row["response"]) == 640 and row["attempts"] == 1
    assert row["latency_s"] > 1.0  # longer than the idle limit, and not cut

    job = make_job(sim, rows=rows, retry={"max_attempts": 1}, output={"path": "capped/result.parquet"},
                   **streamed(idle_timeout_s=1.0, timeout_s=1.0))
    assert run_cli("run", job)[0] == 1
    row = pd.read_parquet(job.parent / "capped" / "result.parquet").iloc[0]
    assert row["error_class"] == "timeout" and "within 1 s (limits.timeout_s)" in row["error"]


def test_a_stream_reset_mid_answer_is_retried(sim, make_job, run_cli):
    text = "cut short once [[cutstream:2]]"
    job = make_job(sim, rows=prompt_rows(text), **streamed())
    assert run_cli("run", job)[0] == 0
    row = only_row(job)
    assert row["status"] == "ok" and row["attempts"] == 2 and row["response"] == expected_answer(text)
    assert sim.stats()["by_status"]["reset"] == 1


@pytest.mark.parametrize(("marker", "error"), [
    ("[[garbagechunk:2]]", "stream event 3 is not JSON"),
    ("[[nodone]][[set:choices.0.finish_reason=null]]", "without [DONE] or a finish_reason"),
    ("[[set:choices.0.finish_reason=null]]", "without a finish_reason"),
    # The assembled answer is checked as a non-streamed one is.
    ('[[set:usage.completion_tokens="3.5"]]', 'usage.completion_tokens is "3.5"'),
])
def test_broken_streams_are_bad_responses(sim, make_job, run_cli, marker, error):
    job = make_job(sim, rows=prompt_rows(f"broken {marker}"), **streamed())
    assert run_cli("run", job)[0] == 1
    row = only_row(job)
    assert row["status"] == "failed" and row["error_class"] == "bad_response" and row["attempts"] == 3
    assert error in row["error"], row["error"]


def test_stream_requests_answered_otherwise(sim, make_job, run_cli):
    """A server that ignores stream: true and answers one JSON body is read as such; an error status as always."""
    rows = prompt_rows("plain [[nostream]]", "unsafe [[error:400:1301]]")
    job = make_job(sim, rows=rows, **streamed())
    assert run_cli("run", job)[0] == 1
    out = output_of(job).set_index("review_id")
    assert out.loc["r0", "response"] == expected_answer(rows[0]["text"]) and out.loc["r0", "cost"] > 0
    assert pd.isna(out.loc["r0", "ttft_s"])
    assert out.loc["r1", "error_class"] == "content_filter" and out.loc["r1", "attempts"] == 1


def test_error_event_mid_stream_judged_by_its_code(sim, make_job, run_cli):
    job = make_job(sim, rows=prompt_rows("overloaded [[errorchunk:2:1305]]"), **streamed())
    assert run_cli("run", job)[0] == 1
    row = only_row(job)
    assert row["error_class"] == "rate_limited" and row["attempts"] == 3 and "HTTP 200 code 1305" in row["error"]

    job = make_job(sim, rows=prompt_rows("in arrears [[errorchunk:2:1113]]"), **streamed(),
                   output={"path": "arrears/result.parquet"})
    code, _, err = run_cli("run", job)
    assert code == 3 and "HTTP 200 code 1113" in err


def test_key_masked_in_streamed_content(start_sim, make_job, run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("BATCH_TEST_KEY", KEY)
    sim = start_sim(api_key=KEY, echo_key=True)  # the reply quotes the Authorization header, across chunks
    job = make_job(sim, rows=prompt_rows("repeat my header"), **streamed({"api_key_env": "BATCH_TEST_KEY"}))
    assert run_cli("run", job)[0] == 0
    assert "(you sent Authorization: Bearer ***)" in only_row(job)["response"]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_size_cap_applies_to_the_streamed_total(sim, make_job, run_cli):
    job = make_job(sim, rows=prompt_rows("endless [[bigbody:20000]]", "short"), **streamed(max_response_bytes=4096))
    assert run_cli("run", job)[0] == 1
    out = output_of(job).set_index("review_id")
    assert out.loc["r0", "error_class"] == "bad_response"
    assert "more than 4096 bytes, over limits.max_response_bytes" in out.loc["r0", "error"]
    assert out.loc["r1", "status"] == "ok"


def write_job(tmp_path: Path, model: dict, limits: dict) -> Path:
    (tmp_path / "in.csv").write_text("id,text\n1,a\n")
    job = {"name": "j", "input": {"path": "in.csv"}, "prompt": {"template": "{text}"},
           "model": {"name": MODEL, **model}, "limits": limits, "output": {"path": "out.parquet"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_stream_limits_defaults(tmp_path):
    """Streamed, the hard cap is not the non-streamed 120 s unless the job sets it; the idle limit is filled in (in the
    resolved limits: the job itself stays as written)."""
    limits = resolve(load_job(write_job(tmp_path, {"stream": True}, {}))).limits
    assert limits.timeout_s == DEFAULT_STREAM_TIMEOUT_S and limits.idle_timeout_s == 60
    limits = resolve(load_job(write_job(tmp_path, {"stream": True}, {"timeout_s": 30}))).limits
    assert limits.timeout_s == 30 and limits.idle_timeout_s == 30
    limits = resolve(load_job(write_job(tmp_path, {}, {}))).limits
    assert limits.timeout_s == 120 and limits.idle_timeout_s is None


@pytest.mark.parametrize(("model", "limits", "message"), [
    ({}, {"idle_timeout_s": 5}, "limits.idle_timeout_s applies to streamed answers only"),
    ({"stream": True}, {"idle_timeout_s": 50, "timeout_s": 20},
     "limits.idle_timeout_s 50 is above limits.timeout_s 20"),
    ({"params": {"stream": True}}, {}, "params.stream: set model.stream: true"),
    ({"params": {"extra_body": {"stream": True}}}, {}, "params.extra_body.stream: set model.stream"),
    ({"stream": "yes"}, {}, "model.stream: Input should be a valid boolean"),
])
def test_stream_settings_checked(tmp_path, run_cli, model, limits, message):
    code, _, err = run_cli("validate", write_job(tmp_path, model, limits))
    assert code == 2 and message in err and "job.yaml line" in err, err


# -- streams read as the SSE spec and real servers have them (issue 22) ----------------------------------------


@pytest.mark.parametrize("framing", [
    "[[eol:cr]]", "[[eol:crlf]]", "[[eol:mixed]]", "[[eol:crlf]][[split:7]]", "[[eol:mixed]][[split:3]]",
    "[[ssefields]][[datalines]][[eol:cr]]", "[[nodelta]]",
])
def test_any_framing_the_spec_allows_reads_the_same_answer(sim, make_job, run_cli, framing):
    """Bare CR, CRLF or both as line endings, pieces cut anywhere (inside a character, between CR and LF),
    comments, event:/id:/retry: fields, a byte order mark, data over several lines, a last chunk without a delta."""
    text = f"长一点的中文评论，足够分成好几个片段 {framing} [[think]]"
    # An idle limit: read as the old line reader did, a stream of bare CRs is one line that never ends, so the
    # attempt times out and the row takes a second one. 30 s, not 5: at a load of 20 on 2 cores one case took two
    # attempts with the right answer, a 5 s pause being within a loaded machine's reach.
    job = make_job(sim, rows=prompt_rows(text), **streamed(idle_timeout_s=30, timeout_s=60))
    code, _, err = run_cli("run", job)
    assert code == 0, err
    row = only_row(job)
    assert row["status"] == "ok" and row["attempts"] == 1 and row["response"] == expected_answer(text)
    assert row["reasoning_content"].startswith("reasoning about: ") and row["completion_tokens"] > 0


@pytest.mark.parametrize("label", ["text/plain", "application/json", "application/octet-stream"])
def test_a_stream_is_read_by_its_content_not_its_label(sim, make_job, run_cli, label):
    rows = prompt_rows(f"an event stream labelled [[ctype:{label}]]", f"one JSON body [[nostream]][[ctype:{label}]]",
                       "one JSON body labelled a stream [[nostream]][[ctype:text/event-stream]]")
    job = make_job(sim, rows=rows, **streamed())
    assert run_cli("run", job)[0] == 0
    out = output_of(job).set_index("review_id")
    assert out["response"].tolist() == [expected_answer(row["text"]) for row in rows]
    assert (out["attempts"] == 1).all() and (out["cost"] > 0).all()
    assert out["ttft_s"].notna().tolist() == [True, False, False]


def test_a_json_error_labelled_as_a_stream_is_judged_by_its_code(sim, make_job, run_cli):
    rows = prompt_rows("unsafe, 200 [[error:200:1301]][[ctype:text/event-stream]]",
                       "unsafe, 400 [[error:400:1301]][[ctype:text/event-stream]]")
    job = make_job(sim, rows=rows, **streamed())
    assert run_cli("run", job)[0] == 1
    out = output_of(job)
    assert out["error_class"].tolist() == ["content_filter", "content_filter"]
    assert out["attempts"].tolist() == [1, 1]


def test_n_choices_streamed_are_the_choices_unstreamed(sim, make_job, run_cli, tmp_path):
    """With n: 2 the deltas of both choices come interleaved, each naming its index: never one merged text."""
    rows = prompt_rows("two answers please", "and two more [[think]]")
    plain_job = make_job(sim, rows=rows, pricing=PRICING, model={"params": {"n": 2}},
                         output={"path": "plain/result.parquet"})
    assert run_cli("run", plain_job)[0] == 0
    plain = pd.read_parquet(tmp_path / "plain" / "result.parquet").set_index("review_id")
    job = make_job(sim, rows=rows, **streamed({"params": {"n": 2}}))
    assert run_cli("run", job)[0] == 0
    out = output_of(job).set_index("review_id")
    same = ["status", "response", "reasoning_content", "finish_reason", "prompt_tokens", "completion_tokens",
            "total_tokens", "cost"]
    pd.testing.assert_frame_equal(out[same], plain[same])
    assert out["response"].tolist() == [expected_answer(row["text"]) for row in rows]


def test_a_stream_without_done_is_whole_only_with_every_choice_asked_for(sim, make_job, run_cli):
    """n: 2, and the stream ends (no [DONE]) once choice 0 came whole: choice 1 is missing, so the answer is cut
    short, retried, and then whole."""
    rows = prompt_rows("only the first choice [[fewerchoices:1]]", "both choices")
    job = make_job(sim, rows=rows, retry={"max_attempts": 3, "initial_backoff_s": 0.01},
                   **streamed({"params": {"n": 2}}))
    assert run_cli("run", job)[0] == 0
    out = output_of(job).set_index("review_id")
    assert out["attempts"].tolist() == [2, 1]
    assert out["response"].tolist() == [expected_answer(row["text"]) for row in rows]
    assert sim.stats()["requests"] == 3


@pytest.mark.parametrize("stream", [False, True])
def test_every_choice_of_an_answer_is_checked_not_only_the_first(sim, make_job, run_cli, stream):
    rows = prompt_rows("choice 1 is odd [[set:choices.1.finish_reason=5]]")
    job = make_job(sim, rows=rows, retry={"max_attempts": 1},
                   **(streamed({"params": {"n": 2}}) if stream else {"model": {"params": {"n": 2}}}))
    assert run_cli("run", job)[0] == 1
    row = only_row(job)
    assert (row["status"], row["error_class"]) == ("failed", "bad_response")
    assert row["error"] == "HTTP 200 whose choices[1].finish_reason is 5, not a string or null", row["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_json_body_after_a_byte_order_mark_is_read_as_json(sim, make_job, run_cli, stream):
    """A BOM before a JSON body (an answer, the JSON answer to a stream request, an error in a 200 or not) is not part
    of it: the answer is taken, the error judged by its code."""
    rows = prompt_rows("fine [[bom]][[nostream]]", "unsafe [[bom]][[error:200:1301]]",
                       "unsafe, 400 [[bom]][[error:400:1301]]")
    job = make_job(sim, rows=rows, **(streamed() if stream else {}))
    assert run_cli("run", job)[0] == 1
    out = output_of(job).set_index("review_id")
    assert out.loc["r0", "status"] == "ok" and out.loc["r0", "response"] == expected_answer(rows[0]["text"])
    assert out["error_class"].tolist()[1:] == ["content_filter", "content_filter"]
    assert out["attempts"].tolist() == [1, 1, 1]


def spent_at_server(sim) -> int:
    """The tokens the simulator answered with, over every request it got (each one paid for)."""
    total = 0
    for prompt, count in sim.stats()["by_prompt"].items():
        result = completion_for(MODEL, [{"role": "user", "content": prompt}], 64)
        total += count * (result["prompt_tokens"] + result["completion_tokens"])
    return total


def test_a_stream_without_done_is_whole_and_counted(sim, make_job, run_cli):
    """llama.cpp forks and older TGI end with finish_reason and usage but no [DONE]: a whole answer, paid for, which
    the budget counts (it let every row through, and the breaker called the endpoint down, when such answers were
    failures that counted nothing)."""
    rows = prompt_rows(*(f"no done for row {i} [[nodone]]" for i in range(12)))
    job = make_job(sim, rows=rows, budget={"max_total_tokens": 300}, retry={"max_outage_s": 2},
                   **streamed(concurrency=1))
    code, _, err = run_cli("run", job)
    assert code == 5 and "budget reached" in err, err
    run = summary_of(job)["run"]
    assert run["failed"] == 0 and 0 < run["ok"] < len(rows)
    assert run["total_tokens"] == spent_at_server(sim) <= 300


@pytest.mark.parametrize(("stream", "marker"), [(True, "[[set:choices.0.finish_reason=null]]"),
                                                (False, "[[set:choices.0.message.content=5]]")])
def test_answers_judged_failures_are_spent_and_not_an_outage(sim, make_job, run_cli, stream, marker):
    """Every answer that came counts as spent, whatever its verdict: the budget stops on them, the rows' records
    hold their tokens, and a 200 for every request is never "the endpoint is unreachable"."""
    rows = prompt_rows(*(f"odd answer {i} {marker}" for i in range(8)))
    job = make_job(sim, rows=rows, budget={"max_total_tokens": 300}, retry={"max_outage_s": 2},
                   **streamed({"stream": stream}, concurrency=1))
    code, _, err = run_cli("run", job)
    assert code == 5 and "budget reached" in err and "unreachable" not in err, err
    run = summary_of(job)["run"]
    assert run["ok"] == 0 and run["error_classes"] == {"bad_response": run["failed"]} and run["failed"] >= 2
    assert run["total_tokens"] == spent_at_server(sim) <= 300
    assert sum(sim.stats()["by_prompt"].values()) == run["attempts"] > run["failed"]  # some rows asked again


def test_the_budget_holds_across_a_rows_paid_retries(sim, make_job, run_cli):
    """A row's answers judged failures are spent as they come: its next attempt is sent only while its reservation
    still fits beside them, so six paid attempts of a row cannot carry the job past the limit."""
    rows = prompt_rows(*(f"odd answer {i} [[set:choices.0.message.content=5]]" for i in range(8)))
    job = make_job(sim, rows=rows, budget={"max_total_tokens": 300}, retry={"max_attempts": 6},
                   limits={"concurrency": 1})
    code, _, err = run_cli("run", job)
    assert code == 5 and "budget reached" in err, err
    run = summary_of(job)["run"]
    assert run["total_tokens"] == spent_at_server(sim) <= 300
    assert run["error_classes"] == {"bad_response": run["failed"]} and run["failed"] >= 2
