"""The benchmark's scale-out parts (issue 19): one job as shards, each its own process as a Kubernetes Indexed Job
starts them (JOB_COMPLETION_INDEX set), against the simulator on 127.0.0.1 and a moto S3 server.

shards:        4 shard processes sharing a server that admits 32 in flight, the job's `concurrency: 32` split 8 each:
               each shard's wall time against its ideal (its rows x the simulated latency / its 8 slots), then
               `batch merge`: rows lost, ids twice, the share of requests refused with 429.
shard_memory:  peak RSS of shard 0 of 4 over a 10M-row input: a fresh run (the whole input scanned, its 2.5M rows
               selected, --limit requests sent), a resume of a checkpoint holding 90% of its rows, and the run that
               finds all of them answered and marks the shard finished.
s3_parts:      a shard whose checkpoint is on S3 (moto): its part PUTs against its rows / output.checkpoint_rows and
               its seconds / output.checkpoint_seconds, and the conditions (If-None-Match) its writes carry.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from batch.shard import SUCCESS_NAME, Shard
from bench.bench import (
    MEMORY_CONCURRENCY,
    RESUME_DONE,
    RSS_TARGET_MB,
    bench_inputs,
    fill_checkpoint,
    measured,
    memory_run,
    served,
    sim_call,
    simulator,
    startup_rss_mb,
    write_job,
)

SHARDS = 4
SERVER_SLOTS = 32  # the simulator's --max-concurrency, and the job's limits.concurrency: 8 per shard
SHARD_LATENCY_S = 0.2  # fixed: a shard's ideal time is its rows x this / its slots
SHARD_ROWS = 4000  # about 1,000 rows a shard, 25 s at 8 / 0.2 s
SHARD_TARGET = 1.3  # each shard's wall time / its ideal
SHARE_429_TARGET = 0.05
SHARD_MEMORY_ROWS = 10_000_000
SHARD_MEMORY_LIMIT = 10_000  # requests per fresh and resumed run
# The S3 shard: a run bound by checkpoint_rows (a fast server, a window of seconds it never reaches), and one bound
# by checkpoint_seconds (a slow one, a window of rows it never reaches).
S3_ROWS = 8000  # about 2,000 in shard 0
S3_WINDOW_ROWS = 250
S3_SLOW_ROWS = 1200  # about 300 in shard 0: 7.5 s at 4 slots and 100 ms
S3_SLOW_LATENCY_S = 0.1
S3_WINDOW_S = 2.0
S3_BUCKET = "batch-bench"


def checkpoint_folder(output: Path | str, index: int, count: int) -> str:
    """Shard index/count's checkpoint folder beside `output` (a path or an s3:// URL)."""
    return f"{str(output).removesuffix('.parquet')}.checkpoint/{Shard(index, count).folder}"


def generated_input(workdir: Path, name: str, rows: int) -> Path:
    """A fresh `rows`-row Parquet input (id, text) in workdir: the rows every generated input has."""
    import pyarrow.parquet as pq

    from bench.bench import data_chunk

    path = workdir / f"{name}.parquet"
    pq.write_table(data_chunk(0, rows), path)
    return path


def run_shards(workdir: Path, job: Path, count: int, label: str, timeout_s: float = 600) -> list[dict[str, Any]]:
    """Every shard of `job` at once, each `batch run JOB` in a process of its own with JOB_COMPLETION_INDEX set, as
    an Indexed Job starts its pods: each one's process figures (measured), in shard order."""
    cmd = [sys.executable, "-m", "batch", "run", str(job)]
    with ThreadPoolExecutor(count) as pool:
        running = [pool.submit(measured, cmd, workdir, f"{label}-{index}", timeout_s,
                               {**os.environ, "JOB_COMPLETION_INDEX": str(index)}) for index in range(count)]
        done = [future.result() for future in running]
    for index, run in enumerate(done):
        if run["exit"] != 0:
            raise RuntimeError(f"{label} shard {index}/{count} exited with {run['exit']}: {run['stderr_tail']}")
    return done


# -- shards: each within its ideal time ----------------------------------------------------------------
def shards(workdir: Path, rows: int, latency_s: float = SHARD_LATENCY_S) -> dict[str, Any]:
    """SHARDS shard processes against a server admitting SERVER_SLOTS in flight, then `batch merge`."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    data = generated_input(workdir, "shards", rows)
    share = SERVER_SLOTS // SHARDS  # the static split of limits.concurrency
    flags = ("--latency-ms", str(latency_s * 1000), "--max-concurrency", str(SERVER_SLOTS))
    with simulator(workdir, "shards", *flags) as url:
        job, output = write_job(workdir, url, "shards", data, "id", {"concurrency": SERVER_SLOTS}, ["text"],
                                shards=SHARDS)
        runs = run_shards(workdir, job, SHARDS, "shards")
        stats = sim_call(url, "/_stats")
    merge = measured([sys.executable, "-m", "batch", "merge", str(job)], workdir, "shards-merge", 600)
    if merge["exit"] != 0:
        raise RuntimeError(f"batch merge exited with {merge['exit']}: {merge['stderr_tail']}")
    per_shard = []
    for index, run in enumerate(runs):
        summary = json.loads((Path(checkpoint_folder(output, index, SHARDS)) / "summary.json").read_text())
        mine, request_phase = summary["rows_total"], summary["run"]["wall_s"]
        ideal = mine * latency_s / share
        per_shard.append({"index": index, "rows": mine, "ok": summary["run"]["ok"], "wall_s": run["wall_s"],
                          "run_wall_s": request_phase, "ideal_s": ideal, "ratio": run["wall_s"] / ideal,
                          "run_ratio": request_phase / ideal})
    merged = pq.read_table(output, columns=["id", "status"])
    ids = pq.read_table(data, columns=["id"]).column("id")
    answered = set(merged.filter(pc.equal(merged.column("status"), "ok")).column("id").to_pylist())
    n_429 = stats["by_status"].get("429", 0)
    worst = max(per_shard, key=lambda s: s["ratio"])
    return {"rows": rows, "shards": SHARDS, "share": share, "latency_s": latency_s, "per_shard": per_shard,
            "worst_index": worst["index"], "worst_ratio": worst["ratio"], "requests": stats["requests"],
            "n_429": n_429, "share_429": n_429 / max(1, stats["requests"]), "max_in_flight": stats["max_in_flight"],
            "merged_rows": merged.num_rows, "lost": sum(1 for i in ids.to_pylist() if i not in answered),
            "twice": merged.num_rows - len(set(merged.column("id").to_pylist())), "merge_wall_s": merge["wall_s"]}


def shards_rows(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    worst = r["per_shard"][r["worst_index"]]
    each = ", ".join(f"{s['ratio']:.2f}" for s in r["per_shard"])
    what = (f"{r['shards']} shard processes (JOB_COMPLETION_INDEX), server limit {SERVER_SLOTS} in flight, job "
            f"concurrency {SERVER_SLOTS} ({r['share']} each), {r['latency_s'] * 1000:.0f} ms, {r['rows']:,} rows")
    return [
        (f"shards: worst shard's wall time / its ideal (rows x latency / {r['share']}), {what}",
         f"{r['worst_ratio']:.2f}x (shard {worst['index']}: {worst['wall_s']:.1f} s for {worst['rows']:,} rows, ideal "
         f"{worst['ideal_s']:.1f} s; request phase {worst['run_ratio']:.2f}x; each shard {each})",
         f"<= {SHARD_TARGET:g}x", r["worst_ratio"] <= SHARD_TARGET),
        (f"shards: rows lost, ids twice in the merged output, share of requests answered 429 ({what})",
         f"{r['lost']} lost, {r['twice']} twice ({r['merged_rows']:,} rows merged); {r['share_429']:.1%} "
         f"({r['n_429']} of {r['requests']:,}; at most {r['max_in_flight']} in flight)",
         f"0, 0, <= {SHARE_429_TARGET:.0%}",
         r["lost"] == 0 and r["twice"] == 0 and r["share_429"] <= SHARE_429_TARGET),
    ]


# -- shard_memory: RSS per shard of a 10M-row input -----------------------------------------------------
def shard_ids(data: Path, count: int, index: int) -> list[str]:
    """Shard index/count's ids, in input order (which a shard numbers its rows by), read a row group at a time."""
    import pyarrow.parquet as pq

    shard, file, ids = Shard(index, count), pq.ParquetFile(data), []
    for group in range(file.num_row_groups):
        column = file.read_row_group(group, columns=["id"]).column("id").combine_chunks()
        ids += column.filter(shard.selects(column)).to_pylist()
    return ids


def shard_memory(workdir: Path, data_dir: Path, rows: int, limit: int) -> dict[str, Any]:
    """Shard 0 of SHARDS over a `rows`-row input (generated once, cached in data_dir): three runs, each one's peak
    RSS. fresh: --limit requests. resume: RESUME_DONE of its rows answered (the first `limit` by the fresh run,
    the rest written into its checkpoint as a run leaves them: fill_checkpoint), --limit more. complete: every row
    answered, no request: the run ends by marking the shard finished (_SUCCESS)."""
    data = bench_inputs(data_dir, rows, formats=("parquet",))["parquet"]
    ids = shard_ids(data, SHARDS, 0)
    # A zero-latency server and MEMORY_CONCURRENCY slots for the shard: requests cost the least time they can.
    with simulator(workdir, "shard-memory") as url:
        job = write_job(workdir, url, f"shard-memory-{rows}", data, "id", {"concurrency": MEMORY_CONCURRENCY * SHARDS},
                        ["text"], shards=SHARDS)
        folder = Path(checkpoint_folder(job[1], 0, SHARDS))
        label, shard = f"shard-memory-{rows}", f"0/{SHARDS}"
        results: dict[str, Any] = {"rows": rows, "shard_rows": len(ids), "limit": limit,
                                   "startup_rss_mb": startup_rss_mb(workdir, "shard-memory-startup")}
        results["fresh"] = memory_run(workdir, url, job, f"{label}-fresh", "--limit", str(limit), shard=shard)
        done = int(len(ids) * RESUME_DONE)
        results["parts_written"] = fill_checkpoint(folder, limit, done, ids)
        results["resume"] = memory_run(workdir, url, job, f"{label}-resume", "--limit", str(limit), shard=shard)
        results["resume"]["checkpointed"] = done
        fill_checkpoint(folder, done + limit, len(ids), ids)
        results["complete"] = memory_run(workdir, url, job, f"{label}-complete", watch=False, shard=shard)
    expected = {"fresh": (limit, 0), "resume": (limit, done), "complete": (0, len(ids))}
    for kind, (sent, skipped) in expected.items():
        got = results[kind]
        if (got["sent"], got["requests"], got["skipped"], got["rows_total"]) != (sent, sent, skipped, len(ids)):
            raise RuntimeError(f"{label}-{kind}: expected {sent} sent and {skipped} skipped of {len(ids)}, got {got}")
    if not (folder / "_SUCCESS").exists():
        raise RuntimeError(f"{label}-complete: no _SUCCESS in {folder}")
    results["peak_rss_mb"] = max(results[kind]["rss_mb"] for kind in expected)
    return results


def shard_memory_rows(m: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    runs = ", ".join(f"{kind} {m[kind]['rss_mb']:.0f} MB ({m[kind]['wall_s']:.1f} s)"
                     for kind in ("fresh", "resume", "complete"))
    resume = m["resume"]["first_request_s"]
    return [(f"shard memory: peak RSS of shard 0 of {SHARDS} over a {m['rows']:,}-row Parquet input "
             f"({m['shard_rows']:,} rows its own)",
             f"{m['peak_rss_mb']:.0f} MB, {m['peak_rss_mb'] - m['startup_rss_mb']:.0f} MB over the "
             f"{m['startup_rss_mb']:.0f} MB of interpreter and imports ({runs}; the resume's first request after "
             f"{'never' if resume is None else f'{resume:.1f} s'})",
             f"<= {RSS_TARGET_MB:.0f} MB", m["peak_rss_mb"] <= RSS_TARGET_MB)]


def shard_memory_note(m: dict[str, Any]) -> str:
    resume = m["resume"]
    return (f"shard memory: each run is `batch run` of the job (`shards: {SHARDS}`) with JOB_COMPLETION_INDEX=0 "
            f"over the whole {m['rows']:,}-row input (id + text, 40-80 chars), which it scans and of which it "
            f"selects its {m['shard_rows']:,} rows; zero-latency simulator, {MEMORY_CONCURRENCY} in flight. fresh: an "
            f"empty checkpoint, --limit {m['limit']:,} requests. resume: {resume['checkpointed']:,} of its rows "
            f"answered (the first {m['limit']:,} by the fresh run, the rest written directly as "
            f"{m['parts_written']:,} part files of 1,000 records, the files a real run leaves, not sent), --limit "
            f"{m['limit']:,} more. complete: all its rows answered the same way; no request, the run reads the "
            f"checkpoint and writes _SUCCESS. The shard's whole run is not timed: at ~5,000 requests/s its "
            f"{m['shard_rows']:,} rows would take ~{m['shard_rows'] / 5000 / 60:.0f} min; what grows with the "
            f"rows (the scan, the resume state, the checkpoint read back) is what these three runs hold.")


# -- s3_parts: one part per window, every write conditional ---------------------------------------------
@contextlib.contextmanager
def moto_s3(workdir: Path) -> Iterator[str]:
    """A moto S3 server process on a free port of 127.0.0.1, recording the requests it is sent; its endpoint."""
    recording = workdir / "moto-requests.jsonl"
    env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(recording)}  # read when moto is imported
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"]
    with served(workdir, "moto", cmd, r"Running on (http://([\d.]+):(\d+))", env) as endpoint:
        yield endpoint


def moto_call(endpoint: str, action: str) -> bytes:
    """One call of moto's own API (recorder/start-recording, recorder/download-recording, ...)."""
    method = "GET" if action.startswith("recorder/download") else "POST"
    with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/{action}", method=method)) as reply:
        return reply.read()


def object_writes(endpoint: str, bucket: str) -> list[tuple[str, dict[str, str]]]:
    """Every write of an object in `bucket` moto recorded (a PUT of it, or the POST completing a multipart upload):
    its key and the request's headers."""
    writes = []
    for line in moto_call(endpoint, "recorder/download-recording").decode().splitlines():
        entry = json.loads(line) if line.strip() else None
        if entry is None:
            continue
        url = urllib.parse.urlsplit(entry["url"])
        path = urllib.parse.unquote(url.path)
        if not path.startswith(f"/{bucket}/"):
            continue
        multipart = "uploadId=" in url.query
        if entry["method"] == "PUT" and not multipart or entry["method"] == "POST" and multipart:
            writes.append((path.removeprefix(f"/{bucket}/"), entry["headers"]))
    return writes


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment a user's shard would have for this S3 server (credentials moto takes, its endpoint)."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")}
    return {**env, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_DEFAULT_REGION": "us-east-1"}


def s3_parts(workdir: Path, rows: int = S3_ROWS, slow_rows: int = S3_SLOW_ROWS, window_rows: int = S3_WINDOW_ROWS,
             window_s: float = S3_WINDOW_S, slow_latency_s: float = S3_SLOW_LATENCY_S) -> dict[str, Any]:
    """Shard 0 of SHARDS with its checkpoint on S3, twice: bound by rows (window_rows, a window of seconds it never
    reaches) and by time (window_s, a window of rows it never reaches)."""
    import boto3

    cases = {"rows": (rows, 0.0, {"checkpoint_rows": window_rows, "checkpoint_seconds": 3600},
                      {"concurrency": MEMORY_CONCURRENCY * SHARDS}),
             "seconds": (slow_rows, slow_latency_s, {"checkpoint_rows": 1_000_000, "checkpoint_seconds": window_s},
                         {"concurrency": 4 * SHARDS})}
    results: dict[str, Any] = {}
    with moto_s3(workdir) as endpoint:
        env = s3_env(endpoint)
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
        for case, (n, latency_s, window, limits) in cases.items():
            bucket = f"{S3_BUCKET}-{case}"
            client.create_bucket(Bucket=bucket)
            folder = checkpoint_folder("out/result.parquet", 0, SHARDS)
            moto_call(endpoint, "recorder/reset-recording")
            moto_call(endpoint, "recorder/start-recording")
            data = generated_input(workdir, f"s3-{case}", n)
            output = {"path": f"s3://{bucket}/out/result.parquet", "local_dir": str(workdir / f"s3-{case}-local"),
                      **window}
            with simulator(workdir, f"s3-{case}", "--latency-ms", str(latency_s * 1000)) as url:
                job, _ = write_job(workdir, url, f"s3-{case}", data, "id", limits, output=output, shards=SHARDS)
                run = measured([sys.executable, "-m", "batch", "run", str(job)], workdir, f"s3-{case}", 600,
                               {**env, "JOB_COMPLETION_INDEX": "0"})
            if run["exit"] != 0:
                raise RuntimeError(f"s3-{case} exited with {run['exit']}: {run['stderr_tail']}")
            writes = object_writes(endpoint, bucket)  # before the summary's GET below, which is no write anyway
            summary = json.loads(client.get_object(Bucket=bucket, Key=f"{folder}/summary.json")["Body"].read())
            results[case] = parts_of(writes, summary["run"]["ok"], run["wall_s"], window)
            results[case]["part_rows"] = part_rows(client, bucket, folder)
    return results


def parts_of(writes: list[tuple[str, dict[str, str]]], rows: int, wall_s: float,
             window: dict[str, Any]) -> dict[str, Any]:
    """What a shard's run wrote to S3 against its windows: the parts its log was compacted into (part-N.parquet,
    one per window at most), the parts rewritten from others (part-N-G, a merge), the markers (_SUCCESS), and which of
    them were written without If-None-Match: *. A window closes at checkpoint_rows answers or checkpoint_seconds, so
    one part per window is at most rows // checkpoint_rows + seconds // checkpoint_seconds + 1 (the last, at the
    end) parts."""
    from batch.checkpoint.writer import part_order

    names = [(key.rsplit("/", 1)[-1], headers) for key, headers in writes]
    orders = {name: part_order(name) for name, _ in names}
    window_parts = [name for name, _ in names if orders[name] is not None and orders[name].generation == 0]
    rewritten = [name for name, _ in names if orders[name] is not None and orders[name].generation > 0]
    markers = [name for name, _ in names if name == SUCCESS_NAME]
    without = [name for name, headers in names
               if (orders[name] is not None or name == SUCCESS_NAME) and headers.get("If-None-Match") != "*"]
    rows_windows, seconds_windows = rows / window["checkpoint_rows"], wall_s / window["checkpoint_seconds"]
    return {"rows": rows, "wall_s": wall_s, **window, "window_parts": len(window_parts),
            "rewritten_parts": len(rewritten), "markers": len(markers), "rows_windows": rows_windows,
            "seconds_windows": seconds_windows, "bound": math.floor(rows_windows) + math.floor(seconds_windows) + 1,
            "part_and_marker_puts": len(window_parts) + len(rewritten) + len(markers),
            "without_if_none_match": sorted(set(without)), "puts_without_if_none_match": len(without),
            "other_writes": sorted({name for name, _ in names if orders[name] is None and name != SUCCESS_NAME})}


def part_rows(client: Any, bucket: str, folder: str) -> list[int]:
    """The records in each part left in `folder` (part-N.parquet, in order), from their Parquet footers."""
    import io

    import pyarrow.parquet as pq

    from batch.checkpoint.writer import part_order

    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix=f"{folder}/").get("Contents", [])]
    parts = sorted((order, key) for key in keys if (order := part_order(key.rsplit("/", 1)[-1])))
    return [pq.ParquetFile(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())).metadata.num_rows
            for _, key in parts]


def s3_parts_rows(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    rows = []
    for case, what in (("rows", "bound by checkpoint_rows"), ("seconds", "bound by checkpoint_seconds")):
        p = r[case]
        sizes = p["part_rows"]
        # Bound by rows, every part but the last closes on a full window: one cut short before it is a part too many.
        early = sum(1 for size in sizes[:-1] if size < p["checkpoint_rows"]) if case == "rows" else 0
        rows.append((f"S3 checkpoint ({what}): part PUTs of shard 0/{SHARDS} vs its rows / checkpoint_rows "
                     f"({p['checkpoint_rows']:,}) + its seconds / checkpoint_seconds ({p['checkpoint_seconds']:g}) + 1",
                     f"{p['window_parts']} parts for {p['rows']:,} rows in {p['wall_s']:.1f} s "
                     f"({p['rows_windows']:.1f} + {p['seconds_windows']:.1f} windows; records per part "
                     f"{_sizes(sizes)}; {p['rewritten_parts']} rewritten from others)",
                     f"<= {p['bound']}" + ("; full but the last" if case == "rows" else ""),
                     p["window_parts"] <= p["bound"] and early == 0))
    puts = sum(r[case]["part_and_marker_puts"] for case in ("rows", "seconds"))
    unconditional = sum(r[case]["puts_without_if_none_match"] for case in ("rows", "seconds"))
    bare = sorted({name for case in ("rows", "seconds") for name in r[case]["without_if_none_match"]})
    rows.append(("S3 checkpoint: part and marker PUTs carrying If-None-Match: * (moto's request log)",
                 f"{puts - unconditional} of {puts}" + (f" (without: {', '.join(bare)})" if bare else ""), "all",
                 unconditional == 0 and puts > 0))
    return rows


def _sizes(sizes: list[int]) -> str:
    """[250, 250, 250, 120] as '250 x 3, 120'."""
    runs: list[list[int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
    return ", ".join(f"{size:,}" + (f" x {count}" if count > 1 else "") for size, count in runs) or "none"
