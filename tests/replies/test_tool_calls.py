"""A reply that calls tools (message.tool_calls, streamed or not, with null or empty content): its calls are a row's
data, kept in the tool_calls column as JSON text, over real HTTP to the simulator's [[toolcalls:N]]."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from helpers import output_of
from hypothesis import given
from hypothesis import strategies as st

from batch.online.client import StreamedAnswer
from batch.simulator.answers import parse_chat, tool_calls_for
from batch.simulator.server import tool_call_deltas

TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
         for name in ("get_weather", "get_time")]
TEXTS = ["plain", "two calls [[toolcalls:2]]", 'empty content [[toolcalls:1]][[set:choices.0.message.content=""]]',
         "长一点的中文评论，足够分成好几个片段来流式传输 [[toolcalls:3]]"]
CALLS = [0, 2, 1, 3]


def calls_asked(sim, text: str) -> list[dict]:
    """The calls the simulator answered `text`'s request with."""
    body = next(body for body in sim.bodies() if body["messages"][-1]["content"] == f"Classify: {text}")
    return tool_calls_for(parse_chat(body), CALLS[TEXTS.index(text)])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_kept_as_json_text_streamed_or_not(start_sim, make_job, run_cli, stream):
    sim = start_sim(keep_bodies=True, chunk_interval_ms=1)
    rows = [{"review_id": f"r{i}", "text": text} for i, text in enumerate(TEXTS)]
    job = make_job(sim, rows=rows, model={"stream": stream, "params": {"max_tokens": 64, "tools": TOOLS}})
    code, _, err = run_cli("run", job)
    assert code == 0, err
    out = {row["text"]: row for row in pq.read_table(job.parent / "out" / "result.parquet").to_pylist()}
    assert all(row["status"] == "ok" for row in out.values())
    assert out["plain"]["tool_calls"] is None and out["plain"]["response"]
    for text in TEXTS[1:]:
        row = out[text]
        assert json.loads(row["tool_calls"]) == calls_asked(sim, text), text
        assert row["finish_reason"] == "tool_calls" and not row["response"]  # null, or the empty text sent
        assert row["completion_tokens"] > 0
    names = [call["function"]["name"] for call in json.loads(out[TEXTS[3]]["tool_calls"])]
    assert names == ["get_weather", "get_time", "get_weather"]
    if stream:  # a call's first fragment is the answer's first token
        assert all(row["ttft_s"] is not None for row in out.values())


def test_a_tool_call_where_json_was_asked_is_bad_json_that_keeps_the_calls(sim, make_job, run_cli):
    job = make_job(sim, rows=[{"review_id": "r0", "text": "calls [[toolcalls:1]]"}],
                   model={"params": {"max_tokens": 64, "tools": TOOLS}}, output={"parse_json": True,
                                                                                 "json_attempts": 2})
    assert run_cli("run", job)[0] == 1
    row = output_of(job).iloc[0]
    assert (row["status"], row["error_class"], row["attempts"]) == ("failed", "bad_json", 2)
    assert row["error"] == "the reply is empty (the model called a tool instead: its calls are in tool_calls)"
    assert json.loads(row["tool_calls"])[0]["function"]["name"] == "get_weather"


def test_the_key_is_masked_in_a_tool_calls_arguments(start_sim, make_job, run_cli, monkeypatch):
    key = "sk-tool-calls-test-key-0123456789"
    monkeypatch.setenv("LOCAL_API_KEY", key)
    sim = start_sim(api_key=key)
    marker = f"[[toolcalls:1]][[set:choices.0.message.tool_calls.0.function.arguments=you sent {key}]]"
    job = make_job(sim, rows=[{"review_id": "r0", "text": marker}],
                   model={"api_key_env": "LOCAL_API_KEY", "params": {"max_tokens": 64}})
    assert run_cli("run", job)[0] == 0
    calls = output_of(job).iloc[0]["tool_calls"]
    assert key not in calls and json.loads(calls)[0]["function"]["arguments"] == "you sent ***"


CALL = st.fixed_dictionaries({
    "id": st.text(min_size=1, max_size=12), "type": st.just("function"),
    "function": st.fixed_dictionaries({"name": st.text(min_size=1, max_size=12), "arguments": st.text(max_size=80)}),
})


@given(calls=st.lists(CALL, max_size=4), content=st.one_of(st.none(), st.text(max_size=20)))
def test_streamed_tool_call_deltas_put_together_are_the_calls(calls, content):
    """Whatever the calls (any text in ids, names and arguments, split into pieces and interleaved by index), the
    streamed answer's calls are the ones sent; no call, no tool_calls."""
    stream = StreamedAnswer()
    stream.take(json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": []}}]}).encode())
    if content:
        stream.take(json.dumps({"choices": [{"index": 0, "delta": {"content": content}}]}).encode())
    for delta in tool_call_deltas(calls):
        stream.take(json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [delta]}}]}).encode())
    stream.take(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}).encode())
    stream.take(b"[DONE]")
    message = stream.answer()["choices"][0]["message"]
    assert message.get("tool_calls") == (calls or None)
    assert message["content"] == (content or None)
    assert (stream.first_token_at is None) == (not calls and not content)  # an empty list of calls is no token


def test_calls_sent_whole_without_an_index_are_told_apart_by_their_ids():
    """A server that sends each call whole in a delta of its own, without an index (the SDK would give up)."""
    stream = StreamedAnswer()
    for name in ("a", "b"):
        delta = {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": "{}"}}
        stream.take(json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [delta]}}]}).encode())
    stream.take(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}).encode())
    stream.take(b"[DONE]")
    calls = stream.answer()["choices"][0]["message"]["tool_calls"]
    assert [(call["id"], call["function"]["name"]) for call in calls] == [("call_a", "a"), ("call_b", "b")]


def test_tool_calls_come_back_from_the_batch_api_too(start_sim, make_job, run_cli):
    """A Batch API output line is an answer like an online one: its calls are kept the same way."""
    sim = start_sim(batch_speed=200, keep_bodies=True)
    rows = [{"review_id": "r0", "text": "plain"}, {"review_id": "r1", "text": "two calls [[toolcalls:2]]"}]
    job = make_job(sim, rows=rows, mode="batch_api", batch_api={"poll_interval_s": 0.05},
                   model={"params": {"max_tokens": 64, "tools": TOOLS}})
    code, out, err = run_cli("run", job, "--wait")
    assert code == 0, out + err
    got = {row["text"]: row for row in pq.read_table(job.parent / "out" / "result.parquet").to_pylist()}
    assert got["plain"]["tool_calls"] is None
    calls = json.loads(got["two calls [[toolcalls:2]]"]["tool_calls"])
    assert [call["function"]["name"] for call in calls] == ["get_weather", "get_time"]
    assert got["two calls [[toolcalls:2]]"]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("mode", ["online", "batch_api"])
def test_a_reply_that_is_not_the_json_asked_for_says_why_in_the_same_words_online_and_in_the_batch_api(
        start_sim, make_job, run_cli, mode):
    """A tool called instead of the JSON asked for, or a reply cut at max_tokens: one wording in both modes."""
    sim = start_sim(batch_speed=200)
    rows = [{"review_id": "r0", "text": "calls [[toolcalls:1]]"},
            {"review_id": "r1", "text": 'cut [[badjson]][[set:choices.0.finish_reason="length"]]'}]
    job = make_job(sim, rows=rows, mode=mode, batch_api={"poll_interval_s": 0.05},
                   model={"params": {"max_tokens": 64, "tools": TOOLS}}, output={"parse_json": True})
    code, out, err = run_cli("run", job, *(["--wait"] if mode == "batch_api" else []))
    assert code == 1, out + err
    got = {row["review_id"]: row for row in output_of(job).to_dict("records")}
    assert {row["error_class"] for row in got.values()} == {"bad_json"}
    assert got["r0"]["error"] == "the reply is empty (the model called a tool instead: its calls are in tool_calls)"
    assert got["r1"]["error"].endswith(" (the answer was cut at max_tokens 64: raise it)"), got["r1"]["error"]
    assert json.loads(got["r0"]["tool_calls"])[0]["function"]["name"] == "get_weather"
