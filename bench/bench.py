"""`python -m bench [--quick]`: batch's CPU cost per request, and whether it keeps its rate
and concurrency promises and finds a server's unknown in-flight limit, measured against the local
simulator. A benchmark, not a test.

The simulator runs as a separate process so its CPU is never charged to a client, and each client
runs as its own process whose CPU is read from the kernel's rusage when it is reaped (os.wait4):
the figure is everything the process did, interpreter start and imports included, as a user pays.
Heavy imports (openai, pyarrow, yaml) sit inside functions: a bare client pays only for what it uses.

Memory and resume start use generated 100,000- and 1,000,000-row inputs, cached in out/bench-data/
(--data-dir) so a rerun skips generating them. No run sends a million requests (that is ~17 minutes
at ~1,000 req/s): each sends at most --limit rows, and the rows a resume finds answered are written
straight into the checkpoint as the part files a real run leaves (see fill_checkpoint).

The scale-out parts (shards, shard_memory, s3_parts) are in bench/shards.py; the table and the file it is written
to (--json; `make bench` writes bench/results.json, which the docs render) in bench/table.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.table import render

MODEL = "glm-4-flash"
SYSTEM = "You are a careful annotator."
TEMPLATE = "Classify the sentiment of this review as positive, negative or neutral: {text}"
PARAMS = {"temperature": 0.7, "max_tokens": 64}
CLIENTS = ("aiohttp", "openai-httpx", "openai-aiohttp")
IN_FLIGHT = 256
RPM = 1200
SLOTS = 64  # the concurrency-bound scenario: job concurrency == simulator --max-concurrency
CONCURRENCY_ROWS = 6400  # about a minute at 64 / 0.57 s; the drain's idle slots are under 2% of it
MEDIAN_S = 0.5  # simulator --latency-ms 500 (a lognormal's median), with its default --latency-sigma
# The adaptive limit: a server admitting CAP in flight (lognormal, median 300 ms), jobs allowed 2x and 4x that.
CAP = 16
CAP_MEDIAN_S = 0.3
ADAPTIVE_ROWS = 1200  # about 25 s per run at 16 / 0.34 s
ADAPTIVE_RETRY_AFTER_S = 1
REVIEW = "review {}: arrived on time, works as described, would buy again"
# Memory and resume start (full run; --quick divides every count by 10).
MEMORY_ROWS = (100_000, 1_000_000)
MEMORY_LIMIT = 20_000  # requests per memory run: the input is scanned whole, but 1M requests take ~17 min
MEMORY_CONCURRENCY = 256
RSS_TARGET_MB = 200.0
RSS_GROWTH_TARGET = 1.10  # the big input's peak RSS against the small one's
RESUME_DONE = 0.9  # the share of rows a resume finds already answered
RESUME_TARGET_S = 3.0
BATCH_API_ROWS = 1_000_000
BATCH_SUBMIT_TARGET_S = 60.0
PART_ROWS = 1000  # rows per checkpoint part, as a run writes them (output.checkpoint_rows' default)
DATA_VERSION = 2  # in the cached file names: bump when the generator changes
DATA_CHUNK_ROWS = 100_000  # rows generated and written at a time (so also the Parquet row group size)
EN = ("arrived on time", "works as described", "would buy again", "the battery lasts two days", "great value",
      "the strap broke after a week", "too small for me", "support answered quickly", "smells a bit odd",
      "colour as in the photos", "packaging was damaged", "easy to set up")
ZH = ("质量很好", "物流很快", "包装有点破损", "性价比很高", "客服态度不错", "颜色和图片不一样", "用了一周就坏了",
      "非常满意", "尺寸偏小", "下次还会再买", "说明书看不懂", "声音有点大")


def body(i: int) -> dict[str, Any]:
    # The same request the pipeline sends for row i, so every client moves the same payloads.
    user = TEMPLATE.format(text=REVIEW.format(i))
    return {"model": MODEL, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            **PARAMS}


# -- the bare clients (run in a child process: `--client NAME`) ---------------------------------
async def bare_client(name: str, url: str, n: int) -> dict[str, Any]:
    """n requests, IN_FLIGHT at a time; how many came back as completions and how long it took."""
    if name == "aiohttp":
        import aiohttp
        # aiohttp's default pool holds 100 connections; 256 in flight need 256 of them.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=IN_FLIGHT))
        close = session.close

        async def call(i: int) -> bool:
            async with session.post(url + "/chat/completions", json=body(i)) as resp:
                return resp.status == 200 and bool(json.loads(await resp.read()).get("choices"))
    else:
        import openai
        # What an SDK user writes: create() parsed into the pydantic model, SDK defaults otherwise
        # (httpx keeps only 100 idle connections, so at 256 in flight some are reopened: also a default).
        http = openai.DefaultAioHttpClient() if name == "openai-aiohttp" else None
        client = openai.AsyncOpenAI(api_key="bench", base_url=url, max_retries=0, http_client=http)
        close = client.close

        async def call(i: int) -> bool:
            completion = await client.chat.completions.create(**body(i))
            return bool(completion.choices)

    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int) -> bool:
        async with gate:
            try:
                return await call(i)
            except Exception:  # counted, not raised: a benchmark that stops at one error says little
                return False

    started = time.perf_counter()
    try:  # gather of n tasks waiting on a semaphore: the plainest correct loop, not a tuned one
        ok = sum(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        await close()
    return {"ok": ok, "wall_s": time.perf_counter() - started}


# -- processes -------------------------------------------------------------------------------------
# A small Python that spawns the command, reaps it and writes its rusage to a file. Linux carries a
# process's peak RSS across exec, and a child of this process (vfork + exec, as subprocess does)
# would report at least this process's own peak as its ru_maxrss: hundreds of MB once the memory
# inputs were generated. The launcher's grandchild starts from the launcher's ~10 MB instead.
LAUNCHER = """import json, os, sys, time
started = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
ended = time.perf_counter()
with open(sys.argv[1], "w") as out:
    json.dump({"started": started, "ended": ended, "status": status, "utime": usage.ru_utime,
               "stime": usage.ru_stime, "maxrss_kb": usage.ru_maxrss}, out)
"""


def measured(cmd: list[str], workdir: Path, label: str, timeout_s: float,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run cmd to its end (in `env`, or this process's environment): its exit code, stdout, wall time, the CPU the
    kernel charged to it, its peak RSS.

    started_at is time.perf_counter() when cmd was spawned (CLOCK_MONOTONIC: the same clock in every process).
    """
    out, err, usage = (workdir / f"{label}.{kind}" for kind in ("stdout", "stderr", "rusage"))
    usage.unlink(missing_ok=True)
    with open(out, "w") as stdout, open(err, "w") as stderr:
        # Its own session, so the watchdog and an interrupt can end the launcher and cmd together.
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(usage), *cmd], stdout=stdout,
                                stderr=stderr, start_new_session=True, env=env)

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    watchdog = threading.Timer(timeout_s, kill)  # a hung run must not hang the benchmark
    watchdog.start()
    try:  # wait4 on cmd itself (in the launcher), not RUSAGE_CHILDREN deltas: those would count any simulator too
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None or not usage.exists():  # interrupted (Ctrl-C), or killed: leave nothing running
            kill()
            proc.wait()
    if not usage.exists():
        raise RuntimeError(f"{label}: killed after {timeout_s:.0f} s: {err.read_text()[-500:]}")
    got = json.loads(usage.read_text())
    return {"exit": os.waitstatus_to_exitcode(got["status"]), "stdout": out.read_text(),
            "stderr_tail": err.read_text()[-2000:], "wall_s": got["ended"] - got["started"],
            "cpu_s": got["utime"] + got["stime"], "maxrss_kb": got["maxrss_kb"], "started_at": got["started"]}


@contextlib.contextmanager
def simulator(workdir: Path, label: str, *flags: str) -> Iterator[str]:
    """A simulator process on a free port (--port 0: the kernel picks, so no race); killed on exit."""
    with served(workdir, f"sim-{label}", [sys.executable, "-m", "batch.simulator", "--host", "127.0.0.1", "--port", "0",
                                         *flags], r"listening on (http://([\d.]+):(\d+)/v1)") as url:
        yield url


@contextlib.contextmanager
def served(workdir: Path, label: str, cmd: list[str], listening: str,
           env: dict[str, str] | None = None) -> Iterator[str]:
    """A server process started by `cmd` (in `env`), once its log (workdir/LABEL.log) shows `listening` (a pattern
    whose groups are its URL, host and port) and it accepts a connection; the URL. Stopped on exit."""
    log = workdir / f"{label}.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            found = re.search(listening, log.read_text())
            with contextlib.suppress(OSError):
                if found:  # printed after bind; a connection proves the server really accepts
                    socket.create_connection((found[2], int(found[3])), timeout=1).close()
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{label} did not start: {log.read_text()[-500:]}")
            time.sleep(0.05)
        yield found[1]
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sim_call(url: str, path: str, timeout_s: float = 10) -> dict[str, Any]:  # GET /_stats or POST /_reset
    data = b"" if path == "/_reset" else None  # urllib POSTs when there is a body
    with urllib.request.urlopen(url.removesuffix("/v1") + path, data=data, timeout=timeout_s) as response:
        return json.loads(response.read())


def write_job(workdir: Path, url: str, name: str, data: Path, id_column: str, limits: dict[str, Any],
              keep_columns: list[str] | None = None, retry: dict[str, Any] | None = None,
              stream: bool = False, output: dict[str, Any] | None = None, **extra: Any) -> tuple[Path, Path]:
    """A job file over `data` (output and checkpoint under workdir/out, or the output settings given); its path and
    its output's (the local one)."""
    import yaml

    local_output = workdir / "out" / f"{name}.parquet"
    job = {"name": name, "input": {"path": str(data.resolve()), "id_column": id_column},
           "prompt": {"system": SYSTEM, "template": TEMPLATE},
           "model": {"provider": "local", "name": MODEL, "base_url": url, "params": PARAMS, "stream": stream},
           "limits": {"timeout_s": 60, **limits}, "retry": retry or {"max_attempts": 3},
           "output": {"path": str(local_output), **({"keep_columns": keep_columns} if keep_columns else {}),
                      **(output or {})}, **extra}
    job_path = workdir / f"{name}.yaml"
    job_path.write_text(yaml.safe_dump(job, sort_keys=False, allow_unicode=True))
    return job_path, local_output


def run_job_file(workdir: Path, job_path: Path, output: Path, label: str, *flags: str,
                 timeout_s: float = 600, shard: str | None = None) -> dict[str, Any]:
    """`python -m batch run JOB [flags]` to its end: its process figures and summary.json. `shard` (K/N): run as
    the pod of an Indexed Job with that index (JOB_COMPLETION_INDEX), whose summary is in its shard's folder."""
    env = None
    summary = output.with_name(f"{output.stem}.checkpoint") / "summary.json"
    if shard is not None:
        from batch.shard import parse_shard

        chosen = parse_shard(shard)
        env = {**os.environ, "JOB_COMPLETION_INDEX": str(chosen.index)}
        summary = summary.parent / chosen.folder / summary.name
    result = measured([sys.executable, "-m", "batch", "run", str(job_path), *flags], workdir, f"batch-{label}",
                      timeout_s, env)
    if not summary.exists() or summary.stat().st_mtime < time.time() - result["wall_s"] - 1:
        raise RuntimeError(f"batch run {label} exited with {result['exit']} and no summary: {result['stderr_tail']}")
    return {**result, "summary": json.loads(summary.read_text()), "output": output}


def run_pipeline(workdir: Path, url: str, name: str, rows: int, limits: dict[str, Any],
                 retry: dict[str, Any] | None = None, stream: bool = False) -> dict[str, Any]:
    """`python -m batch run` on a fresh `rows`-row Parquet input; its process figures and summary.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = workdir / f"{name}.parquet"
    pq.write_table(pa.table({"review_id": [f"r{i:07d}" for i in range(rows)],
                             "text": [REVIEW.format(i) for i in range(rows)]}), data)
    job_path, output = write_job(workdir, url, name, data, "review_id", limits, retry=retry, stream=stream)
    return run_job_file(workdir, job_path, output, name)


# -- the three scenarios ---------------------------------------------------------------------------
def overhead(workdir: Path, n: int) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    outputs: dict[str, Path] = {}
    with simulator(workdir, "overhead") as url:
        for name in (*CLIENTS, "batch", "batch-stream"):
            # Start-up alone (interpreter + imports; for batch, a run of a job file that does not exist),
            # to show the cost per request net of it too: at 2,000 requests batch's ~1 s of imports dominates.
            bare = [sys.executable, "-m", "bench", "--client", name, "--url", url, "-n"]
            batch = name.startswith("batch")
            idle = [*bare, "0"] if not batch else [sys.executable, "-m", "batch", "run", str(workdir / "no.yaml")]
            startup = measured(idle, workdir, f"{name}-startup", 60)["cpu_s"]
            sim_call(url, "/_reset")  # per-client status counts
            if batch:  # streamed: the same rows and answers, read as server-sent events
                run = run_pipeline(workdir, url, name, n, {"concurrency": IN_FLIGHT}, stream=name == "batch-stream")
                ok, wall = run["summary"]["run"]["ok"], run["summary"]["run"]["wall_s"]  # the request phase
                outputs[name] = run["output"]
            else:
                run = measured([*bare, str(n)], workdir, name, 600)
                if run["exit"] != 0:
                    raise RuntimeError(f"client {name} exited with {run['exit']}: {run['stderr_tail']}")
                got = json.loads(run["stdout"].splitlines()[-1])
                ok, wall = got["ok"], got["wall_s"]
            results[name] = {"ok": ok, "cpu_s": run["cpu_s"], "cpu_ms_per_req": 1000 * run["cpu_s"] / n,
                             "startup_cpu_s": startup, "net_cpu_ms_per_req": 1000 * (run["cpu_s"] - startup) / n,
                             "req_per_s": n / wall, "process_wall_s": run["wall_s"],
                             "by_status": sim_call(url, "/_stats")["by_status"]}
    results["batch-stream"].update(same_answers(outputs["batch"], outputs["batch-stream"]))
    return results


def same_answers(plain: Path, streamed: Path) -> dict[str, Any]:
    """Whether a streamed run's answers and usage are the plain run's, and how long its answers are."""
    import pyarrow.parquet as pq

    columns = ["review_id", "status", "response", "finish_reason", "prompt_tokens", "completion_tokens"]
    first, second = (pq.read_table(path, columns=columns).sort_by("review_id") for path in (plain, streamed))
    lengths = [len(text or "") for text in second.column("response").to_pylist()]
    return {"same_answers": first.equals(second), "mean_answer_chars": sum(lengths) / max(1, len(lengths))}


def rate(workdir: Path, rows: int) -> dict[str, Any]:
    with simulator(workdir, "rate", "--rpm", str(RPM)) as url:
        run = run_pipeline(workdir, url, "rate", rows, {"concurrency": SLOTS, "requests_per_minute": RPM})
        stats = sim_call(url, "/_stats")
    s = run["summary"]["run"]
    per_min = 60 * (s["ok"] + s["failed"]) / s["wall_s"]
    return {"rows": rows, "ok": s["ok"], "wall_s": s["wall_s"], "rows_per_min": per_min,
            "deviation": per_min / RPM - 1, "requests": stats["requests"], "n_429": stats["by_status"].get("429", 0)}


def concurrency(workdir: Path, rows: int) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from batch.simulator import SimConfig  # its default latency_sigma is what the server draws with

    flags = ("--latency-ms", str(MEDIAN_S * 1000), "--latency-dist", "lognormal", "--max-concurrency", str(SLOTS))
    with simulator(workdir, "concurrency", *flags) as url:
        run = run_pipeline(workdir, url, "concurrency", rows, {"concurrency": SLOTS})
        stats = sim_call(url, "/_stats")
    s = run["summary"]["run"]
    # Latencies as the client saw them (spec: measured beats the model's mean, which a few hundred
    # draws miss by a few percent), in row order, which is the order rows are sent in.
    latency = [x for x in pq.read_table(run["output"], columns=["latency_s"]).column(0).to_pylist() if x]
    mean = sum(latency) / len(latency)
    throughput = s["ok"] / s["wall_s"]
    # Even a perfect client idles slots while the last wave drains: a zero-overhead greedy 64-slot
    # schedule of these lognormal draws reaches 0.85-0.94 of 64/mean at 1,280 rows and 0.98 at 6,400
    # (5 seeds each), so the full run sends 6,400 rows and the table also compares with that schedule.
    slots = [0.0] * SLOTS
    for x in latency:
        heapq.heapreplace(slots, slots[0] + x)
    return {"rows": rows, "ok": s["ok"], "wall_s": s["wall_s"], "rows_per_s": throughput,
            "mean_latency_s": mean, "model_mean_latency_s": MEDIAN_S * math.exp(SimConfig().latency_sigma ** 2 / 2),
            "efficiency": throughput / (SLOTS / mean), "ideal_wall_s": max(slots),
            "vs_ideal": max(slots) / s["wall_s"], "n_429": stats["by_status"].get("429", 0)}


def adaptive(workdir: Path, rows: int) -> list[dict[str, Any]]:
    """Jobs allowed 2x and 4x a server's in-flight limit (with and without Retry-After): how much of the server's
    capacity they use, and how many of their requests it refuses."""
    import pyarrow.parquet as pq

    results = []
    for concurrency in (2 * CAP, 4 * CAP):
        for retry_after in (None, ADAPTIVE_RETRY_AFTER_S):
            flags = ["--latency-ms", str(CAP_MEDIAN_S * 1000), "--latency-dist", "lognormal",
                     "--max-concurrency", str(CAP)]
            if retry_after is not None:
                flags += ["--retry-after", str(retry_after)]
            name = f"adaptive-{concurrency}-{'ra' if retry_after else 'nora'}"
            with simulator(workdir, name, *flags) as url:
                # The default retries (6 attempts from 1 s): a refused row waits its backoff, holding no slot.
                run = run_pipeline(workdir, url, name, rows, {"concurrency": concurrency}, retry={"max_attempts": 6})
                stats = sim_call(url, "/_stats")
            s = run["summary"]["run"]
            latency = [x for x in pq.read_table(run["output"], columns=["latency_s"]).column(0).to_pylist() if x]
            mean = sum(latency) / len(latency)
            n_429 = stats["by_status"].get("429", 0)
            results.append({"concurrency": concurrency, "retry_after": retry_after, "rows": rows, "ok": s["ok"],
                            "wall_s": s["wall_s"], "rows_per_s": s["ok"] / s["wall_s"], "mean_latency_s": mean,
                            "efficiency": s["ok"] / s["wall_s"] / (CAP / mean), "requests": stats["requests"],
                            "n_429": n_429, "share_429": n_429 / stats["requests"],
                            "limit_end": s["concurrency_limit_end"], "max_in_flight": stats["max_in_flight"]})
    return results


def adaptive_rows(runs: list[dict[str, Any]]) -> list[tuple[str, str, str, bool | None]]:
    return [(f"adaptive: concurrency {a['concurrency']} vs a server limit of {CAP}, "
             + (f"Retry-After {a['retry_after']:g} s" if a["retry_after"] is not None else "no Retry-After")
             + f" ({a['rows']} rows): rows/s / ({CAP} / mean latency); share of requests answered 429",
             f"{a['efficiency']:.3f} ({a['rows_per_s']:.1f} rows/s, mean latency {a['mean_latency_s'] * 1000:.0f} ms, "
             f"{a['wall_s']:.1f} s); {a['share_429']:.1%} ({a['n_429']} of {a['requests']}; limit at end "
             f"{a['limit_end']:g})", ">= 0.90; <= 5%",
             a["efficiency"] >= 0.90 and a["share_429"] <= 0.05 and a["ok"] == a["rows"])
            for a in runs]


# -- memory and resume start -------------------------------------------------------------------------
def row_id(i: int) -> str:
    return f"r{i + 1:07d}"  # row 0 is "r0000001"


def review_text(rng: random.Random, i: int) -> str:
    """40 to 80 characters of English and Chinese review phrases, unique by their row number.

    Unique because batch sends identical requests once (its answer cache): every row must cost a request.
    """
    size = rng.randint(40, 80)
    pieces = [f"#{i + 1}"]
    while sum(len(p) + 1 for p in pieces) <= size:
        pieces.append(rng.choice(ZH if rng.random() < 0.5 else EN))
    text = " ".join(pieces)[:size]
    return text[:-1] + "." if text.endswith(" ") else text


def data_chunk(start: int, stop: int) -> Any:  # pa.Table
    import pyarrow as pa

    # Seeded by the chunk's first row: every generated file agrees with every other row for row.
    rng = random.Random(f"batch-bench-{start}")
    return pa.table({"id": [row_id(i) for i in range(start, stop)],
                     "text": [review_text(rng, i) for i in range(start, stop)]})


def bench_inputs(folder: Path, rows: int, chunk_rows: int = DATA_CHUNK_ROWS,
                 formats: tuple[str, ...] = ("parquet", "csv")) -> dict[str, Path]:
    """A `rows`-row input in each of `formats` (Parquet, CSV; columns id, text), generated `chunk_rows` at a time
    unless cached."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    paths = {fmt: folder / f"reviews-v{DATA_VERSION}-{rows}.{fmt}" for fmt in formats}
    missing = {fmt: path for fmt, path in paths.items() if not path.exists()}
    if not missing:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    tmps = {fmt: path.with_name(f".{path.name}.tmp") for fmt, path in missing.items()}
    writers: dict[str, Any] = {}
    try:
        for start in range(0, rows, chunk_rows):
            chunk = data_chunk(start, min(rows, start + chunk_rows))
            for fmt, tmp in tmps.items():
                if fmt not in writers:
                    writers[fmt] = (pq.ParquetWriter if fmt == "parquet" else pacsv.CSVWriter)(tmp, chunk.schema)
                writers[fmt].write_table(chunk)
        while writers:
            fmt, writer = writers.popitem()
            writer.close()
            os.replace(tmps[fmt], missing[fmt])  # a generation cut short never looks cached
    finally:
        for writer in writers.values():
            writer.close()
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    return paths


def fill_checkpoint(folder: Path, start: int, stop: int, ids: Sequence[str] | None = None) -> int:
    """Answers for rows start..stop-1 written straight into a checkpoint folder, as a run leaves them.

    A run compacts its log into a part file every PART_ROWS answers and merges parts only when it
    ends, so a long run that was killed leaves one PART_ROWS-row Parquet file per PART_ROWS answers
    (batch.records.RECORD_SCHEMA): the worst case for a resume. These are the same: the ids the
    reader yields, status ok, and the other fields copied from the folder's first real answer when
    there is one (the simulator's, so the sizes match), else from a made-up answer (answer_record).
    Resuming reads only these files, so its cost is a real resume's. Row i's id is `ids[i]` (a shard's rows, which
    it numbers from 0 in input order), else the generated input's row_id(i). Returns the number of parts written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch.input.reader import Row
    from batch.records import RECORD_SCHEMA, answer_record

    folder.mkdir(parents=True, exist_ok=True)
    parts = sorted(folder.glob("part-*.parquet"))
    number = int(parts[-1].stem.split("-")[1]) if parts else 0
    real = pq.read_table(parts[0], schema=RECORD_SCHEMA).slice(0, 1).to_pylist() if parts else []
    made_up = {"choices": [{"message": {"content": ""}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 48, "completion_tokens": 17, "total_tokens": 65}}
    model = {**(real[0] if real else answer_record(Row(0, "", {}), made_up, 0.05, 1, None, MODEL)),
             # Unknown, as in a checkpoint from before prompt hashes: taken as unchanged, compared at the same cost.
             "prompt_hash": None}
    written = 0
    for lo in range(start, stop, PART_ROWS):
        seqs = range(lo, min(stop, lo + PART_ROWS))
        varying = {"id": list(ids[seqs.start:seqs.stop]) if ids is not None else [row_id(i) for i in seqs],
                   "seq": list(seqs),
                   # the simulator's answer: "[model] reply <10 hex> to: <first 32 characters of the prompt>"
                   "response": [f"[{MODEL}] reply {i:010x} to: {TEMPLATE[:32]}" for i in seqs],
                   "request_id": [f"chatcmpl-{i:012x}" for i in seqs]}
        columns = {name: varying.get(name) or [model[name]] * len(seqs) for name in RECORD_SCHEMA.names}
        number += 1
        pq.write_table(pa.table(columns, schema=RECORD_SCHEMA), folder / f"part-{number:06d}.parquet")
        written += 1
    return written


class FirstRequest(threading.Thread):
    """Polls the simulator's request counter (reset first) every 5 ms; notes when it first moves."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.seen_at: float | None = None
        self.done = threading.Event()
        sim_call(url, "/_reset")

    def run(self) -> None:
        while not self.done.is_set():
            with contextlib.suppress(OSError, ValueError):
                if sim_call(self.url, "/_stats")["requests"] > 0:
                    self.seen_at = time.perf_counter()
                    return
            self.done.wait(0.005)

    def stop(self) -> None:
        self.done.set()
        self.join()


def memory_run(workdir: Path, url: str, job: tuple[Path, Path], label: str, *flags: str,
               watch: bool = True, shard: str | None = None) -> dict[str, Any]:
    """One run: peak RSS, wall time, time to its first request, and what it did (from summary.json)."""
    first = FirstRequest(url)  # resets the simulator's counters either way
    if watch:  # not for a run that sends nothing: 200 polls a second would tax its CPU throughout
        first.start()
    try:
        run = run_job_file(workdir, *job, label, *flags, shard=shard)
    finally:
        if watch:
            first.stop()
    if run["exit"] != 0:
        raise RuntimeError(f"batch run {label} exited with {run['exit']}: {run['stderr_tail']}")
    s = run["summary"]
    return {"rss_mb": run["maxrss_kb"] / 1024, "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
            "first_request_s": None if first.seen_at is None else first.seen_at - run["started_at"],
            "requests": sim_call(url, "/_stats")["requests"], "rows_total": s["rows_total"], "sent": s["run"]["ok"],
            "failed": s["run"]["failed"], "skipped": s["run"]["skipped"], "totals": s["job_totals"],
            "output": s["output"]}


def startup_rss_mb(workdir: Path, label: str) -> float:
    """The peak RSS of the interpreter and batch's imports alone (a run of a job file that does not exist): the
    floor under every memory figure."""
    return measured([sys.executable, "-m", "batch", "run", str(workdir / "no.yaml")], workdir, label,
                    60)["maxrss_kb"] / 1024


def memory(workdir: Path, data_dir: Path, sizes: tuple[int, ...], limit: int) -> dict[str, Any]:
    """Scenario 4 and 5 for each input size.

    csv / parquet: a fresh run over the whole input, `--limit` requests (scan, reader, pool, checkpoint).
    resume: the Parquet job with RESUME_DONE of its rows answered; it sends `--limit` more.
    complete: the same job with every row answered: no request, the final output written.
    """
    import pyarrow.parquet as pq

    generating = time.perf_counter()
    inputs = {rows: bench_inputs(data_dir, rows) for rows in sizes}
    results: dict[str, Any] = {"generate_s": time.perf_counter() - generating, "limit": limit,
                               "data": {rows: {k: str(v) for k, v in p.items()} for rows, p in inputs.items()}}
    with simulator(workdir, "memory") as url:
        results["startup_rss_mb"] = startup_rss_mb(workdir, "memory-startup")
        limits = {"concurrency": MEMORY_CONCURRENCY}
        for rows in sizes:
            for fmt in ("csv", "parquet"):
                job = write_job(workdir, url, f"{fmt}-{rows}", inputs[rows][fmt], "id", limits, ["text"])
                got = results[f"{fmt}-{rows}"] = memory_run(workdir, url, job, f"{fmt}-{rows}", "--limit", str(limit))
                if got["sent"] != limit or got["requests"] != limit:
                    raise RuntimeError(f"{fmt}-{rows}: expected {limit} answers, got {got}")
            # The Parquet job's checkpoint now holds rows 0..limit-1 (real answers): fill it up to RESUME_DONE.
            folder = job[1].with_name(f"{job[1].stem}.checkpoint")
            done = int(rows * RESUME_DONE)
            resume_limit = min(limit, (rows - done) // 2)
            filled = fill_checkpoint(folder, limit, done)
            got = results[f"resume-{rows}"] = memory_run(workdir, url, job, f"resume-{rows}",
                                                         "--limit", str(resume_limit))
            got.update(checkpointed=done, real_answers=limit, parts_written=filled, resume_limit=resume_limit)
            if got["skipped"] != done or got["sent"] != resume_limit:
                raise RuntimeError(f"resume-{rows}: expected {done} skipped and {resume_limit} sent, got {got}")
            fill_checkpoint(folder, done + resume_limit, rows)
            got = results[f"complete-{rows}"] = memory_run(workdir, url, job, f"complete-{rows}", watch=False)
            if got["requests"] != 0 or got["totals"]["pending"] != 0 or got["output"] is None:
                raise RuntimeError(f"complete-{rows}: expected no request and an output, got {got}")
            got["output_rows"] = pq.ParquetFile(got["output"]).metadata.num_rows
            if got["output_rows"] != rows:
                raise RuntimeError(f"complete-{rows}: the output has {got['output_rows']} rows, not {rows}")
    return results


def batch_api(workdir: Path, data_dir: Path, rows: int) -> dict[str, Any]:
    """A `rows`-row job submitted through the Batch API: one run that builds, uploads and creates every file and
    exits 6 (the simulator's batch clock stands still, so nothing is answered and its CPU stays out of the way)."""
    data = bench_inputs(data_dir, rows)["parquet"]
    with simulator(workdir, "batch-api", "--batch-speed", "0") as url:
        job = write_job(workdir, url, f"batch-api-{rows}", data, "id", {}, mode="batch_api")
        run = run_job_file(workdir, *job, f"batch-api-{rows}", timeout_s=1200)
        # Every custom_id submitted, in one answer: tens of MB of JSON, which took over 10 s at a load average of 19.
        stats = sim_call(url, "/_stats", timeout_s=300)["batch_api"]
    submitted = len(stats["custom_ids"])
    if run["exit"] != 6 or submitted != rows or stats["custom_ids_submitted_twice"]:
        raise RuntimeError(f"batch-api-{rows}: exit {run['exit']}, {submitted} custom_ids submitted, "
                           f"{len(stats['custom_ids_submitted_twice'])} twice: {run['stderr_tail']}")
    return {"rows": rows, "rss_mb": run["maxrss_kb"] / 1024, "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
            "files": stats["batches_created"], "submitted": submitted}


def batch_api_rows(b: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    what = f"{b['rows']:,}-row submission, {b['files']} files of <= 50,000 requests"
    return [(f"batch_api: peak RSS, {what}", f"{b['rss_mb']:.0f} MB", f"<= {RSS_TARGET_MB:.0f} MB",
             b["rss_mb"] <= RSS_TARGET_MB),
            (f"batch_api: client time to submit every file ({what}; start-up and input scan included)",
             f"{b['wall_s']:.1f} s ({b['cpu_s']:.1f} s CPU)", f"<= {BATCH_SUBMIT_TARGET_S:.0f} s",
             b["wall_s"] <= BATCH_SUBMIT_TARGET_S)]


# -- the table -------------------------------------------------------------------------------------
PARTS = ("overhead", "rate", "concurrency", "adaptive", "memory", "batch_api", "shards", "shard_memory", "s3_parts")


def table_rows(over: dict[str, Any] | None, rate_: dict[str, Any] | None, c: dict[str, Any] | None, n: int,
               mem: dict[str, Any] | None = None, adapt: list[dict[str, Any]] | None = None,
               batch: dict[str, Any] | None = None, *, shards: dict[str, Any] | None = None,
               shard_memory: dict[str, Any] | None = None,
               s3_parts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The table's rows for the parts that were measured (None: a part left out with --only)."""
    from bench import shards as scale_out  # imported here: a bare client's process never loads it

    rows: list[tuple[str, str, str, bool | None]] = []
    if over is not None:
        rows += overhead_rows(over, n)
    if rate_ is not None:
        rows += [
            (f"rate: achieved rows/min ({rate_['rows']} rows, {rate_['wall_s']:.1f} s)",
             f"{rate_['rows_per_min']:,.0f} ({rate_['deviation']:+.1%})", f"{RPM:,} +/- 3%",
             abs(rate_["deviation"]) <= 0.03),
            (f"rate: 429s from simulator ({rate_['requests']} requests, {rate_['ok']} rows ok)", str(rate_["n_429"]),
             "0", rate_["n_429"] == 0),
        ]
    if c is not None:
        rows += [
            (f"concurrency: rows/s / ({SLOTS} / mean latency) ({c['rows']} rows)",
             f"{c['efficiency']:.3f} ({c['rows_per_s']:.1f} rows/s, mean latency {c['mean_latency_s'] * 1000:.0f} ms, "
             f"model {c['model_mean_latency_s'] * 1000:.0f} ms, {c['n_429']} 429s)", ">= 0.95",
             c["efficiency"] >= 0.95),
            (f"concurrency: ideal {SLOTS}-slot wall time for these latencies / wall time",
             f"{c['vs_ideal']:.3f} ({c['ideal_wall_s']:.2f} s / {c['wall_s']:.2f} s)", ">= 0.95",
             c["vs_ideal"] >= 0.95),
        ]
    if adapt is not None:
        rows += adaptive_rows(adapt)
    if mem is not None:
        rows += memory_rows(mem)
    if batch is not None:
        rows += batch_api_rows(batch)
    if shards is not None:
        rows += scale_out.shards_rows(shards)
    if shard_memory is not None:
        rows += scale_out.shard_memory_rows(shard_memory)
    if s3_parts is not None:
        rows += scale_out.s3_parts_rows(s3_parts)
    return [dict(zip(("metric", "value", "target", "met"), row)) for row in rows]


def overhead_rows(over: dict[str, Any], n: int) -> list[tuple[str, str, str, bool | None]]:
    base, ours = over["aiohttp"], over["batch"]
    rows: list[tuple[str, str, str, bool | None]] = [(
        f"overhead {name}: CPU ms/req ({n:,} req, {IN_FLIGHT} in flight)",
        f"{r['cpu_ms_per_req']:.3f} ms ({r['net_cpu_ms_per_req']:.3f} net of {r['startup_cpu_s']:.2f} s start-up; "
        f"{r['cpu_s']:.2f} s CPU, {r['req_per_s']:,.0f} req/s, {n - r['ok']} errors)", "", None)
        for name, r in over.items()]
    ratio = ours["cpu_ms_per_req"] / base["cpu_ms_per_req"]
    net = ours["net_cpu_ms_per_req"] / base["net_cpu_ms_per_req"]
    streamed = over.get("batch-stream")
    if streamed is not None:
        chunks = math.ceil(streamed["mean_answer_chars"] / 16)
        stream_ratio = streamed["cpu_ms_per_req"] / ours["cpu_ms_per_req"]
        stream_net = streamed["net_cpu_ms_per_req"] / ours["net_cpu_ms_per_req"]
        rows.append((f"overhead: batch streamed CPU / not streamed ({chunks} text chunks + 3 events per answer)",
                     f"{stream_ratio:.2f}x ({stream_net:.2f}x net of start-up), "
                     f"{'same' if streamed['same_answers'] else 'DIFFERENT'} answers and usage", "<= 2x, same",
                     stream_ratio <= 2 and streamed["same_answers"] and streamed["ok"] == n))
    return rows + [
        ("overhead: batch CPU / bare aiohttp CPU", f"{ratio:.2f}x ({net:.2f}x net of start-up)", "<= 2.5x",
         ratio <= 2.5),
        ("overhead: batch requests/s", f"{ours['req_per_s']:,.0f}", ">= 2,000",
         ours["req_per_s"] >= 2000 and ours["ok"] == n),
    ]


def memory_sizes(mem: dict[str, Any]) -> tuple[int, int]:
    sizes = sorted(int(k.split("-")[1]) for k in mem if k.startswith("complete-"))
    return sizes[0], sizes[-1]


def memory_rows(mem: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    small, big = memory_sizes(mem)
    limit, resume = mem["limit"], mem[f"resume-{big}"]
    kinds = {"parquet": f"Parquet, fresh, --limit {limit:,}", "csv": f"CSV, fresh, --limit {limit:,}",
             "resume": f"Parquet, resume of {resume['checkpointed']:,} answered, --limit {resume['resume_limit']:,}",
             "complete": "Parquet, all answered: no request, final output written"}
    rows: list[tuple[str, str, str, bool | None]] = []
    for kind, what in kinds.items():
        b, s = mem[f"{kind}-{big}"], mem[f"{kind}-{small}"]
        growth = b["rss_mb"] / s["rss_mb"]
        rows.append((f"memory: peak RSS, {what} ({big:,} rows; x of {small:,} rows)",
                     f"{b['rss_mb']:.0f} MB ({growth:.2f}x of {s['rss_mb']:.0f} MB); wall {b['wall_s']:.1f} s "
                     f"({s['wall_s']:.1f} s)", f"<= {RSS_TARGET_MB:.0f} MB, <= {RSS_GROWTH_TARGET:.2f}x",
                     b["rss_mb"] <= RSS_TARGET_MB and growth <= RSS_GROWTH_TARGET))
    first, fresh = resume["first_request_s"], mem[f"parquet-{big}"]["first_request_s"]
    small_first = mem[f"resume-{small}"]["first_request_s"]
    rows.append((f"resume: process start to first request ({big:,} rows, {resume['checkpointed']:,} answered)",
                 f"{_seconds(first)} ({small:,} rows: {_seconds(small_first)}; fresh {big:,}-row run: "
                 f"{_seconds(fresh)})", f"<= {RESUME_TARGET_S:g} s", first is not None and first <= RESUME_TARGET_S))
    return rows


def memory_note(mem: dict[str, Any]) -> str:
    small, big = memory_sizes(mem)
    r = mem[f"resume-{big}"]
    done, limit = r["checkpointed"], r["real_answers"]
    return (f"memory/resume: inputs id + text (40-80 chars, English and Chinese), {MEMORY_CONCURRENCY} in flight, "
            f"zero-latency simulator, keep_columns [text]; {mem['startup_rss_mb']:.0f} MB of it is interpreter and "
            f"imports. The resume checkpoint ({big:,} rows): rows 1-{limit:,} answered by the real fresh Parquet run "
            f"(--limit {limit:,}), rows {limit + 1:,}-{done:,} written directly as {r['parts_written']} part files of "
            f"{PART_ROWS:,} rows (RECORD_SCHEMA, status ok: the files a real run leaves), not sent; the complete "
            f"run's remaining rows were written the same way.")


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests: about a minute in all")
    parser.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)  # internal: one bare client
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, help="overhead requests (default 20,000; --quick 2,000)")
    parser.add_argument("--json", type=Path, default=Path("out/bench.json"),
                        help="where the results go as JSON: the table, its notes, every figure, the date, commit and "
                             "machine (make bench: bench/results.json)")
    parser.add_argument("--data-dir", type=Path, default=Path("out/bench-data"),
                        help="where the generated memory inputs are cached (default out/bench-data)")
    parser.add_argument("--only", type=_parts, default=PARTS, metavar="PARTS",
                        help=f"comma-separated parts to measure (default all: {','.join(PARTS)})")
    args = parser.parse_args(argv)
    if args.client:
        print(json.dumps(asyncio.run(bare_client(args.client, args.url, args.n))))
        return 0
    n = args.n or (2000 if args.quick else 20000)
    started, load_before = time.perf_counter(), os.getloadavg()
    got: dict[str, Any] = dict.fromkeys(PARTS)
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        if "overhead" in args.only:
            print(f"bench: overhead ({n:,} requests per client) ...", file=sys.stderr, flush=True)
            got["overhead"] = overhead(Path(tmp), n)
        if "rate" in args.only:
            print("bench: rate ...", file=sys.stderr, flush=True)
            got["rate"] = rate(Path(tmp), 200 if args.quick else 600)
        if "concurrency" in args.only:
            print("bench: concurrency ...", file=sys.stderr, flush=True)
            got["concurrency"] = concurrency(Path(tmp), 1280 if args.quick else CONCURRENCY_ROWS)
        if "adaptive" in args.only:
            print("bench: adaptive ...", file=sys.stderr, flush=True)
            got["adaptive"] = adaptive(Path(tmp), 400 if args.quick else ADAPTIVE_ROWS)
        if "memory" in args.only:
            scale = 10 if args.quick else 1
            sizes = tuple(rows // scale for rows in MEMORY_ROWS)
            print(f"bench: memory and resume start ({' and '.join(f'{r:,}' for r in sizes)} rows) ...",
                  file=sys.stderr, flush=True)
            got["memory"] = memory(Path(tmp), args.data_dir, sizes, MEMORY_LIMIT // scale)
        if "batch_api" in args.only:
            batch_rows = BATCH_API_ROWS // (10 if args.quick else 1)
            print(f"bench: Batch API submission ({batch_rows:,} rows) ...", file=sys.stderr, flush=True)
            got["batch_api"] = batch_api(Path(tmp), args.data_dir, batch_rows)
        scale_out_parts(Path(tmp), args, got)
    rows = table_rows(got["overhead"], got["rate"], got["concurrency"], n, got["memory"], got["adaptive"],
                      got["batch_api"], shards=got["shards"], shard_memory=got["shard_memory"],
                      s3_parts=got["s3_parts"])
    notes = [memory_note(got["memory"])] if got["memory"] else []
    if got["shard_memory"]:
        from bench.shards import shard_memory_note

        notes.append(shard_memory_note(got["shard_memory"]))
    wall_s = time.perf_counter() - started
    print("\n".join([render(rows), *notes, f"({'quick' if args.quick else 'full'} run of {','.join(args.only)}, "
                     f"{wall_s:.0f} s, {os.cpu_count()} CPUs)"]))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **checkout(),
               "machine": machine(load_before),
               "mode": "quick" if args.quick else "full", "parts": list(args.only), "wall_s": round(wall_s, 1),
               "requests": n, "table": rows, "notes": notes, "figures": got}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str, ensure_ascii=False) + "\n")
    return 0  # a benchmark reports; an unmet target is a finding in the table, not a crash


def scale_out_parts(workdir: Path, args: argparse.Namespace, got: dict[str, Any]) -> None:
    """The scale-out parts (bench/shards.py) asked for by --only, into `got`."""
    from bench import shards

    scale = 10 if args.quick else 1
    if "shards" in args.only:
        print(f"bench: {shards.SHARDS} shards ({shards.SHARD_ROWS // scale:,} rows) ...", file=sys.stderr, flush=True)
        got["shards"] = shards.shards(workdir, shards.SHARD_ROWS // scale)
    if "shard_memory" in args.only:
        rows = shards.SHARD_MEMORY_ROWS // scale
        print(f"bench: memory of shard 0 of {shards.SHARDS} ({rows:,} rows) ...", file=sys.stderr, flush=True)
        got["shard_memory"] = shards.shard_memory(workdir, args.data_dir, rows, shards.SHARD_MEMORY_LIMIT // scale)
    if "s3_parts" in args.only:
        print("bench: checkpoint parts on S3 (moto) ...", file=sys.stderr, flush=True)
        got["s3_parts"] = shards.s3_parts(workdir)


def checkout() -> dict[str, Any]:
    """The commit measured, and whether the work tree had changes beside it (None where git cannot tell)."""
    def git(*args: str) -> str | None:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short=12", "HEAD"), "dirty": None if status is None else bool(status)}


def machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """The machine the figures are from: its cores, CPU, Python, and its load average at the start and now."""
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part {', '.join(unknown) or '(none)'}: use {','.join(PARTS)}")
    return parts

