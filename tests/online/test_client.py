"""The HTTP client over real sockets: answers, proxies from the environment, and how failures are judged."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from aiohttp import web

from batch.online.client import ChatClient, parse_body, status_failure
from batch.online.failures import Failure
from batch.proxy import env_proxy
from batch.simulator import completion_for

REQUEST = {"model": "glm-4-flash", "messages": [{"role": "user", "content": "你好, hello"}], "max_tokens": 8}
BODY = json.dumps(REQUEST, ensure_ascii=False).encode()


@pytest.mark.asyncio
async def test_answers_come_back_as_dicts_with_the_key_sent_as_bearer(start_sim):
    sim = start_sim(api_key="test-key-123")
    async with ChatClient(sim.url, "test-key-123", 5, 4) as client:
        answers = await asyncio.gather(*(client.complete(BODY) for _ in range(3)))
    expected = completion_for(REQUEST["model"], REQUEST["messages"], REQUEST["max_tokens"])["content"]
    assert [answer["choices"][0]["message"]["content"] for answer in answers] == [expected] * 3
    assert sim.stats()["by_status"] == {"200": 3}
    assert sim.stats()["by_prompt"] == {"你好, hello": 3}  # UTF-8 body, not mangled


@pytest.mark.asyncio
async def test_a_wrong_key_is_a_job_failure(start_sim):
    sim = start_sim(api_key="right")
    async with ChatClient(sim.url, "wrong", 5, 4) as client:
        with pytest.raises(Failure) as failure:
            await client.complete(BODY)
    assert failure.value.scope == "job" and failure.value.error_class == "auth"


@pytest.mark.asyncio
async def test_requests_go_through_the_proxy_the_environment_names(start_sim, monkeypatch):
    sim = start_sim()
    # The simulator stands in for the proxy: aiohttp sends it "POST http://api.invalid/v1/...",
    # so an answer proves the request went through the proxy (api.invalid does not resolve).
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{sim.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with ChatClient("http://api.invalid/v1", "k", 5, 2, proxy=env_proxy("http://api.invalid/v1")) as client:
        answer = await client.complete(BODY)
    assert answer["choices"] and sim.stats()["requests"] == 1


def test_no_proxy_exempts_a_host(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert env_proxy("https://open.bigmodel.cn/api/paas/v4/chat/completions") == "http://proxy.example:3128"
    assert env_proxy("http://127.0.0.1:8080/v1/chat/completions") is None


@pytest.mark.asyncio
async def test_a_refused_connection_is_retryable():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        async with ChatClient(f"http://127.0.0.1:{port}/v1", "k", 5, 2) as client:
            with pytest.raises(Failure) as failure:
                await client.complete(BODY)
    assert (failure.value.scope, failure.value.error_class) == ("retry", "connection")


@pytest.mark.asyncio
async def test_a_gateway_error_page_is_a_retryable_server_error():
    async def bad_gateway(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>",
                            headers={"Retry-After": "2"}, content_type="text/html")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", bad_gateway)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with ChatClient(f"http://127.0.0.1:{port}/v1/", "k", 5, 2) as client:  # trailing slash joins too
            with pytest.raises(Failure) as failure:
                await client.complete(BODY)
    finally:
        await runner.cleanup()
    assert (failure.value.scope, failure.value.error_class, failure.value.retry_after) == ("retry", "server_error", 2.0)
    assert "502 Bad Gateway" in failure.value.message


@pytest.mark.parametrize("status, body, expected", [
    (429, b'{"error": {"code": "1113", "message": "arrears"}}', ("job", "account")),
    (429, b'{"error": {"code": "1302", "message": "too many"}}', ("retry", "rate_limited")),
    (429, b'{"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}',
     ("retry", "rate_limited")),  # OpenAI's shape: a text code, judged by the status
    (400, b'{"error": {"code": "1301", "message": "unsafe"}}', ("row", "content_filter")),
    (400, b'{"detail": "bad"}', ("row", "bad_request")),
    (503, b"", ("retry", "server_error")),
])
def test_status_failures_are_judged_by_business_code_then_status(status, body, expected):
    failure = status_failure(status, body, None)
    assert (failure.scope, failure.error_class) == expected


@pytest.mark.parametrize("escape", ["\\ud800", "\\uD800", "\\uDFFF"])
def test_a_lone_surrogate_escape_in_either_case_is_a_bad_response(escape):
    body = ('{"choices": [{"finish_reason": "stop", "message": {"content": "a ' + escape + ' b"}}]}').encode()
    with pytest.raises(Failure) as caught:
        parse_body(body)
    assert (caught.value.error_class, caught.value.scope) == ("bad_response", "retry")
    assert "choices[0].message.content" in caught.value.message


def test_a_surrogate_pair_escape_is_text():
    body = b'{"choices": [{"finish_reason": "stop", "message": {"content": "\\uD83D\\uDE00"}}]}'
    assert parse_body(body)["choices"][0]["message"]["content"] == "\U0001F600"
