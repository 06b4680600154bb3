"""A local OpenAI-compatible chat completions server for the demo, tests and benchmarks.

Answers are pure functions of the request (see `answer_for` / `completion_for`), so a
test can check every output row without a real model.  Failure modes that a batch
runner must survive (rate limits, 5xx, resets, malformed bodies, hangs, arrears) can be
switched on through `SimConfig` or triggered per row with markers in the last user
message: ``[[error:STATUS:CODE]]`` (``[[error:200:1113]]``: an error body in a 200),
``[[flaky:N]]``, ``[[malformed]]``, ``[[nochoices]]``, ``[[hang]]``, ``[[reset]]``,
``[[paidfail:N]]`` (the first N answers billed, with finish_reason network_error),
``[[badjson]]`` (a JSON-mode request answered in prose), ``[[badjson:N]]`` (the first N answers to the
prompt do not match the requested schema: see `completion_for`), ``[[fenced]]`` (JSON in a Markdown fence),
``[[slow:MS]]``, ``[[set:PATH=JSON]]`` (a field of the 200 answer set to a JSON value, e.g.
``[[set:usage.prompt_tokens="3"]]``; numbers in PATH index lists; several may be given),
``[[reply:BASE64]]`` (the reply's content is exactly this text, URL-safe base64 of its UTF-8: any text at all,
``]]`` and all, e.g. a JSON value no ``set`` marker can spell; `reply_marker` writes one),
``[[bigbody:BYTES]]`` (a 200 whose reply is BYTES long, with its Content-Length) and
``[[bigstream:BYTES]]`` (the same, streamed in chunks without a length).  A request with
``stream: true`` is answered with server-sent events (`_events`): the time to the first chunk and
between chunks are ``SimConfig.ttft_ms`` and ``chunk_interval_ms``, usage comes in the last chunk
(on /api/paas/v4 always, as Zhipu sends it; on /v1 only when ``stream_options.include_usage`` asks),
and markers break the stream: ``[[cutstream:N]]`` (a reset after N events, the prompt's first
request only), ``[[garbagechunk:N]]`` (an event that is not JSON after N),
``[[errorchunk:N:CODE]]`` (after N events, an error event with this Zhipu code, and the end),
``[[stall:N]]`` (silent for ``hang_s`` after N events, or after them all), ``[[nodone]]`` (no
``data: [DONE]``), ``[[tornend]]`` (the connection dropped after the last event, before the chunked
body's end, as llama-cpp-python's server was seen to do), ``[[nostream]]`` (one JSON body, as a server
that ignores ``stream`` answers), ``[[nodelta]]`` (the finish_reason's chunk without a ``delta``).
``[[toolcalls:N]]`` answers with N tool calls and no content, streamed as deltas by index with the arguments
in pieces, the calls interleaved (`tool_call_deltas`). How the events are written, byte for byte, is set by
``[[eol:lf|crlf|cr|mixed]]``, ``[[ssefields]]``, ``[[datalines]]`` and ``[[split:N]]`` (see `SseFraming`);
``[[ctype:TYPE]]`` labels any answer (streamed, JSON or error) with that Content-Type; ``[[bom]]`` starts a JSON
body (an answer, or an error) with a UTF-8 byte order mark; ``[[fewerchoices:K]]`` streams the prompt's first answer
with only its first K choices, each whole, and then ends (no usage, no ``[DONE]``); a stream kept open
after ``[DONE]`` is ``[[stall:N]]`` with N past its last event. A request with ``n`` above 1 gets that many
choices (choice 0 is the answer without ``n``), streamed with their deltas interleaved, each naming its
``index``. ``openai_strict`` answers a strict json_schema response_format outside OpenAI's subset with its
400 (`strict_schema_problem`).
``echo_key`` makes every error message and reply quote the Authorization header the request
carried, as a careless server might.  An outage that ends is ``SimConfig(down_for_requests=N)``: the first N requests
get 503 with code 1305 (``down_as="503"``) or a proxy's HTML 502 page (``down_as="html"``), the
later ones are answered.  ``SimulatorThread.reconfigure(**fields)`` changes SimConfig fields while it
serves, e.g. a test drops the latency once it has seen a run in progress.  ``history`` keeps a record
of every parsed request in ``stats["history"]``: its prompt, when it arrived and when it was answered
(``time.monotonic()``), and its status, so a test can see when a retry came relative to the answer
that asked for it.

The Batch API (files and batches, both dialects, on a clock of its own that ``POST /_batches/advance``
moves) is in batch/simulator/batches.py; its settings are the ``batch_*`` fields of SimConfig.

Run ``python -m batch.simulator --help`` for the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from batch.simulator.answers import (
    _LINE_ENDINGS,
    _MALFORMED_BODY,
    _MESSAGES,
    _RATE_LIMIT_CODES,
    _SET_RE,
    _SHUTDOWN_GRACE_S,
    _SSE_PIECE_CHARS,
    _STREAM_CHUNK,
    ChatRequest,
    _number,
    completion_for,
    count_tokens,
    markers_of,
    parse_chat,
    strict_schema_problem,
    tool_calls_for,
)
from batch.simulator.batches import BatchService
from batch.simulator.config import SimConfig


class Simulator:
    """The aiohttp application plus its counters; all state lives on one event loop."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self._runner: web.AppRunner | None = None
        self._in_flight = 0
        self.reconfigure(config or SimConfig())
        self.batches = BatchService(self)
        self._reset_state()

    def reconfigure(self, config: SimConfig) -> None:
        """Serve by `config` from the next request on; the counters are kept."""
        self.config = config
        self._auth = f"Bearer {config.api_key}" if config.api_key is not None else None

    def _reset_state(self) -> None:
        self._requests = 0
        self._by_status: dict[str, int] = {}
        self._by_prompt: dict[str, int] = {}
        self._history: list[dict[str, Any]] = []
        self._max_in_flight = self._in_flight
        self._flaky_seen: dict[str, int] = {}
        self._badjson_seen: dict[str, int] = {}
        self._paidfail_seen: dict[str, int] = {}
        self.bodies: list[dict[str, Any]] = []
        self._successes = 0
        self._slice, self._slice_count = -1, 0
        # Separate streams so enabling latency jitter does not shift which requests fault.
        self._fault_rng = random.Random(self.config.seed)
        self._latency_rng = random.Random(self.config.seed + 1)
        self.batches.reset_counters()

    @property
    def port(self) -> int:
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("simulator is not running")
        return int(self._runner.addresses[0][1])

    @property
    def stats(self) -> dict[str, Any]:
        """Snapshot of the counters (also served at GET /_stats).

        by_status keys are HTTP statuses as strings ("200" includes malformed and empty
        bodies) plus "reset" (connection aborted) and "disconnected" (the client left
        before the answer).  by_prompt counts every parsed request by last user message,
        rejected ones included.  max_in_flight counts admitted requests only, in_flight those being answered
        now.  history (with
        SimConfig.history) lists every parsed request in the order it was answered.
        """
        stats = {"requests": self._requests, "by_status": dict(self._by_status),
                 "by_prompt": dict(self._by_prompt), "max_in_flight": self._max_in_flight,
                 "in_flight": self._in_flight,
                 "batch_api": self.batches.stats()}
        if self.config.history:
            stats["history"] = list(self._history)
        return stats

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application()
        for path in ("/v1/chat/completions", "/api/paas/v4/chat/completions"):
            app.router.add_post(path, self._handle)
        self.batches.routes(app)
        app.router.add_get("/_stats", self._handle_stats)
        app.router.add_post("/_reset", self._handle_reset)
        # handler_cancellation: a client that times out on a hang frees its in-flight slot.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=_SHUTDOWN_GRACE_S)
        await self._runner.setup()
        # A deep backlog so benchmark bursts are not dropped at the kernel.
        await web.TCPSite(self._runner, host, port, backlog=2048).start()
        return f"http://{host}:{self.port}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.batches.close()

    def _count(self, status: str) -> None:
        self._by_status[status] = self._by_status.get(status, 0) + 1

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
        self._count(str(status))
        try:
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate set by [[set:...]]: only a \\u escape can carry it
            body = json.dumps(payload).encode("ascii")
        return web.Response(status=status, body=body, content_type="application/json", headers=headers)

    def _error(self, request: web.Request, status: int, code: str | None, message: str | None = None) -> web.Response:
        """A Zhipu-style error body; `[[error:429]]` (no code) sends a body without one, as plain proxies do."""
        headers = None
        if status == 429 and (code is None or code in _RATE_LIMIT_CODES) and self.config.retry_after is not None:
            headers = {"Retry-After": f"{self.config.retry_after:g}"}
        return self._json(status, self.error_body(request.headers.get("Authorization", ""), status, code, message),
                          headers)

    def error_body(self, authorization: str, status: int, code: str | None, message: str | None = None
                   ) -> dict[str, Any]:
        text = self.echo(authorization, message or _MESSAGES.get(code or "", f"simulated error {status}"))
        error: dict[str, Any] = {"message": text} if code is None else {"code": code, "message": text}
        return {"error": error}

    def echo(self, authorization: str, text: str) -> str:
        """The text, quoting the request's Authorization header when echo_key is on."""
        if not self.config.echo_key:
            return text
        return f"{text} (you sent Authorization: {authorization})"

    def authorized(self, request: web.Request) -> bool:
        return self._auth is None or request.headers.get("Authorization") == self._auth

    def _down(self, request: web.Request) -> web.Response:
        """The answer of an endpoint that is down: an overloaded API, or the HTML page of the proxy in front of it."""
        if self.config.down_as == "503":
            return self._error(request, 503, "1305")
        self._count("502")
        page = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
        return web.Response(status=502, text=page, content_type="text/html")

    def _rpm_exceeded(self) -> bool:
        rpm = self.config.rpm
        if rpm is None:
            return False
        now = int(time.monotonic())
        if now != self._slice:
            self._slice, self._slice_count = now, 0
        if self._slice_count >= max(1, int(rpm / 60)):
            return True
        self._slice_count += 1  # rejected requests do not use up the slice
        return False

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats, dumps=lambda obj: json.dumps(obj, ensure_ascii=False))

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self._reset_state()
        return web.json_response({"ok": True})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self._requests += 1
        cfg = self.config
        if not self.authorized(request):
            return self._error(request, 401, "1000")
        try:
            body = json.loads(await request.read())
            chat = parse_chat(body)
        except (ValueError, KeyError, TypeError) as exc:
            return self._error(request, 400, "1214", f"请求参数非法 / invalid request: {type(exc).__name__}")
        if cfg.keep_bodies:
            self.bodies.append(body)
        refused = strict_schema_problem(body) if cfg.openai_strict else None
        if refused is not None:
            return self._json(400, {"error": {"message": refused, "type": "invalid_request_error",
                                              "param": "response_format", "code": None}})
        prompt = chat.prompt
        self._by_prompt[prompt] = self._by_prompt.get(prompt, 0) + 1
        if not cfg.history:
            return await self._admit(request, chat)
        arrived = time.monotonic()
        response = await self._admit(request, chat)
        self._history.append({"prompt": prompt, "arrived": arrived, "answered": time.monotonic(),
                              "status": response.status})
        return response

    async def _admit(self, request: web.Request, chat: ChatRequest) -> web.StreamResponse:
        """Refuse the request (an outage, over the concurrency or rate limit), or answer it."""
        cfg = self.config
        if self._requests <= cfg.down_for_requests:
            return self._down(request)
        # No await between this check and the increment, so the limit is exact.
        if cfg.max_concurrency is not None and self._in_flight >= cfg.max_concurrency:
            return self._error(request, 429, "1302")
        if self._rpm_exceeded():
            return self._error(request, 429, "1302")
        self._in_flight += 1
        if self._in_flight > self._max_in_flight:
            self._max_in_flight = self._in_flight
        try:
            response = await self._respond(request, chat)
            markers = markers_of(chat.prompt)
            label = markers.get("ctype")
            if label is not None and not response.prepared:  # [[ctype:TYPE]] labels every answer, not only streams
                response.headers["Content-Type"] = label
            if "bom" in markers and isinstance(response, web.Response) and isinstance(response.body, bytes):
                response.body = codecs.BOM_UTF8 + response.body  # [[bom]]: a JSON body (answer or error) after a BOM
            return response
        except asyncio.CancelledError:
            self._count("disconnected")  # the client gave up (timeout) before we answered
            raise
        finally:
            self._in_flight -= 1

    async def _respond(self, request: web.Request, chat: ChatRequest) -> web.StreamResponse:
        cfg = self.config
        prompt = chat.prompt
        if cfg.fail_after is not None and self._successes >= cfg.fail_after:
            return self._error(request, cfg.fail_status, cfg.fail_code)
        markers = markers_of(prompt)
        delay = 0.0
        if cfg.latency_ms > 0:
            delay = cfg.latency_ms
            if cfg.latency_dist == "lognormal":
                delay = self._latency_rng.lognormvariate(math.log(cfg.latency_ms), cfg.latency_sigma)
        if "slow" in markers:
            delay += _number(markers["slow"], 0)
        if delay > 0:
            await asyncio.sleep(delay / 1000)

        if "error" in markers:
            status, _, code = markers["error"].partition(":")
            return self._error(request, int(_number(status, 500)), code or None)
        if self.flaky_fails(prompt, markers):
            return self._error(request, 500, "1200")
        outcome = ""
        for name in ("malformed", "nochoices", "hang", "reset"):
            if name in markers:
                outcome = name
                break
        else:
            # One draw per request over the cumulative probabilities: faults are exclusive.
            draw = self._fault_rng.random()
            for name, p in (("500", cfg.p_500), ("503", cfg.p_503), ("reset", cfg.p_reset),
                            ("malformed", cfg.p_malformed), ("hang", cfg.p_hang)):
                if draw < p:
                    outcome = name
                    break
                draw -= p

        if outcome == "500":
            return self._error(request, 500, "1200")
        if outcome == "503":
            return self._error(request, 503, "1305")
        if outcome == "reset":
            return self._reset_connection(request)
        if outcome == "malformed":
            self._count("200")
            return web.Response(status=200, body=_MALFORMED_BODY, content_type="application/json")
        if outcome == "hang":
            await asyncio.sleep(cfg.hang_s)
        # Re-check after the sleeps so concurrent requests cannot overshoot fail_after.
        if cfg.fail_after is not None and self._successes >= cfg.fail_after:
            return self._error(request, cfg.fail_status, cfg.fail_code)

        if outcome != "nochoices":
            self._successes += 1
        request_id, answer = self.chat_completion(chat, markers, request.headers.get("Authorization", ""),
                                                  nochoices=outcome == "nochoices")
        if chat.stream and "nostream" not in markers:
            zhipu = request.path.startswith("/api/paas/")
            return await self._events(request, answer, zhipu or chat.include_usage, zhipu, markers, prompt)
        if "bigstream" in markers:
            return await self._stream(request, answer, request_id)
        return self._json(200, answer, {"x-request-id": request_id})

    def flaky_fails(self, prompt: str, markers: dict[str, str]) -> bool:
        """[[flaky:N]]: True for the first N requests with this prompt (online and Batch API lines alike)."""
        if "flaky" not in markers:
            return False
        seen = self._flaky_seen[prompt] = self._flaky_seen.get(prompt, 0) + 1
        return seen <= _number(markers["flaky"], 1)

    def chat_completion(self, chat: ChatRequest, markers: dict[str, str], authorization: str,
                        nochoices: bool = False) -> tuple[str, dict[str, Any]]:
        """The request id and chat.completion body of a 200, shaped by the prompt's markers (which may change the
        body's own ids); the Batch API's output lines reuse it."""
        violate = False
        if markers.get("badjson"):  # [[badjson:N]]: the first N answers to this prompt do not match
            seen = self._badjson_seen[chat.prompt] = self._badjson_seen.get(chat.prompt, 0) + 1
            violate = seen <= _number(markers["badjson"], 1)
        request_id = "chatcmpl-" + os.urandom(6).hex()
        choices: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = 0
        # Choice 0 is the answer of a request without n; each further one (n above 1) is told apart by its model name.
        for index in range(chat.n):
            result = completion_for(chat.model if index == 0 else f"{chat.model} choice {index}", chat.messages,
                                    chat.max_tokens, chat.json_mode, chat.schema, violate, "fenced" in markers)
            if "reply" in markers:
                result["content"] = base64.urlsafe_b64decode(markers["reply"]).decode("utf-8")
                result["completion_tokens"] = count_tokens(result["content"])
            content = self.echo(authorization, result["content"])
            big = markers.get("bigbody") or markers.get("bigstream")
            if big is not None:
                content += "x" * max(0, int(_number(big, 0)) - len(content))
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if "[[think]]" in chat.prompt:  # a thinking model's reasoning, as GLM-4.5+ returns it
                message["reasoning_content"] = f"reasoning about: {chat.prompt[:32]}"
            spent = result["completion_tokens"]
            if "toolcalls" in markers:  # the model calls tools instead of answering, as OpenAI and GLM do
                calls = tool_calls_for(chat, int(_number(markers["toolcalls"] or "1", 1)))
                message.update(content=None, tool_calls=calls)
                result["finish_reason"] = "tool_calls"
                spent = sum(count_tokens(json.dumps(call["function"])) for call in calls)
            choices.append({"index": index, "finish_reason": result["finish_reason"], "message": message})
            prompt_tokens = result["prompt_tokens"]
            completion_tokens += spent
        answer = {
            "id": request_id, "request_id": request_id, "object": "chat.completion",
            "created": int(time.time()), "model": chat.model, "choices": [] if nochoices else choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        if markers.get("paidfail"):  # [[paidfail:N]]: the first N answers are billed, but the model's inference failed
            seen = self._paidfail_seen[chat.prompt] = self._paidfail_seen.get(chat.prompt, 0) + 1
            if seen <= _number(markers["paidfail"], 1):
                for choice in choices:
                    choice["finish_reason"] = "network_error"
        for path, value in _SET_RE.findall(chat.prompt):
            _set_field(answer, path, value)
        return request_id, answer

    async def _events(self, request: web.Request, answer: dict[str, Any], wants_usage: bool, zhipu: bool,
                      markers: dict[str, str], prompt: str) -> web.StreamResponse:
        """`answer` as server-sent events, as the request asked with stream: true: reasoning, then content, in
        pieces (the pieces of several choices in turn, each delta naming its choice's index), each choice's
        finish_reason, the usage (in the last finish_reason's chunk for Zhipu; in one of its own for the /v1
        dialect, and only when stream_options.include_usage asks), then [DONE]. Faults and framing by marker."""
        cfg = self.config
        head = {key: answer[key] for key in ("id", "request_id", "created", "model") if key in answer}
        head["object"] = "chat.completion.chunk"
        events: list[dict[str, Any] | bytes] = []  # each event's data: a chunk, or bytes sent as they are

        def add(choice: dict[str, Any] | None, **extra: Any) -> None:
            events.append({**head, "choices": [] if choice is None else [choice], **extra})

        choices = answer["choices"] or [{"index": 0}]  # [[nochoices]]: a finish_reason chunk of nothing
        pieces: list[list[dict[str, Any]]] = []
        for position, choice in enumerate(choices):
            index = choice.get("index", position) if isinstance(choice, dict) else position
            message = (choice.get("message") if isinstance(choice, dict) else None) or {}
            mine: list[dict[str, Any]] = []
            pieces.append(mine)
            for key in ("reasoning_content", "content"):
                text = message.get(key)
                if not isinstance(text, str):  # a value [[set:...]] made odd is sent as it is, in one delta
                    if text is not None:
                        mine.append({"index": index, "delta": {key: text}})
                    continue
                for start in range(0, len(text), _SSE_PIECE_CHARS):
                    mine.append({"index": index, "delta": {"role": "assistant",
                                                           key: text[start:start + _SSE_PIECE_CHARS]}})
            mine.extend({"index": index, "delta": {"tool_calls": [delta]}}
                        for delta in tool_call_deltas(message.get("tool_calls")))
        for turn in itertools.zip_longest(*pieces):
            for piece in turn:
                if piece is not None:
                    add(piece)
        usage = {"usage": answer["usage"]} if wants_usage and "usage" in answer else {}
        for position, choice in enumerate(choices):
            last = position == len(choices) - 1
            finish = {"index": choice.get("index", position), "finish_reason": choice.get("finish_reason")}
            if "nodelta" not in markers:  # [[nodelta]]: the finish_reason's chunk carries no delta at all
                finish = {"index": finish["index"], "delta": {}, "finish_reason": finish["finish_reason"]}
            add(finish, **(usage if zhipu and last else {}))
        if usage and not zhipu:
            add(None, **usage)
        if "nodone" not in markers:
            events.append(b"[DONE]")
        if "fewerchoices" in markers:  # like [[flaky]]: the prompt's first request only
            seen = self._flaky_seen[prompt] = self._flaky_seen.get(prompt, 0) + 1
            if seen == 1:  # only the first K choices, each whole, then the end: no usage, no [DONE]
                kept = {choice.get("index", at) for at, choice in enumerate(choices[:int(_number(
                    markers["fewerchoices"], 1))])}
                events = [event for event in events if isinstance(event, dict) and event["choices"]
                          and all(choice["index"] in kept for choice in event["choices"])]
                for event in events:
                    event.pop("usage", None)

        cut_after = None
        if "cutstream" in markers:  # like [[flaky]]: the prompt's first request only
            seen = self._flaky_seen[prompt] = self._flaky_seen.get(prompt, 0) + 1
            cut_after = int(_number(markers["cutstream"], 1)) if seen == 1 else None
        garbage_at = int(_number(markers["garbagechunk"], 1)) if "garbagechunk" in markers else None
        if "errorchunk" in markers:  # the server gives up mid-answer, as vLLM and others say so
            at, _, code = markers["errorchunk"].partition(":")
            error = {"code": code or "1200", "message": _MESSAGES.get(code, "simulated error mid-stream")}
            events[int(_number(at, 1)):] = [{"error": error}]
        stall_at = int(_number(markers["stall"], 1)) if "stall" in markers else None
        framing = SseFraming(markers)
        response = web.StreamResponse(status=200, headers={"Content-Type": markers.get("ctype", "text/event-stream"),
                                                           "Cache-Control": "no-cache"})

        async def write() -> bool:
            for sent, event in enumerate(events):
                if sent == cut_after:
                    await framing.flush(response)
                    self._reset_connection(request)
                    return False
                if sent == stall_at:
                    await framing.flush(response)
                    await asyncio.sleep(cfg.hang_s)
                if sent == garbage_at:
                    await framing.send(response, b'{"choices": [{"delta": {"content": "x')
                wait_ms = cfg.ttft_ms if sent == 0 else cfg.chunk_interval_ms
                if wait_ms > 0:
                    await framing.flush(response)
                    await asyncio.sleep(wait_ms / 1000)
                await framing.send(response, event)
            await framing.flush(response)
            if stall_at is not None and stall_at >= len(events):  # silent after [DONE], the stream left open
                await asyncio.sleep(cfg.hang_s)
            if "tornend" in markers:  # the connection dropped after the last event, before the chunked body's end
                self._reset_connection(request)
                return False
            return True

        return await self._send_streamed(request, response, write)

    async def _stream(self, request: web.Request, answer: dict[str, Any], request_id: str) -> web.StreamResponse:
        """The answer in chunks, without a Content-Length: a client learns its size only by reading it."""
        body = json.dumps(answer, ensure_ascii=False).encode("utf-8")
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                           "x-request-id": request_id})
        response.enable_chunked_encoding()

        async def write() -> bool:
            for start in range(0, len(body), _STREAM_CHUNK):
                await response.write(body[start:start + _STREAM_CHUNK])
            return True

        return await self._send_streamed(request, response, write)

    async def _send_streamed(self, request: web.Request, response: web.StreamResponse,
                             write: Callable[[], Awaitable[bool]]) -> web.StreamResponse:
        """`response` sent: prepared, its body from `write` (False: it cut the connection itself), ended, and
        counted "200", or "disconnected" when the client closed the connection first."""
        try:
            await response.prepare(request)
            if not await write():
                return response
            await response.write_eof()
        except ConnectionError:  # the client stopped reading and closed the connection
            self._count("disconnected")
            return response
        self._count("200")
        return response

    def _reset_connection(self, request: web.Request) -> web.Response:
        self._count("reset")
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER 0 turns the close into a TCP RST, i.e. a real "connection reset".
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        # aiohttp fails to write this to the dead transport and drops it quietly.
        return web.Response(status=200)


def tool_call_deltas(calls: Any) -> list[Any]:
    """Tool calls as a stream sends them, one delta per event, each naming its call by index: first the call's id,
    type and name with empty arguments, then its arguments in pieces; the pieces of parallel calls interleaved, which
    a client must put together by index. A value [[set:...]] made odd is sent as it is, in one delta."""
    if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
        return [] if calls is None else [calls]
    per_call = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        arguments = function.get("arguments")
        head = {"index": index, **{k: v for k, v in call.items() if k != "function"},
                "function": {**function, "arguments": ""}}
        if not isinstance(arguments, str):
            per_call.append([{**head, "function": function}])
            continue
        pieces = [arguments[start:start + _SSE_PIECE_CHARS] for start in range(0, len(arguments), _SSE_PIECE_CHARS)]
        per_call.append([head, *({"index": index, "function": {"arguments": piece}} for piece in pieces)])
    interleaved = []
    for turn in range(max((len(deltas) for deltas in per_call), default=0)):
        interleaved.extend(deltas[turn] for deltas in per_call if turn < len(deltas))
    return interleaved


class SseFraming:
    """How the simulator writes a stream's events, by marker: ``[[eol:lf|crlf|cr|mixed]]`` (the line ending; mixed:
    LF, CRLF and CR in turn, line by line), ``[[ssefields]]`` (a byte order mark first, and before each event a
    comment, ``event:``, ``id:`` and ``retry:`` lines, all of which a reader skips), ``[[datalines]]`` (each chunk's
    JSON over several ``data:`` lines, which a reader joins with newlines) and ``[[split:N]]`` (the stream's bytes
    written N at a time, 1 ms apart, so they reach the client in pieces cut anywhere: inside a multi-byte character,
    between CR and LF)."""

    def __init__(self, markers: dict[str, str]) -> None:
        self._endings = itertools.cycle(_LINE_ENDINGS.get(markers.get("eol", "lf"), (b"\n",)))
        self.fields = "ssefields" in markers
        self.datalines = "datalines" in markers
        split = int(_number(markers.get("split", ""), 0))
        self.split = split if split > 0 else None
        self._events = 0
        self._pending = bytearray()

    def event(self, data: dict[str, Any] | bytes) -> bytes:
        """The bytes of one event whose data is `data`: a chunk (JSON), or bytes as they are ([DONE], a broken
        chunk)."""
        if isinstance(data, bytes):
            lines = [data]
        else:
            try:
                text = json.dumps(data, ensure_ascii=False, indent=1 if self.datalines else None).encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate set by [[set:...]]
                text = json.dumps(data, indent=1 if self.datalines else None).encode("ascii")
            lines = text.split(b"\n")
        self._events += 1
        out: list[bytes] = []
        if self.fields:
            out += [b": keep-alive", b"event: message", b"id: %d" % self._events, b"retry: 1000"]
        # A data line's one space after the colon is optional: the second and later lines go without it.
        out += [(b"data: " if number == 0 else b"data:") + line for number, line in enumerate(lines)]
        out.append(b"")
        framed = bytearray()
        for line in out:
            ending = next(self._endings)
            if not line and ending == b"\n" and framed.endswith(b"\r"):
                ending = next(self._endings)  # CR, then an empty line's LF, would read as one CRLF: no blank line
            framed += line + ending
        return b"\xef\xbb\xbf" + framed if self.fields and self._events == 1 else bytes(framed)

    async def send(self, response: web.StreamResponse, data: dict[str, Any] | bytes) -> None:
        """One event written, or (with [[split:N]]) added to what is written N bytes at a time."""
        if self.split is None:
            await response.write(self.event(data))
            return
        self._pending += self.event(data)
        while len(self._pending) >= self.split:
            await self._write_piece(response)

    async def flush(self, response: web.StreamResponse) -> None:
        """Write what [[split:N]] holds back, before a pause, a fault or the end."""
        while self._pending:
            await self._write_piece(response)

    async def _write_piece(self, response: web.StreamResponse) -> None:
        piece = bytes(self._pending[:self.split])
        del self._pending[:self.split]
        await response.write(piece)
        await asyncio.sleep(0.001)  # a pause, so the pieces are not joined on their way to the client


def _set_field(answer: dict[str, Any], path: str, text: str) -> None:
    """[[set:PATH=JSON]]: PATH's field (dicts created on the way, numbers index lists) set to the JSON value.

    A value that is not JSON is taken as a string: marker arguments are typed by hand.
    """
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    *parents, last = path.split(".")
    node: Any = answer
    try:
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    except (LookupError, ValueError, TypeError, AttributeError):
        pass  # a path that does not fit the answer changes nothing


class SimulatorThread:
    """A Simulator on its own event loop in a daemon thread, for sync code and other loops."""

    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.simulator = Simulator(config)
        self.url = ""
        self._host, self._port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.simulator.port

    def start(self) -> str:
        """Start serving; returns once the server accepts connections (or raises its error)."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                self.url = loop.run_until_complete(self.simulator.start(self._host, self._port))
            except BaseException as exc:  # reported to the starting thread
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.simulator.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="batch-simulator", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            self._thread.join()
            self._thread = None
            raise errors[0]
        return self.url

    def stop(self) -> None:
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._thread = None

    def _call(self, fn: Any) -> Any:
        """Run fn on the server loop: the counters are only ever touched from that thread."""
        assert self._loop is not None, "simulator thread is not running"

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result()

    def stats(self) -> dict[str, Any]:
        return self._call(lambda: self.simulator.stats)

    def reset(self) -> None:
        self._call(self.simulator._reset_state)

    def bodies(self) -> list[dict[str, Any]]:
        """The request bodies received so far, parsed (with SimConfig(keep_bodies=True))."""
        return self._call(lambda: list(self.simulator.bodies))

    def reconfigure(self, **fields: Any) -> None:
        """Change these SimConfig fields from the next request on (requests already waiting keep theirs)."""
        config = dataclasses.replace(self.simulator.config, **fields)
        self._call(lambda: self.simulator.reconfigure(config))

    def advance(self, seconds: float) -> None:
        """Move the Batch API clock forward (as POST /_batches/advance does)."""
        self._call(lambda: self.simulator.batches.advance(seconds))

    def forget(self, *ids: str) -> list[str]:
        """Forget these Batch API files and batches, or all of them (as POST /_batches/forget does)."""
        return self._call(lambda: self.simulator.batches.forget(list(ids) if ids else None))

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _add_signal_handler(loop: asyncio.AbstractEventLoop, sig: int, callback: Any) -> None:
    # Only possible in the main thread on Unix; elsewhere the default handling applies.
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(sig, callback)


async def _serve(config: SimConfig, host: str, port: int, command: list[str]) -> int:
    simulator = Simulator(config)
    try:
        url = await simulator.start(host, port)
    except OSError as exc:  # the port taken (another simulator still running?), or the host not this machine's
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"simulator: cannot listen on {host}:{port}: {why}; pick another port with --port "
              f"(make demo SIM_PORT=...)", file=sys.stderr)
        return 2
    print(f"simulator listening on {url}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    try:
        if not command:
            stopped = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                _add_signal_handler(loop, sig, stopped.set)
            await stopped.wait()
            return 0
        try:
            proc = await asyncio.create_subprocess_exec(*command, env={**os.environ, "BATCH_SIMULATOR_URL": url,
                                                                          "BATCH_SIMULATOR_PORT": str(simulator.port)})
        except OSError as exc:
            print(f"simulator: cannot run {command[0]!r}: {exc}", file=sys.stderr)
            return 127
        # Ctrl-C already reaches the child through the terminal's process group; keep
        # serving until it exits.  A SIGTERM aimed at us alone is passed on.
        _add_signal_handler(loop, signal.SIGINT, lambda: None)
        _add_signal_handler(loop, signal.SIGTERM, proc.terminate)
        code = await proc.wait()
        return code if code >= 0 else 128 - code
    finally:
        await simulator.stop()


def build_parser() -> argparse.ArgumentParser:
    """The simulator's command line: where to listen, and an option for each SimConfig field."""
    parser = argparse.ArgumentParser(
        prog="python -m batch.simulator", description=__doc__.split("\n\n")[0],
        epilog="With '-- COMMAND ARGS...' the command runs with BATCH_SIMULATOR_URL and BATCH_SIMULATOR_PORT set, "
               "then the server stops and its exit code is returned.")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--port", type=int, default=18080, help="the port to listen on; 0 picks a free one")
    parser.add_argument("--api-key-env", metavar="NAME", help="require the key held in this environment variable "
                                                              "(Authorization: Bearer ...); otherwise answer 401 "
                                                              "with code 1000")
    for field in dataclasses.fields(SimConfig):
        if field.name == "api_key":  # from --api-key-env: a key is never written on a command line
            continue
        # A setting without a meaning still gets its option; the docs' generator refuses it (docs/generate.py).
        option, meaning = "--" + field.name.replace("_", "-"), field.metadata.get("help")
        if str(field.type) == "bool":
            parser.add_argument(option, action="store_true", help=meaning)
            continue
        kind = {"int | None": int, "float | None": float}.get(str(field.type))
        kind = kind or {"float": float, "int": int, "str": str}[str(field.type)]
        parser.add_argument(option, type=kind, default=field.default, help=meaning)
    return parser


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The SimConfig fields a command line (parsed by build_parser) sets, but the key (from --api-key-env)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(SimConfig) if f.name != "api_key"}


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in args_list:
        split = args_list.index("--")
        args_list, command = args_list[:split], args_list[split + 1:]
    parser = build_parser()
    args = parser.parse_args(args_list)
    options = settings_of(args)
    if args.api_key_env:
        options["api_key"] = os.environ.get(args.api_key_env)
        if not options["api_key"]:
            parser.error(f"environment variable {args.api_key_env} is not set")
    try:
        config = SimConfig(**options)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return asyncio.run(_serve(config, args.host, args.port, command))
    except KeyboardInterrupt:
        return 130

