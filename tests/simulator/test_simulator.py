"""The simulator over real HTTP: bodies, markers, limits, faults, stats and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from batch.simulator import (
    SimConfig,
    Simulator,
    SimulatorThread,
    answer_for,
    completion_for,
    count_tokens,
    main,
    reply_marker,
)

MODEL = "glm-4-flash"


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


@contextlib.asynccontextmanager
async def serve(config: SimConfig | None = None) -> AsyncIterator[tuple[Simulator, str, aiohttp.ClientSession]]:
    sim = Simulator(config or SimConfig())
    url = await sim.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield sim, url, session
    finally:
        await sim.stop()


async def post(session: aiohttp.ClientSession, url: str, payload: Any, **kw: Any) -> tuple[int, Any, Any]:
    """POST to chat/completions; returns (status, parsed JSON or raw text, headers)."""
    data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    async with session.post(url + "/chat/completions", data=data, **kw) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text), resp.headers
        except json.JSONDecodeError:
            return resp.status, text, resp.headers


def test_count_tokens_mixed_chinese_english() -> None:
    # 你 好 , world ! -> 5; 模 型 ， (CJK comma) -> 3; GLM - 4 test_case 123 . -> 6
    assert count_tokens("你好, world!") == 5
    assert count_tokens("GLM-4 模型，test_case 123.") == 9
    assert count_tokens("   ") == 0
    assert count_tokens("豈") == 1  # U+F900, CJK compatibility block


def test_answers_are_deterministic_and_truncate_to_max_tokens() -> None:
    messages = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "翻译: hello world"}]
    answer = answer_for(MODEL, messages)
    assert answer == answer_for(MODEL, [dict(m) for m in messages])
    assert answer.startswith(f"[{MODEL}] reply ") and answer.endswith("to: 翻译: hello world")
    full = completion_for(MODEL, messages, None)
    assert full["finish_reason"] == "stop"
    assert full["prompt_tokens"] == (4 + 3) + (5 + 3)
    assert full["completion_tokens"] == count_tokens(answer)
    cut = completion_for(MODEL, messages, 4)
    assert cut["finish_reason"] == "length" and cut["completion_tokens"] == 4
    assert answer.startswith(cut["content"]) and count_tokens(cut["content"]) == 4


@pytest.mark.asyncio
async def test_success_body_on_both_prefixes() -> None:
    async with serve() as (sim, url, session):
        base = url.removesuffix("/v1")
        for prefix in ("/v1", "/api/paas/v4"):
            status, body, headers = await post(session, base + prefix, chat("你好 world", max_tokens=1000))
            assert status == 200
            assert re.fullmatch(r"chatcmpl-[0-9a-f]{12}", body["id"])
            assert body["request_id"] == body["id"] == headers["x-request-id"]
            assert body["object"] == "chat.completion" and body["model"] == MODEL
            assert isinstance(body["created"], int)
            expected = completion_for(MODEL, chat("你好 world")["messages"], 1000)
            assert body["choices"] == [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": expected["content"]}}]
            assert body["usage"] == {"prompt_tokens": expected["prompt_tokens"],
                                     "completion_tokens": expected["completion_tokens"],
                                     "total_tokens": expected["prompt_tokens"] + expected["completion_tokens"]}
        status, body, _ = await post(session, url, chat("x", max_tokens=2))
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 2
        assert sim.stats["by_status"] == {"200": 3}


@pytest.mark.asyncio
async def test_bad_requests_get_1214() -> None:
    async with serve() as (_, url, session):
        for payload in (b"{not json", {"model": MODEL}, {"model": MODEL, "messages": "hi"}):
            status, body, _ = await post(session, url, payload)
            assert status == 400 and body["error"]["code"] == "1214"


@pytest.mark.asyncio
async def test_markers_error_flaky_malformed_nochoices_slow() -> None:
    async with serve() as (sim, url, session):
        status, body, _ = await post(session, url, chat("bad [[error:400:1301]]"))
        assert status == 400
        assert body == {"error": {"code": "1301", "message": "系统检测到输入或生成内容可能包含不安全或敏感内容"}}
        status, body, _ = await post(session, url, chat("[[error:401:1000]]"))
        assert status == 401 and body["error"]["code"] == "1000"

        flaky = [await post(session, url, chat("row 7 [[flaky:2]]")) for _ in range(3)]
        assert [s for s, _, _ in flaky] == [500, 500, 200]
        assert flaky[0][1]["error"]["code"] == "1200"

        status, text, _ = await post(session, url, chat("[[malformed]]"))
        assert status == 200 and isinstance(text, str)
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)

        status, body, _ = await post(session, url, chat("[[nochoices]]"))
        assert status == 200 and body["choices"] == [] and body["usage"]["total_tokens"] > 0

        started = asyncio.get_running_loop().time()
        status, _, _ = await post(session, url, chat("[[slow:150]]"))
        assert status == 200 and asyncio.get_running_loop().time() - started >= 0.14
        assert sim.stats["by_prompt"]["row 7 [[flaky:2]]"] == 3


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_the_reply_marker_answers_its_text_exactly(stream: bool) -> None:
    """Any text, brackets and a lone surrogate's escape included, as the content of the answer (streamed: joined)."""
    text = '```json\n{"a": [[1]], "b": "\\ud83d", "c": "]]"}\n```'
    async with serve() as (_, url, session):
        if not stream:
            status, body, _ = await post(session, url, chat(f"row {reply_marker(text)}"))
            assert status == 200 and body["choices"][0]["message"]["content"] == text
            assert body["usage"]["completion_tokens"] == count_tokens(text)
            return
        async with session.post(url + "/chat/completions", json=chat(f"row {reply_marker(text)}", stream=True)) as resp:
            events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: {")]
        assert "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events
                       if json.loads(e)["choices"]) == text


@pytest.mark.asyncio
async def test_reset_and_hang_markers() -> None:
    async with serve() as (sim, url, session):
        with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
            await post(session, url, chat("[[reset]]"))
        with pytest.raises(asyncio.TimeoutError):
            await post(session, url, chat("[[hang]]"), timeout=aiohttp.ClientTimeout(total=0.2))
        deadline = asyncio.get_running_loop().time() + 5
        while "disconnected" not in sim.stats["by_status"]:  # the server notices the client went away
            assert asyncio.get_running_loop().time() < deadline, sim.stats
            await asyncio.sleep(0.01)
        assert sim.stats["by_status"] == {"reset": 1, "disconnected": 1}


@pytest.mark.asyncio
async def test_openai_client_success_and_failures() -> None:
    async with serve(SimConfig(retry_after=2)) as (_, url, _session):
        client = openai.AsyncOpenAI(base_url=url, api_key="test", max_retries=0, timeout=2.0)
        messages = [{"role": "user", "content": "Summarise: 批处理 jobs"}]
        result = await client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
        expected = completion_for(MODEL, messages, None)
        assert result.choices[0].message.content == expected["content"]
        assert result.usage is not None and result.usage.prompt_tokens == expected["prompt_tokens"]

        with pytest.raises(openai.RateLimitError) as rate:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "[[error:429:1302]]"}])
        assert rate.value.code == "1302" and rate.value.response.headers["retry-after"] == "2"
        # The openai client surfaces a reset as APIConnectionError and does not wrap a
        # malformed 200 body at all: the caller sees a bare json.JSONDecodeError.
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "[[reset]]"}])
        with pytest.raises(json.JSONDecodeError):
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "[[malformed]]"}])
        await client.close()


@pytest.mark.asyncio
async def test_max_concurrency_rejects_with_1302_and_retry_after() -> None:
    async with serve(SimConfig(latency_ms=200, max_concurrency=2, retry_after=1.5)) as (sim, url, session):
        results = await asyncio.gather(*(post(session, url, chat(f"q{i}")) for i in range(6)))
        statuses = Counter(status for status, _, _ in results)
        assert statuses == {200: 2, 429: 4}
        for status, body, headers in results:
            if status == 429:
                assert body["error"]["code"] == "1302" and headers["Retry-After"] == "1.5"
        assert sim.stats["max_in_flight"] == 2


@pytest.mark.asyncio
async def test_rpm_limit_per_second_slice() -> None:
    async with serve(SimConfig(rpm=60)) as (sim, url, session):  # one request per 1 s slice
        results = [await post(session, url, chat(f"r{i}")) for i in range(5)]
        ok = sum(status == 200 for status, _, _ in results)
        assert 1 <= ok <= 2  # a burst can straddle one slice boundary at most
        assert all(body["error"]["code"] == "1302" for status, body, _ in results if status == 429)
        assert "Retry-After" not in results[-1][2]  # retry_after unset


@pytest.mark.asyncio
async def test_fail_after_switches_to_arrears() -> None:
    async with serve(SimConfig(fail_after=2, retry_after=3)) as (_, url, session):
        results = [await post(session, url, chat(f"f{i}")) for i in range(4)]
        assert [status for status, _, _ in results] == [200, 200, 429, 429]
        assert results[2][1]["error"]["code"] == "1113"
        assert "Retry-After" not in results[2][2]  # arrears is not a rate limit


@pytest.mark.asyncio
async def test_api_key_required_and_never_echoed() -> None:
    secret = "sk-very-secret-123"
    async with serve(SimConfig(api_key=secret)) as (_, url, session):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, body, resp_headers = await post(session, url, chat("k"), headers=headers)
            assert status == 401 and body["error"]["code"] == "1000"
            assert secret not in json.dumps(body) and secret not in str(dict(resp_headers))
        status, body, _ = await post(session, url, chat("k"), headers={"Authorization": f"Bearer {secret}"})
        assert status == 200 and secret not in json.dumps(body)
    assert secret not in repr(SimConfig(api_key=secret))


@pytest.mark.asyncio
async def test_stats_endpoint_and_reset() -> None:
    async with serve(SimConfig(p_500=1.0)) as (_, url, session):
        base = url.removesuffix("/v1")
        for content in ("a", "a", "b"):
            status, body, _ = await post(session, url, chat(content))
            assert status == 500 and body["error"]["code"] == "1200"
        await post(session, url, b"junk")
        async with session.get(base + "/_stats") as resp:
            stats = await resp.json()
        assert stats.pop("batch_api")["batches_created"] == 0  # the Batch API's counters: test_simulator_batches.py
        assert stats == {"requests": 4, "by_status": {"500": 3, "400": 1},
                         "by_prompt": {"a": 2, "b": 1}, "max_in_flight": 1, "in_flight": 0}
        async with session.post(base + "/_reset") as resp:
            assert resp.status == 200
        async with session.get(base + "/_stats") as resp:
            stats = await resp.json()
        stats.pop("batch_api")
        assert stats == {"requests": 0, "by_status": {}, "by_prompt": {}, "max_in_flight": 0, "in_flight": 0}


def test_simulator_thread_serves_other_event_loops() -> None:
    with SimulatorThread(SimConfig(seed=1)) as sim:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", sim.url)

        async def run() -> list[int]:
            async with aiohttp.ClientSession() as session:
                return [(await post(session, sim.url, chat(f"t{i}")))[0] for i in range(3)]

        assert asyncio.run(run()) == [200, 200, 200]
        assert sim.stats()["by_status"] == {"200": 3}
        sim.reset()
        assert sim.stats()["requests"] == 0


def test_reconfigure_changes_how_later_requests_are_served() -> None:
    with SimulatorThread(SimConfig(fail_after=0, fail_status=503, fail_code="1305")) as sim:

        async def status() -> int:
            async with aiohttp.ClientSession() as session:
                return (await post(session, sim.url, chat("hi")))[0]

        assert asyncio.run(status()) == 503
        sim.reconfigure(fail_after=None)
        assert asyncio.run(status()) == 200
        assert sim.stats()["by_status"] == {"503": 1, "200": 1}  # the counters are kept


def test_main_runs_command_with_url_and_returns_its_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    check = "import os,sys; sys.exit(0 if os.environ['BATCH_SIMULATOR_URL'].endswith('/v1') else 1)"
    assert main(["--port", "0", "--", sys.executable, "-c", check]) == 0
    assert re.search(r"simulator listening on http://127\.0\.0\.1:\d+/v1", capsys.readouterr().err)
    assert main(["--port", "0", "--latency-ms", "1", "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3


@pytest.mark.asyncio
async def test_seeded_faults_repeat_exactly() -> None:
    config = SimConfig(p_500=0.3, p_503=0.2, seed=42)
    runs = []
    for _ in range(2):
        async with serve(config) as (_, url, session):
            runs.append([(await post(session, url, chat(f"s{i}")))[0] for i in range(30)])
    assert runs[0] == runs[1]
    assert {200, 500, 503} <= set(runs[0])


def test_main_command_can_reach_the_server_with_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_TEST_KEY", "k-123")
    script = (
        "import json, os, sys, urllib.request\n"
        "req = urllib.request.Request(os.environ['BATCH_SIMULATOR_URL'] + '/chat/completions',\n"
        "    data=json.dumps({'model': 'm', 'messages': [{'role': 'user', 'content': 'hi'}]}).encode(),\n"
        "    headers={'Authorization': 'Bearer ' + os.environ['SIM_TEST_KEY']})\n"
        "body = json.load(urllib.request.urlopen(req, timeout=5))\n"
        "sys.exit(0 if body['choices'][0]['message']['content'].endswith('to: hi') else 4)\n"
    )
    assert main(["--port", "0", "--api-key-env", "SIM_TEST_KEY", "--", sys.executable, "-c", script]) == 0
