"""What several test files share: the data folder, the output and checkpoint of a job, a run in its own process,
waiting for an observable condition, and checkpoint records built by hand. Fixtures live in conftest.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pandas as pd
import pyarrow.parquet as pq
from aiohttp import web

from batch.checkpoint.answered import Answered
from batch.checkpoint.writer import Checkpoint
from batch.input.reader import Row
from batch.records import failed_record

DATA = Path(__file__).resolve().parent.parent / "data"
ROWS = [{"review_id": f"r{i:03d}", "text": f"review {i}"} for i in range(40)]


def output_of(job: Path) -> pd.DataFrame:
    return pd.read_parquet(job.parent / "out" / "result.parquet")


def checkpoint_of(job: Path) -> Path:
    return job.parent / "out" / "result.checkpoint"


def summary_of(job: Path) -> dict:
    """The summary.json the last run left in the job's checkpoint."""
    return json.loads((checkpoint_of(job) / "summary.json").read_text())


def start_run(job: Path, *extra: str, **popen: object) -> subprocess.Popen[str]:
    """`batch run JOB` as a process of its own, so a test can signal or kill it."""
    return subprocess.Popen([sys.executable, "-m", "batch", "run", str(job), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)  # type: ignore[call-overload]


def interrupt(process: subprocess.Popen[str], signals: int) -> None:
    """Ctrl-C a run started by start_run `signals` times (1 or 2): the second once the run took the first (two at once
    may reach the process as one), so it stops at once."""
    process.send_signal(signal.SIGINT)
    if signals == 2:
        line = "-"
        while line and "taking no more rows" not in line:
            line = process.stderr.readline()
        assert line, "the run ended before it took the first signal"
        process.send_signal(signal.SIGINT)


class RedisServer:
    """A redis-server of the test's own on a free port of 127.0.0.1, keeping nothing on disk; `stop` and `start`
    again on the same port is a restart (its data lost, as a server without persistence loses it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--daemonize", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, f"redis-server on port {self.port}", timeout_s=10)

    def answers(self) -> bool:
        import redis

        assert self.process is not None and self.process.poll() is None, "redis-server exited"
        try:
            return self.client().ping()
        except redis.RedisError:
            return False

    def client(self):  # noqa: ANN201 - redis.Redis, imported here: only these tests need the client
        import redis

        return redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=2, decode_responses=True)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


class ForwardProxy:
    """A forwarding HTTP proxy on 127.0.0.1 in a thread of its own (no CONNECT: it forwards plain http:// requests,
    which a client sends it in absolute form), counting what it forwards: `requests` lists each one's method and
    URL. A request not in absolute form (sent to it as if it were the server) is answered 400. `hosts` maps a name
    only the proxy knows (a `.invalid` one, which no resolver answers) to the host it forwards to: a client can reach
    such a URL through the proxy alone."""

    HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
                  "transfer-encoding", "upgrade", "host", "content-length"}

    def __init__(self, hosts: dict[str, str] | None = None) -> None:
        self.hosts = hosts or {}
        self.requests: list[tuple[str, str]] = []
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def _forward(self, request: web.BaseRequest) -> web.StreamResponse:
        if not request.raw_path.startswith(("http://", "https://")):
            return web.Response(status=400, text="not a proxy request (absolute-form URL expected)")
        target = request.url
        self.requests.append((request.method, str(target)))
        target = target.with_host(self.hosts.get(target.host or "", target.host or ""))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self.HOP_BY_HOP}
        body = await request.read()
        assert self._session is not None
        async with self._session.request(request.method, target, headers=headers, data=body or None,
                                         allow_redirects=False) as upstream:
            answer = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in self.HOP_BY_HOP})
            await answer.prepare(request)
            async for chunk in upstream.content.iter_any():
                await answer.write(chunk)
            await answer.write_eof()
            return answer

    def start(self) -> str:
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()

            async def serve() -> web.ServerRunner:
                self._session = aiohttp.ClientSession(auto_decompress=False)
                runner = web.ServerRunner(web.Server(self._forward))
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
                return runner

            runner = loop.run_until_complete(serve())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(self._session.close())
            loop.close()

        self._session: aiohttp.ClientSession | None = None
        self._thread = threading.Thread(target=run, name="forward-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        return self.url

    def stop(self) -> None:
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._thread = None


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick for a socket bound to port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    """Poll an observable condition; fail naming `what` if it does not hold within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    """wait_until for a test on an event loop: poll `condition`, letting the loop run meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def answered(job: Path) -> int:
    """Results on disk: lines in the write-ahead log plus rows in part files."""
    folder = checkpoint_of(job)
    wal = folder / "wal.jsonl"
    lines = wal.read_text().count("\n") if wal.exists() else 0
    return lines + sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("part-*.parquet"))


def wait_for_answers(job: Path, count: int) -> None:
    wait_until(lambda: answered(job) >= count, f"{count} answers in the checkpoint")


def states(answered: Answered) -> dict[str, str | None]:
    """What a checkpoint holds per id, as a plain dict to compare."""
    return dict(zip(answered.ids.to_pylist(), answered.states.dictionary_decode().to_pylist()))


def opened(checkpoint: Checkpoint) -> Answered:
    checkpoint.open()
    return checkpoint.answered()


def record(i: int, status: str = "ok") -> dict:
    rec = failed_record(Row(i, f"id{i}", {}), "server_error", "boom", 1, "m")
    if status == "ok":
        rec.update(status="ok", response=f"answer {i}", error_class=None, error=None)
    return rec


def can_make_immutable(folder: Path) -> bool:
    """Whether `chattr +i` works here (root, and a file system that has the flag): a folder even root cannot write."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        return False
    probe = folder / "probe"
    probe.mkdir()
    made = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
    subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
    probe.rmdir()
    return made
