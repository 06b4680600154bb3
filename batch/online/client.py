"""The HTTP client: one chat-completion POST, its answer as a dict or its failure classified.

Why aiohttp directly and not the openai SDK (measured by `make bench` on 2 cores, zero-latency
server, 256 in flight): the SDK on its default httpx transport costs about 2.7 ms of client CPU
per request, on its aiohttp transport 1.2 ms, and even its raw `post()` path 0.84 ms inside our
pipeline, where a bare aiohttp loop costs 0.15 ms. The SDK's per-request work (options models,
header merging, the httpx layer over aiohttp, response wrappers) is the cost, and nothing in it is
needed for one JSON POST whose failures we classify ourselves anyway (Zhipu's business codes, not
the SDK's classes, decide what is retried). Importing the SDK also costs about 0.8 s of CPU and
40 MB at every start. What the SDK would have given us is kept: Bearer auth, base_url joining,
the proxy the environment names (batch/proxy.py, read once into the plan), a timeout per request and no hidden
retries.
"""

from __future__ import annotations

import codecs
import json
import time
from typing import Any

import aiohttp

from batch.config import DEFAULT_MAX_RESPONSE_BYTES
from batch.logs import hide_secrets, keep_secret
from batch.online.failures import Failure, classify_status, retry_after_seconds
from batch.online.sse import EventStream
from batch.providers import ZHIPU_CODES, BusinessCodes
from batch.wording import counted

BOM = codecs.BOM_UTF8  # some servers start a body with one; JSON (RFC 8259 8.1) lets a reader ignore it
USER_AGENT = "batch/0.1 (OpenAI-compatible chat completions)"
# Token counts land in int64 columns: a larger one would stop the checkpoint's writer, not just this row.
MAX_TOKEN_COUNT = 2**63 - 1
USAGE_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")
# The text fields of an answer that are recorded, by where they sit: the answer, and each choice and its message.
ANSWER_TEXT_FIELDS = ("model", "id", "request_id")
CHOICE_TEXT_FIELDS = ("finish_reason",)
MESSAGE_TEXT_FIELDS = ("content", "reasoning_content")


class ChatClient:
    """POSTs to `{base_url}/chat/completions` over one pooled aiohttp session.

    `idle_timeout_s` (streamed answers only): the longest silence allowed while waiting for the answer
    and between its chunks, aiohttp's sock_read timeout; `timeout_s` stays the cap on the whole answer.
    `codes`: the provider's business codes, by which an error answer is judged. `proxy`: the proxy every request goes
    through (the plan's: batch/proxy.py), or None.
    """

    def __init__(self, base_url: str, api_key: str, timeout_s: float, max_connections: int,
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES, idle_timeout_s: float | None = None,
                 codes: BusinessCodes = ZHIPU_CODES, proxy: str | None = None) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.codes = codes
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_response_bytes = max_response_bytes
        keep_secret(api_key)  # a server may repeat it (a 401 quoting the header): masked in every failure
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                         "Accept": "application/json", "User-Agent": USER_AGENT}
        self._stream_headers = {**self._headers, "Accept": "text/event-stream"}
        # One connection per request in flight: aiohttp's default pool of 100 would queue the rest
        # inside the client, where neither the limiter nor the timeout can see them.
        self._connector = aiohttp.TCPConnector(limit=max_connections)
        # The proxy is the plan's, looked up once (batch/proxy.py): aiohttp's trust_env would re-read the environment
        # and parse ~/.netrc in a thread for every request, which cost more CPU than the request itself.
        self._session = aiohttp.ClientSession(connector=self._connector, proxy=proxy,
                                              timeout=aiohttp.ClientTimeout(total=timeout_s, sock_read=idle_timeout_s))

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    async def complete(self, body: bytes) -> dict[str, Any]:
        """The completion for a JSON request body; raises Failure for every way it can go wrong."""
        try:
            async with self._session.post(self.url, data=body, headers=self._headers) as response:
                status, headers = response.status, response.headers
                raw, oversize = await self._read(response)
        except TimeoutError as exc:  # aiohttp's connect and read timeouts are TimeoutError subclasses
            raise self._timeout(exc) from None
        except (aiohttp.ClientError, OSError) as exc:  # refused, reset, closed mid-answer, DNS
            raise connection_failure(exc) from None
        return self._judged(status, headers, raw, oversize)

    async def stream(self, body: bytes, choices: int = 1) -> tuple[dict[str, Any], float | None]:
        """The completion for a request body that asks for a stream (`choices`: its `n`), assembled from its events,
        and the time.perf_counter() of its first content, reasoning or tool-call token (None when none came); raises
        Failure.

        The assembled answer is checked and masked as a non-streamed one is. A 200 is read by what it holds,
        not by its Content-Type (servers label event streams text/plain or application/json, and JSON bodies
        text/event-stream): one JSON body (a server that ignores `stream`, or an error) is taken at its word.
        """
        try:
            async with self._session.post(self.url, data=body, headers=self._stream_headers) as response:
                status, headers = response.status, response.headers
                if status == 200:
                    return await self._read_stream(response, choices)
                raw, oversize = await self._read(response)
        except TimeoutError as exc:
            raise self._timeout(exc) from None
        except (aiohttp.ClientError, OSError) as exc:  # refused, reset, closed mid-stream, DNS
            raise connection_failure(exc) from None
        return self._judged(status, headers, raw, oversize), None

    def _judged(self, status: int, headers: Any, raw: bytes, oversize: str | None) -> dict[str, Any]:
        """A whole (not streamed) answer read by _read: the completion, or the Failure it is."""
        if status != 200:  # judged by its status and what fits of its body
            raise status_failure(status, raw, retry_after_seconds(headers), self.codes)
        if oversize is not None:
            raise Failure("retry", "bad_response", f"HTTP 200 with an answer of {oversize}, over "
                                                   f"limits.max_response_bytes ({self.max_response_bytes})")
        return parse_body(raw, self.codes)

    def _timeout(self, exc: TimeoutError) -> Failure:
        if isinstance(exc, aiohttp.SocketTimeoutError) and self.idle_timeout_s is not None:
            return Failure("retry", "timeout", f"the stream was silent for {self.idle_timeout_s:g} s "
                                               "(limits.idle_timeout_s)")
        return Failure("retry", "timeout", f"no complete answer within {self.timeout_s:g} s (limits.timeout_s)")

    async def _read_stream(self, response: aiohttp.ClientResponse,
                           choices: int) -> tuple[dict[str, Any], float | None]:
        """A 200 to a stream request, read as it comes: one JSON body when it opens with `{` or `[` (after a byte
        order mark, and any whitespace), else server-sent events (batch.online.sse). The answer, checked, and when its
        first token came.

        Every byte read counts against max_response_bytes. [DONE] ends the request at once: the rest is not
        waited for (a server may keep the connection open), and the connection is kept for the next request only
        when its end is already in. A stream that ends without [DONE] once every choice has its finish_reason is
        whole (llama.cpp forks and older TGI never send [DONE]); so is one that then falls silent or is dropped.
        Every choice: as many as the request asked for (`choices`), each with its finish_reason.
        """
        cap, size, opening = self.max_response_bytes, 0, b""
        stream = StreamedAnswer(self.codes, choices)
        try:
            async for piece in response.content.iter_any():
                size += len(piece)
                if size > cap:
                    break
                if opening is not None:  # what the answer is, not yet known: only whitespace came so far
                    opening += piece
                    if BOM.startswith(opening):  # a byte order mark, or the start of one: not yet known
                        continue
                    first = opening.removeprefix(BOM).lstrip()[:1]
                    if not first:
                        continue
                    if first in b"{[":
                        raw, oversize = await self._read_chunks(response, opening, cap)
                        return self._judged(200, response.headers, raw, oversize), None
                    piece, opening = opening, None
                if stream.feed(piece):  # [DONE]
                    response.release()  # kept for reuse if the body's end is in, else closed
                    return stream.answer(), stream.first_token_at
            else:
                stream.end()
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError):
            # A whole answer, then silence or a dropped connection (llama-cpp-python's server drops it before the
            # chunked body's end, for every answer): the answer stands.
            if not stream.whole:
                raise
            response.close()
        if size > cap:
            response.close()  # the rest is never read: the connection cannot be reused
            raise Failure("retry", "bad_response", f"HTTP 200 with a streamed answer of more than "
                                                   f"{counted(cap, 'byte')}, over limits.max_response_bytes")
        return stream.answer(), stream.first_token_at

    async def _read(self, response: aiohttp.ClientResponse) -> tuple[bytes, str | None]:
        """The body, and None; or, for a body over max_response_bytes, what was read and its size.

        Never more than the cap is held: a declared length over it is refused unread, and a body of
        unknown length (chunked, or compressed: its decoded size is unknown) is read a chunk at a time.
        """
        cap, length = self.max_response_bytes, response.content_length
        if length is not None and length > cap:
            response.close()  # the rest is never read: the connection cannot be reused
            return b"", counted(length, "byte")
        if length is not None and "Content-Encoding" not in response.headers:
            return await response.read(), None  # exactly `length` bytes: the common case, at aiohttp's speed
        return await self._read_chunks(response, b"", cap)

    @staticmethod
    async def _read_chunks(response: aiohttp.ClientResponse, head: bytes, cap: int) -> tuple[bytes, str | None]:
        """`head` (read already) and the rest of the body a chunk at a time, as _read returns them."""
        chunks, size = [head], len(head)
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > cap:
                response.close()
                return b"".join(chunks), f"more than {counted(cap, 'byte')}"
            chunks.append(chunk)
        return b"".join(chunks), None


def connection_failure(exc: BaseException) -> Failure:
    """A request that got no answer: refused, reset, closed mid-answer, DNS."""
    detail = f"{type(exc).__name__}: {exc}"[:200]
    return Failure("retry", "connection", f"connection error ({detail})")


def status_failure(status: int, raw: bytes, retry_after: float | None, codes: BusinessCodes = ZHIPU_CODES) -> Failure:
    """A non-200 answer, judged by the business code in its body first (Zhipu: {"error": {"code": ...}})."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    error = body.get("error", body) if isinstance(body, dict) else None
    code = message = None
    if isinstance(error, dict):
        code, message = _int_or_none(error.get("code")), error.get("message")
    elif isinstance(error, str):
        message = error
    if message is None:
        message = raw[:300].decode("utf-8", "replace").strip()
    return classify_status(status, code, str(message)[:300], retry_after, codes)


def parse_body(body: bytes, codes: BusinessCodes = ZHIPU_CODES) -> dict[str, Any]:
    """A 200's body as a completion whose recorded fields have the documented types, or the Failure it really is.
    A byte order mark before it is not part of it (json.loads of bytes takes it for the encoding's sign)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise Failure("retry", "bad_response", "HTTP 200 with a body that is not JSON") from None
    if not isinstance(data, dict):
        raise Failure("retry", "bad_response", "HTTP 200 with a body that is not a JSON object")
    error = data.get("error")
    if error is not None and not data.get("choices"):
        # Some gateways answer 200 with an error body: judged by its business code, reported as the 200 it is.
        raise error_in_200(error, codes)
    # "\ud800"-style escapes are the only way to a lone surrogate, which no UTF-8 file can hold.
    return accepted(data, maybe_surrogates=b"\\ud" in body or b"\\uD" in body)


def error_in_200(error: Any, codes: BusinessCodes) -> Failure:
    """An HTTP 200 whose body (or stream event) is an `error` and no choices, judged by its business code."""
    code = _int_or_none(error.get("code")) if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return classify_status(200, code, str(message or "")[:300], codes=codes)


def accepted(data: dict[str, Any], maybe_surrogates: bool = True) -> dict[str, Any]:
    """An answer, streamed or not, checked and with the key masked (check_answer); a Failure if it is an error."""
    try:
        check_answer(data, maybe_surrogates)
        if any(choice.get("finish_reason") == "network_error" for choice in data["choices"]):
            raise Failure("retry", "server_error", "finish_reason network_error (model inference error)")
    except Failure as failure:
        raise paid(failure, data) from None
    return data


def paid(failure: Failure, data: dict[str, Any]) -> Failure:
    """`failure`, judging an answer that came, with the answer's usage when it is readable: the answer was paid
    for whatever its verdict, and the pool counts it (a usage that is itself the failure carries nothing)."""
    usage = data.get("usage")
    if usage is None:
        return failure
    try:
        check_usage(usage)
    except Failure:
        return failure
    failure.usage = usage
    return failure


class StreamedAnswer:
    """A streamed answer put together from its events (`feed` the stream's bytes as they come, then `end`; or `take`
    each event's data), as the completion it stands for.

    Each chunk's choices are told apart by their `index` (a request with `n` above 1 streams its choices'
    deltas interleaved); a choice without one is the chunk's choice at its place. Per choice, deltas of
    content and reasoning_content are joined and tool calls put together by their index (ToolCallDeltas); a
    chunk without a delta (a last chunk with only a finish_reason) adds nothing. finish_reason, id, model and
    usage are taken as they come (usage from the last chunk that has one: Zhipu sends it with the
    finish_reason, OpenAI-style servers in a chunk of their own before
    [DONE], and only when stream_options.include_usage asks). An error event is judged by `codes`, the provider's.
    """

    def __init__(self, codes: BusinessCodes = ZHIPU_CODES, asked: int = 1) -> None:
        """`asked`: the choices the request asked for (its `n`)."""
        self.codes = codes
        self.asked = asked
        self.first_token_at: float | None = None
        self._events = EventStream()
        self.choices: dict[int, StreamedChoice] = {}
        self.top: dict[str, Any] = {}  # id, request_id, model, usage: the answer's own fields
        self.done = False  # [DONE] came
        self.events = 0

    @property
    def whole(self) -> bool:
        """[DONE] came, or every choice asked for came with its finish_reason: nothing is missing, however the stream
        ends."""
        return self.done or (len(self.choices) >= self.asked
                             and all(c.finish_reason is not None for c in self.choices.values()))

    def feed(self, piece: bytes) -> bool:
        """A piece of the stream's bytes, cut anywhere: the events it completes are taken. True once [DONE] came (what
        follows it is not read)."""
        for data in self._events.feed(piece):
            self.take(data)
            if self.done:
                return True
        return False

    def end(self) -> None:
        """The stream ended: the event it ended in, if all its lines came, is taken."""
        for data in self._events.end():
            self.take(data)

    def take(self, data: bytes) -> None:
        """One event's data: a chunk of the answer, or [DONE], its end."""
        if data.strip() == b"[DONE]":  # servers have sent it with a blank after it
            self.done = True
            return
        self.events += 1
        where = f"stream event {self.events}"
        try:
            chunk = json.loads(data)
        except ValueError:
            raise Failure("retry", "bad_response", f"HTTP 200 whose {where} is not JSON "
                                                   f"({data[:40].decode('utf-8', 'replace')!r})") from None
        if not isinstance(chunk, dict):
            raise _unfit(where, chunk, "a JSON object")
        error = chunk.get("error")
        if error is not None and not chunk.get("choices"):  # the server gave up mid-answer, as parse_body's 200s
            raise error_in_200(error, self.codes)
        for key in ("id", "request_id", "model", "usage"):
            if chunk.get(key) is not None:
                self.top[key] = chunk[key]
        choices = chunk.get("choices")
        if not choices:  # OpenAI's usage chunk has none
            return
        if not isinstance(choices, list):
            raise _unfit(f"{where}'s choices", choices, "a list")
        for place, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise _unfit(f"{where}'s choices[{place}]", choice, "an object")
            index = choice.get("index", place)
            if type(index) is not int or index < 0:  # type(): a bool is not an index
                raise _unfit(f"{where}'s choices[{place}].index", index, "a whole number of 0 or more")
            self._take_choice(self.choices.setdefault(index, StreamedChoice()), choice, f"{where}'s choices[{place}]")

    def _take_choice(self, streamed: StreamedChoice, choice: dict[str, Any], where: str) -> None:
        delta = choice.get("delta")
        if delta is None:
            delta = {}
        elif not isinstance(delta, dict):
            raise _unfit(f"{where}.delta", delta, "an object")
        for key, parts in (("content", streamed.content), ("reasoning_content", streamed.reasoning)):
            piece = delta.get(key)
            if piece is None:
                continue
            if not isinstance(piece, str):
                raise _unfit(f"{where}.delta.{key}", piece, "a string or null")
            if piece and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            parts.append(piece)
        if delta.get("tool_calls") is not None:
            streamed.tool_calls.take(delta["tool_calls"], f"{where}.delta.tool_calls")
            if delta["tool_calls"] and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
        if choice.get("finish_reason") is not None:
            streamed.finish_reason = choice["finish_reason"]

    def answer(self) -> dict[str, Any]:
        """The completion the events made up, checked as a non-streamed one (accepted); a Failure if it is cut short
        (the Failure carries the usage that came, if any: the answer was paid for)."""
        if not self.whole:
            missing = "a finish_reason" if len(self.choices) >= self.asked else \
                f"all {counted(self.asked, 'choice')} asked for (n; {len(self.choices)} came)"
            raise paid(Failure("retry", "bad_response", f"HTTP 200 whose stream ended after "
                                                        f"{counted(self.events, 'event')} without [DONE] or {missing}: "
                                                        "the answer may be cut short"), self.top)
        if not self.choices or any(c.finish_reason is None for c in self.choices.values()):
            raise paid(Failure("retry", "bad_response", "HTTP 200 whose stream ended without a finish_reason"),
                       self.top)
        choices = [{"index": index, "finish_reason": streamed.finish_reason, "message": streamed.message()}
                   for index, streamed in sorted(self.choices.items())]
        return accepted({**self.top, "choices": choices})


class StreamedChoice:
    """One choice of a streamed answer, as its deltas made it so far."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls = ToolCallDeltas()
        self.finish_reason: Any = None

    def message(self) -> dict[str, Any]:
        return {"role": "assistant", "content": "".join(self.content) if self.content else None,
                "reasoning_content": "".join(self.reasoning) if self.reasoning else None,
                "tool_calls": self.tool_calls.calls() or None}


class ToolCallDeltas:
    """A streamed answer's tool calls, put together from their deltas as the openai SDK does (its accumulate_delta):
    each delta names its call by `index`; text fields (the id, the function's name, its `arguments` fragments)
    are joined in order, objects merged, `index` and `type` taken as they come. Parallel calls may interleave.
    A delta without an index (a server that sends each call whole) is a new call when it brings an id not seen,
    else more of the last one."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}
        self._ids: set[str] = set()

    def take(self, deltas: Any, where: str) -> None:
        if not isinstance(deltas, list) or not all(isinstance(delta, dict) for delta in deltas):
            raise _unfit(where, deltas, "a list of objects")
        for delta in deltas:
            index, call_id = delta.get("index"), delta.get("id")
            if type(index) is not int:  # type(): a bool is not an index
                fresh = isinstance(call_id, str) and call_id not in self._ids
                index = len(self._calls) if fresh or not self._calls else max(self._calls)
            if isinstance(call_id, str):
                self._ids.add(call_id)
            self._calls[index] = _merged(self._calls.get(index, {}), delta)

    def calls(self) -> list[dict[str, Any]]:
        """The calls in index order, as a complete message's tool_calls (where a call's place is its index)."""
        return [{key: value for key, value in self._calls[index].items() if key != "index"}
                for index in sorted(self._calls)]


def _merged(whole: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    merged = dict(whole)
    for key, value in delta.items():
        before = merged.get(key)
        if before is None or key in ("index", "type"):
            merged[key] = value
        elif isinstance(before, str) and isinstance(value, str):
            merged[key] = before + value
        elif isinstance(before, dict) and isinstance(value, dict):
            merged[key] = _merged(before, value)
        elif value is not None:
            merged[key] = value
    return merged


def check_answer(data: dict[str, Any], maybe_surrogates: bool = True) -> None:
    """Raise a bad_response naming the first recorded field of an answer that does not have its documented type;
    mask the API key in its recorded texts, should the server repeat it (a substring test each).

    What is recorded must be writable: one odd value (a usage count sent as "3.5") would otherwise stop
    the checkpoint's writer for this run and every later one. A count sent as a string of digits ("3")
    is taken as that number: it is unambiguous, and the answer is paid for; refusing it would pay for
    the same request on every attempt and still fail the row. Plain isinstance checks: this runs per answer.
    """
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _unfit("choices", choices, "a non-empty list")
    for place, choice in enumerate(choices):  # every choice (n above 1), not only the one the row's columns show
        where = f"choices[{place}]"
        if not isinstance(choice, dict):
            raise _unfit(where, choice, "an object")
        message = choice.get("message")
        if not isinstance(message, dict):
            raise _unfit(f"{where}.message", message, "an object")
        _check_texts(choice, CHOICE_TEXT_FIELDS, f"{where}.", maybe_surrogates)
        _check_texts(message, MESSAGE_TEXT_FIELDS, f"{where}.message.", maybe_surrogates)
        if message.get("tool_calls") is not None:
            message["tool_calls"] = _checked_calls(message["tool_calls"], f"{where}.message.tool_calls",
                                                   maybe_surrogates)
    _check_texts(data, ANSWER_TEXT_FIELDS, "", maybe_surrogates)
    usage = data.get("usage")
    if usage is not None:
        check_usage(usage)


def _check_texts(owner: dict[str, Any], keys: tuple[str, ...], prefix: str, maybe_surrogates: bool) -> None:
    """Each of `owner`'s `keys` text or null, valid Unicode, with the key masked in it (`prefix`: where it sits)."""
    for key in keys:
        value = owner.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise _unfit(prefix + key, value, "a string or null")
        if maybe_surrogates:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _unfit(prefix + key, value, "valid Unicode text (it holds a lone surrogate)") from None
        if value:
            owner[key] = hide_secrets(value)


def check_usage(usage: Any) -> None:
    """Raise a bad_response naming the first field of an answer's usage that is not what it should be (a string of
    digits becomes its number, as _check_count says)."""
    if not isinstance(usage, dict):
        raise _unfit("usage", usage, "an object")
    for key in USAGE_COUNTS:
        _check_count(usage, key, "usage.")
    details = usage.get("prompt_tokens_details")
    if details is not None:
        if not isinstance(details, dict):
            raise _unfit("usage.prompt_tokens_details", details, "an object")
        _check_count(details, "cached_tokens", "usage.prompt_tokens_details.")


def _checked_calls(calls: Any, where: str, maybe_surrogates: bool) -> list[Any]:
    """message.tool_calls (at `where`), a list of objects, with the key masked in every text inside (a server may
    repeat it in a call's arguments); recorded as they came, whatever fields each call has."""
    if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
        raise _unfit(where, calls, "a list of objects")
    text = json.dumps(calls, ensure_ascii=False)
    if maybe_surrogates:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _unfit(where, calls, "valid Unicode text (it holds a lone surrogate)") from None
    masked = hide_secrets(text)
    return calls if masked == text else json.loads(masked)


def _check_count(owner: dict[str, Any], key: str, prefix: str) -> None:
    """A token count: absent, null, or a whole number from 0 (a string of digits becomes that number)."""
    value = owner.get(key)
    if value is None or (type(value) is int and 0 <= value <= MAX_TOKEN_COUNT):  # type(): a bool is not a count
        return
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        owner[key] = int(value)
        return
    raise _unfit(prefix + key, value, "a whole number of 0 or more")


def _unfit(field: str, value: Any, expected: str) -> Failure:
    if value is None:
        return Failure("retry", "bad_response", f"HTTP 200 without {field} ({expected})")
    shown = json.dumps(value, default=str)  # ASCII: a lone surrogate in it could not be written either
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return Failure("retry", "bad_response", f"HTTP 200 whose {field} is {shown}, not {expected}")


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
