"""The benchmark's moving parts, kept small so `make test` stays fast; `make bench` runs the real thing."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path

import pytest

from bench import bench


def test_simulator_process_serves_and_is_stopped(tmp_path: Path):
    with bench.simulator(tmp_path, "t") as url:
        assert url.startswith("http://127.0.0.1:")
        assert asyncio.run(bench.bare_client("aiohttp", url, 20))["ok"] == 20
        assert bench.sim_call(url, "/_stats")["by_status"] == {"200": 20}
        assert bench.sim_call(url, "/_reset") == {"ok": True}
        assert bench.sim_call(url, "/_stats")["requests"] == 0
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        raise AssertionError("the simulator still accepts connections after the block")
    except OSError:
        pass


def test_measured_charges_the_child_cpu(tmp_path: Path):
    run = bench.measured([sys.executable, "-c", "sum(range(3_000_000)); print('hi')"], tmp_path, "burn", 60)
    assert run["exit"] == 0 and run["stdout"] == "hi\n"
    assert run["cpu_s"] > 0.01


def test_table_marks_targets():
    client = {"ok": 100, "cpu_s": 1.0, "cpu_ms_per_req": 10.0, "startup_cpu_s": 0.5, "net_cpu_ms_per_req": 5.0,
              "req_per_s": 3000.0}
    over = {"aiohttp": client, "batch": {**client, "cpu_ms_per_req": 30.0, "net_cpu_ms_per_req": 15.0}}
    rate = {"rows": 600, "ok": 600, "wall_s": 30.0, "rows_per_min": 1200.0, "deviation": 0.0, "requests": 600,
            "n_429": 0}
    conc = {"rows": 1280, "wall_s": 12.0, "rows_per_s": 100.0, "mean_latency_s": 0.6, "model_mean_latency_s": 0.57,
            "efficiency": 0.94, "ideal_wall_s": 11.9, "vs_ideal": 0.99, "n_429": 0}
    rows = bench.table_rows(over, rate, conc, 100)
    met = [(r["metric"], r["met"]) for r in rows if r["met"] is not None]
    assert [m for _, m in met] == [False, True, True, True, False, True]  # 3x CPU; 0.94 of 64 / mean latency
    text = bench.render(rows)
    assert text.splitlines()[0].startswith("| metric") and "| NO " in text and "| yes " in text


def test_streamed_overhead_row_needs_same_answers():
    client = {"ok": 100, "cpu_s": 1.0, "cpu_ms_per_req": 10.0, "startup_cpu_s": 0.5, "net_cpu_ms_per_req": 5.0,
              "req_per_s": 3000.0}
    streamed = {**client, "cpu_ms_per_req": 15.0, "net_cpu_ms_per_req": 7.5, "same_answers": True,
                "mean_answer_chars": 66.0}
    over = {"aiohttp": client, "batch": client, "batch-stream": streamed}
    row = [r for r in bench.overhead_rows(over, 100) if "streamed" in r[0]]
    assert row == [("overhead: batch streamed CPU / not streamed (5 text chunks + 3 events per answer)",
                    "1.50x (1.50x net of start-up), same answers and usage", "<= 2x, same", True)]
    over["batch-stream"] = {**streamed, "same_answers": False}
    assert [r[3] for r in bench.overhead_rows(over, 100) if "streamed" in r[0]] == [False]


def test_measured_reports_the_commands_own_peak_rss(tmp_path: Path):
    # Linux carries a process's peak RSS across exec: spawned straight from a big parent, a tiny
    # command would report the parent's peak. The launcher keeps the figure the command's own.
    ballast = b"x" * (300 << 20)
    small = bench.measured([sys.executable, "-c", "pass"], tmp_path, "small", 60)
    big = bench.measured([sys.executable, "-c", "b = b'x' * (200 << 20)"], tmp_path, "big", 60)
    del ballast
    assert small["exit"] == 0 and small["maxrss_kb"] < 100 << 10
    assert 200 << 10 <= big["maxrss_kb"] < 300 << 10
    failed = bench.measured([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path, "failed", 60)
    assert failed["exit"] == 3 and failed["wall_s"] > 0


def test_bench_inputs_are_generated_once_in_chunks(tmp_path: Path):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    paths = bench.bench_inputs(tmp_path, 250, chunk_rows=100)
    table = pq.read_table(paths["parquet"])
    assert table.column_names == ["id", "text"] and pq.ParquetFile(paths["parquet"]).num_row_groups == 3
    assert pacsv.read_csv(paths["csv"]).to_pylist() == table.to_pylist()
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    assert ids[0] == "r0000001" and ids[-1] == "r0000250"
    assert all(40 <= len(t) <= 80 for t in texts) and len(set(texts)) == 250  # unique: no answer-cache hits
    assert any("\u4e00" <= c <= "\u9fff" for c in "".join(texts)) and any(c.isascii() and c.isalpha()
                                                                         for c in "".join(texts))
    smaller = bench.bench_inputs(tmp_path, 100, chunk_rows=100)  # every size agrees row for row
    assert pq.read_table(smaller["parquet"]).to_pylist() == table.slice(0, 100).to_pylist()
    stamps = {p: p.stat().st_mtime_ns for p in paths.values()}
    assert bench.bench_inputs(tmp_path, 250) == paths  # cached: not written again
    assert {p: p.stat().st_mtime_ns for p in paths.values()} == stamps
    assert not list(tmp_path.glob(".*.tmp"))


def test_filled_checkpoint_reads_back_as_answered(tmp_path: Path):
    from helpers import opened, states

    from batch.checkpoint.writer import Checkpoint

    assert bench.fill_checkpoint(tmp_path, 0, 2500) == 3  # 1,000-row parts, as a run writes them
    assert bench.fill_checkpoint(tmp_path, 2500, 2600) == 1
    assert sorted(p.name for p in tmp_path.glob("part-*.parquet"))[-1] == "part-000004.parquet"
    done = states(opened(Checkpoint(tmp_path)))
    assert done == {bench.row_id(i): "ok" for i in range(2600)}


def test_first_request_is_seen(tmp_path: Path):
    with bench.simulator(tmp_path, "first") as url:
        asyncio.run(bench.bare_client("aiohttp", url, 3))
        first = bench.FirstRequest(url)  # resets the counters: the 3 above do not count
        first.start()
        assert first.seen_at is None
        sent = time.perf_counter()
        asyncio.run(bench.bare_client("aiohttp", url, 1))
        first.join(5)
        assert first.seen_at is not None and first.seen_at >= sent


def test_memory_scenario_end_to_end(tmp_path: Path):
    # One small size: a fresh CSV and Parquet run, a resume over a filled checkpoint, a complete run.
    mem = bench.memory(tmp_path, tmp_path / "data", (2000,), 100)
    assert mem["csv-2000"]["requests"] == mem["parquet-2000"]["requests"] == 100
    resume = mem["resume-2000"]
    assert resume["skipped"] == 1800 and resume["requests"] == resume["sent"] == 100  # the filled ids match
    assert 0 < resume["first_request_s"] < resume["wall_s"]
    complete = mem["complete-2000"]
    assert complete["requests"] == 0 and complete["output_rows"] == 2000
    assert all(mem[k]["rss_mb"] > mem["startup_rss_mb"] > 20 for k in ("csv-2000", "resume-2000", "complete-2000"))


def test_table_marks_memory_targets():
    def run(rss: float, first: float | None = 1.0) -> dict:
        return {"rss_mb": rss, "wall_s": 10.0, "first_request_s": first}

    mem = {"limit": 20000, "startup_rss_mb": 150.0}
    for rows, scale in ((100_000, 1.0), (1_000_000, 1.05)):
        mem[f"parquet-{rows}"] = run(180 * scale)
        mem[f"csv-{rows}"] = run(170 * scale if rows == 100_000 else 210)  # 210 MB: over 200
        mem[f"resume-{rows}"] = {**run(150, 2.5 if rows > 100_000 else 1.0), "checkpointed": int(rows * 0.9),
                                 "resume_limit": 20000, "real_answers": 20000, "parts_written": 880}
        mem[f"complete-{rows}"] = run(100 if rows == 100_000 else 150)  # 1.5x: grows with the rows
    rows = bench.memory_rows(mem)
    assert [r[3] for r in rows] == [True, False, True, False, True]
    assert rows[-1][1].startswith("2.50 s") and "900,000 answered" in rows[-1][0]
    assert "880 part files" in bench.memory_note(mem)
    over = {"aiohttp": {"ok": 1, "cpu_s": 1.0, "cpu_ms_per_req": 1.0, "startup_cpu_s": 0.5, "net_cpu_ms_per_req": 1.0,
                        "req_per_s": 3000.0}}
    over["batch"] = over["aiohttp"]
    rate = {"rows": 6, "ok": 6, "wall_s": 1.0, "rows_per_min": 1200.0, "deviation": 0.0, "requests": 6, "n_429": 0}
    conc = {"rows": 64, "wall_s": 1.0, "rows_per_s": 1.0, "mean_latency_s": 0.6, "model_mean_latency_s": 0.57,
            "efficiency": 1.0, "ideal_wall_s": 1.0, "vs_ideal": 1.0, "n_429": 0}
    assert bench.table_rows(over, rate, conc, 1, mem)[-5:] == [dict(zip(("metric", "value", "target", "met"), r))
                                                              for r in rows]


def test_only_some_parts_are_measured_and_tabled(tmp_path: Path, monkeypatch, capsys):
    mem = {"limit": 20000, "startup_rss_mb": 150.0}
    for rows in (100_000, 1_000_000):
        for kind in ("parquet", "csv", "complete"):
            mem[f"{kind}-{rows}"] = {"rss_mb": 180.0, "wall_s": 10.0, "first_request_s": 1.0}
        mem[f"resume-{rows}"] = {"rss_mb": 180.0, "wall_s": 10.0, "first_request_s": 1.0, "checkpointed": rows,
                                 "resume_limit": 20000, "real_answers": 20000, "parts_written": 880}
    monkeypatch.setattr(bench, "memory", lambda *args: mem)
    for part in ("overhead", "rate", "concurrency"):  # not run: they would fail the test
        monkeypatch.setattr(bench, part, None)
    assert bench.main(["--only", "memory", "--json", str(tmp_path / "b.json")]) == 0
    table = capsys.readouterr().out
    assert "memory: peak RSS" in table and "overhead" not in table and "rate:" not in table
    assert len(bench.table_rows(None, None, None, 1, mem)) == 5
    with pytest.raises(SystemExit):
        bench.main(["--only", "memory,speed"])


def test_batch_api_rows_mark_the_submission_targets():
    within = {"rows": 1_000_000, "files": 20, "rss_mb": 176.0, "wall_s": 22.0, "cpu_s": 13.0}
    rows = bench.table_rows(None, None, None, 0, batch=within)
    assert [r["met"] for r in rows] == [True, True]
    over = {**within, "rss_mb": 201.0, "wall_s": 61.0}
    assert [r["met"] for r in bench.table_rows(None, None, None, 0, batch=over)] == [False, False]
