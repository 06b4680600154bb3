"""The benchmark's moving parts, kept small so `make test` stays fast; `make bench` runs the real thing."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

from batch import bench


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
