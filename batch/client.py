"""The HTTP client: one chat-completion POST, its answer as a dict or its failure classified.

Why aiohttp directly and not the openai SDK (measured by `make bench` on 2 cores, zero-latency
server, 256 in flight): the SDK on its default httpx transport costs about 2.7 ms of client CPU
per request, on its aiohttp transport 1.2 ms, and even its raw `post()` path 0.84 ms inside our
pipeline, where a bare aiohttp loop costs 0.15 ms. The SDK's per-request work (options models,
header merging, the httpx layer over aiohttp, response wrappers) is the cost, and nothing in it is
needed for one JSON POST whose failures we classify ourselves anyway (Zhipu's business codes, not
the SDK's classes, decide what is retried). Importing the SDK also costs about 0.8 s of CPU and
40 MB at every start. What the SDK would have given us is kept: Bearer auth, base_url joining,
the proxy named by the environment, a timeout per request and no hidden retries.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from batch.failures import RATE_LIMIT_CODES, ROW_CODES, Failure, classify_status, retry_after_seconds

USER_AGENT = "batch/0.1 (OpenAI-compatible chat completions)"


class ChatClient:
    """POSTs to `{base_url}/chat/completions` over one pooled aiohttp session."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float, max_connections: int) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                         "Accept": "application/json", "User-Agent": USER_AGENT}
        # One connection per request in flight: aiohttp's default pool of 100 would queue the rest
        # inside the client, where neither the limiter nor the timeout can see them.
        self._connector = aiohttp.TCPConnector(limit=max_connections)
        # The proxy is looked up once: aiohttp's trust_env re-reads the environment and parses
        # ~/.netrc in a thread for every request, which cost more CPU than the request itself.
        self._session = aiohttp.ClientSession(connector=self._connector, proxy=env_proxy(self.url),
                                              timeout=aiohttp.ClientTimeout(total=timeout_s))

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
                raw = await response.read()
                status, headers = response.status, response.headers
        except TimeoutError:  # aiohttp's connect and read timeouts are TimeoutError subclasses
            raise Failure("retry", "timeout", f"no answer within {self.timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:  # refused, reset, closed mid-answer, DNS
            detail = f"{type(exc).__name__}: {exc}"[:200]
            raise Failure("retry", "connection", f"connection error ({detail})") from None
        if status != 200:
            raise status_failure(status, raw, retry_after_seconds(headers))
        return parse_body(raw)


def env_proxy(url: str) -> str | None:
    """The proxy HTTPS_PROXY / HTTP_PROXY / ALL_PROXY name for `url`, unless NO_PROXY exempts its host."""
    parts = urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def status_failure(status: int, raw: bytes, retry_after: float | None) -> Failure:
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
    return classify_status(status, code, str(message)[:300], retry_after)


def parse_body(body: bytes) -> dict[str, Any]:
    """A 200's body as a completion, or the Failure it really is."""
    try:
        data = json.loads(body)
    except ValueError:
        raise Failure("retry", "bad_response", "HTTP 200 with a body that is not JSON") from None
    if not isinstance(data, dict):
        raise Failure("retry", "bad_response", "HTTP 200 with a body that is not a JSON object")
    error = data.get("error")
    if isinstance(error, dict) and not data.get("choices"):
        # Some gateways answer 200 with an error body; judge it by its business code.
        code = _int_or_none(error.get("code"))
        status = 429 if code in RATE_LIMIT_CODES else 400 if code in ROW_CODES else 500
        raise classify_status(status, code, str(error.get("message") or "")[:300])
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Failure("retry", "bad_response", "HTTP 200 without choices")
    if choices[0].get("finish_reason") == "network_error":
        raise Failure("retry", "server_error", "finish_reason network_error (model inference error)")
    return data


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
