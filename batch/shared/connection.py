"""The Redis server that holds the limits every process of an account shares: its URL (the password kept secret),
one client per process, the keys of one account, and the link's outages.

An outage never stops a run: the first failed call marks the link down (logged once), every user of it falls back to
its static share (batch/shared/leases.py, rates.py, spend.py say how), and a probe brings it back, first giving
Redis back what this process holds (a restarted Redis has lost it), then logging that it answers again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.exceptions
import redis.retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from batch.config import mask_url_password
from batch.errors import ConfigError, UnreachableError
from batch.logs import keep_secret

log = logging.getLogger("batch")

# What a call to Redis raises when the server is away, restarting or refuses (a full disk, a wrong password).
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)
# The head of every Lua script of batch's: `now` in ms, ARGV[1] (the tests' clock) or, when negative, Redis's own.
LUA_NOW = """
local now = tonumber(ARGV[1])
if now < 0 then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
"""
CONNECT_TIMEOUT_S = 2.0  # a server that does not take the connection in this long is away
CALL_TIMEOUT_S = 5.0  # a call that gets no answer in this long finds the server away
PROBE_S = 0.5  # how often a process looks again at a Redis that did not answer


def shown_url(url: str) -> str:
    """The URL as logs and errors show it: the password masked."""
    return mask_url_password(url)


def keep_password_secret(url: str) -> None:
    """Mask the URL's password from now on in every log line, error and summary, as the API key is."""
    password = urlsplit(url).password
    if password:
        keep_secret(password)


def check_reachable(url: str, where: str) -> None:
    """The server answers a PING within CONNECT_TIMEOUT_S (the preflight's check: a run sends nothing until its
    shared limits can be kept), else one line naming the key and the reason: a ConfigError when the server refused
    batch (a password, a command), an UnreachableError when it did not answer (a later run may find it up)."""
    keep_password_secret(url)
    client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S,
                                  retry=redis.retry.Retry(NoBackoff(), 0))
    try:
        client.ping()
    except (RedisError, OSError) as exc:
        refused = isinstance(exc, AuthenticationError | ResponseError)  # AuthenticationError is a ConnectionError
        silent = not refused and isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError
                                            | OSError)
        error = UnreachableError if silent else ConfigError
        what = "does not answer" if silent else "refused batch"
        raise error(f"{where}: limits.shared: the Redis server at {shown_url(url)} {what}: "
                    f"{mask_url_password(str(exc)) or type(exc).__name__}") from None
    finally:
        client.close()


def open_client(url: str) -> redis.asyncio.Redis:
    """The process's client. No retries of its own: a failed call is an outage, which Link handles."""
    return redis.asyncio.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CALL_TIMEOUT_S,
                                        retry=redis.asyncio.retry.Retry(NoBackoff(), 0))


def account_key(base_url: str, api_key: str, model: str) -> str:
    """The prefix of an account's keys: one per endpoint, key and model (Zhipu caps in-flight requests per model and
    account). A hash: the API key never reaches Redis."""
    digest = hashlib.sha256("\0".join((base_url, api_key, model)).encode()).hexdigest()[:24]
    return f"batch:{digest}"


def process_token() -> str:
    """This process among all that share the account: host, pid and a random part (pids repeat across hosts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Link:
    """Whether Redis answers. `lost` marks it down (one warning per outage); a probe every `probe_s` brings it back,
    running each `on_back` hook (what this process holds, given back to a Redis that may have restarted) before
    the link counts as up again."""

    def __init__(self, client: redis.asyncio.Redis, url: str, probe_s: float = PROBE_S,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.client = client
        self.shown = shown_url(url)
        self.down = False
        self.outages = 0
        self.on_back: list[Callable[[], Awaitable[object]]] = []
        self.moved = asyncio.Event()  # set at each change (down or up): waiters look again
        self._probe_s = probe_s
        self._sleep = sleep
        self._probing: asyncio.Task[None] | None = None

    def lost(self, exc: BaseException, fallback: str) -> None:
        """A call failed: the link is down until a probe gets an answer. `fallback` says what this process does
        meanwhile (logged with the first failure of the outage only)."""
        if self.down:
            return
        self.down = True
        self.outages += 1
        log.warning("the shared limits' Redis at %s does not answer (%s): %s, until it answers again", self.shown,
                    mask_url_password(str(exc)) or type(exc).__name__, fallback)
        self._changed()
        self._probing = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        while True:
            await self._sleep(self._probe_s)
            try:
                await self.client.ping()
                for hook in self.on_back:
                    await hook()
            except REDIS_ERRORS:
                continue
            break
        self.down = False
        self._probing = None
        log.warning("the shared limits' Redis at %s answers again: the limits are shared again", self.shown)
        self._changed()

    def _changed(self) -> None:
        self.moved.set()
        self.moved = asyncio.Event()

    async def close(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
            await asyncio.gather(self._probing, return_exceptions=True)
        await self.client.aclose()
