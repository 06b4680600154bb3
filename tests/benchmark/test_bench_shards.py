"""The benchmark's scale-out parts (bench/shards.py) at a tiny scale, so they cannot rot between full runs, and the
table the docs embed (bench/table.py) from the results `make bench` writes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from bench import bench, shards, table


def test_four_shard_processes_merge_with_no_row_lost_or_twice(tmp_path: Path):
    got = shards.shards(tmp_path, 48, latency_s=0.02)
    each = got["per_shard"]
    assert [s["index"] for s in each] == [0, 1, 2, 3] and sum(s["rows"] for s in each) == 48
    assert all(s["ok"] == s["rows"] and s["ideal_s"] == s["rows"] * 0.02 / 8 for s in each)
    assert all(s["wall_s"] > s["run_wall_s"] > 0 for s in each)  # the process's time holds its request phase
    assert (got["merged_rows"], got["lost"], got["twice"], got["n_429"]) == (48, 0, 0, 0)
    assert got["requests"] == 48 and got["max_in_flight"] <= shards.SERVER_SLOTS
    assert got["worst_ratio"] == max(s["ratio"] for s in each)
    ratio_row, integrity_row = shards.shards_rows(got)
    assert integrity_row[1].startswith("0 lost, 0 twice (48 rows merged); 0.0%") and integrity_row[3] is True
    assert f"{got['worst_ratio']:.2f}x (shard {got['worst_index']}" in ratio_row[1]


def test_the_shard_integrity_row_marks_a_lost_or_doubled_row():
    shard = {"index": 0, "rows": 10, "wall_s": 1.2, "ideal_s": 1.0, "ratio": 1.2, "run_ratio": 1.1}
    got = {"rows": 10, "shards": 4, "share": 8, "latency_s": 0.2, "per_shard": [shard], "worst_index": 0,
           "worst_ratio": 1.2, "requests": 100, "n_429": 5, "share_429": 0.05, "max_in_flight": 32, "merged_rows": 10,
           "lost": 0, "twice": 0}
    assert [row[3] for row in shards.shards_rows(got)] == [True, True]
    for change in ({"lost": 1}, {"twice": 1}, {"n_429": 6, "share_429": 0.06}):
        assert shards.shards_rows({**got, **change})[1][3] is False, change
    slow = {**shard, "ratio": 1.31}
    assert shards.shards_rows({**got, "per_shard": [slow], "worst_ratio": 1.31})[0][3] is False


def test_a_shards_memory_is_measured_over_fresh_resumed_and_complete_runs(tmp_path: Path):
    got = shards.shard_memory(tmp_path, tmp_path / "data", 4000, 100)
    mine = got["shard_rows"]
    assert mine == len(shards.shard_ids(tmp_path / "data" / f"reviews-v{bench.DATA_VERSION}-4000.parquet", 4, 0))
    assert 900 < mine < 1100  # CRC-32 of the ids splits them about evenly
    assert (got["fresh"]["sent"], got["resume"]["sent"], got["complete"]["requests"]) == (100, 100, 0)
    assert got["resume"]["skipped"] == got["resume"]["checkpointed"] == int(mine * bench.RESUME_DONE)
    assert got["peak_rss_mb"] == max(got[kind]["rss_mb"] for kind in ("fresh", "resume", "complete"))
    assert got["peak_rss_mb"] > got["startup_rss_mb"] > 20
    assert not (tmp_path / "data" / f"reviews-v{bench.DATA_VERSION}-4000.csv").exists()  # Parquet only: 10M rows
    [row] = shards.shard_memory_rows(got)
    assert row[0].endswith(f"over a 4,000-row Parquet input ({mine:,} rows its own)")
    assert f"{got['resume']['checkpointed']:,} of its rows answered" in shards.shard_memory_note(got)


def test_parts_per_window_and_their_conditions_are_read_from_motos_request_log(tmp_path: Path):
    got = shards.s3_parts(tmp_path, rows=160, slow_rows=24, window_rows=10, window_s=0.5, slow_latency_s=0.05)
    by_rows, by_seconds = got["rows"], got["seconds"]
    assert by_rows["window_parts"] == math.ceil(by_rows["rows"] / 10) == len(by_rows["part_rows"])
    assert sum(by_rows["part_rows"]) == by_rows["rows"] and set(by_rows["part_rows"][:-1]) == {10}
    assert sum(by_seconds["part_rows"]) == by_seconds["rows"] > 0
    for case in (by_rows, by_seconds):
        assert case["markers"] == 1 and case["without_if_none_match"] == []
        assert "_LEASE" in case["other_writes"]  # what else the shard wrote is listed, not counted as parts
    assert [row[3] for row in shards.s3_parts_rows(got)] == [True, True, True]


def test_a_part_or_marker_put_without_if_none_match_or_past_its_windows_is_marked():
    conditional = {"If-None-Match": "*"}
    writes = [("out/c/shard=0-of-4/part-000001.parquet", conditional),
              ("out/c/shard=0-of-4/part-000002.parquet", {}),  # an unconditional PUT: a second writer would win too
              ("out/c/shard=0-of-4/part-000002-1.parquet", conditional),
              ("out/c/shard=0-of-4/_SUCCESS", {}), ("out/c/shard=0-of-4/summary.json", {})]
    got = shards.parts_of(writes, 25, 3.0, {"checkpoint_rows": 10, "checkpoint_seconds": 60})
    assert (got["window_parts"], got["rewritten_parts"], got["markers"], got["bound"]) == (2, 1, 1, 3)
    assert got["without_if_none_match"] == ["_SUCCESS", "part-000002.parquet"]
    assert (got["part_and_marker_puts"], got["puts_without_if_none_match"]) == (4, 2)
    assert got["other_writes"] == ["summary.json"]
    got["part_rows"] = [10, 10, 5]
    fine = {**got, "without_if_none_match": [], "puts_without_if_none_match": 0}
    assert [row[3] for row in shards.s3_parts_rows({"rows": fine, "seconds": fine})] == [True, True, True]
    rows = shards.s3_parts_rows({"rows": got, "seconds": fine})
    assert rows[2][1] == "6 of 8 (without: _SUCCESS, part-000002.parquet)" and rows[2][3] is False
    early = {**fine, "part_rows": [10, 4, 10, 1]}  # one part cut before its window of rows was full
    too_many = {**fine, "window_parts": 4}
    assert shards.s3_parts_rows({"rows": early, "seconds": fine})[0][3] is False
    assert shards.s3_parts_rows({"rows": fine, "seconds": too_many})[1][3] is False


RESULTS = {"date": "2026-12-07 04:10 UTC", "commit": "0123456789ab", "dirty": False,
           "machine": {"cores": 2, "cpu": "Some CPU @ 2.0GHz", "python": "3.11.7", "load_before": [3.21, 2.5, 2.0],
                       "load_after": [4.0, 3.1, 2.25]},
           "mode": "full", "parts": ["overhead", "shards"], "wall_s": 512.4, "requests": 20000,
           "table": [{"metric": "overhead: batch CPU / bare aiohttp CPU", "value": "1.34x", "target": "<= 2.5x",
                      "met": True},
                     {"metric": "a | in a metric", "value": "two\nlines", "target": "", "met": None},
                     {"metric": "shards: worst", "value": "1.41x", "target": "<= 1.3x", "met": False}],
           "notes": ["memory/resume: how the inputs were made."], "figures": {}}


def test_markdown_table_renders_the_results_with_when_and_where_they_were_measured():
    text = table.markdown_table(RESULTS)
    lines = text.splitlines()
    assert [cell.strip() for cell in lines[0].split("|")] == ["", "metric", "value", "target", "met?", ""]
    assert set(lines[1]) == {"|", "-"}
    assert lines[2].startswith("| overhead: batch CPU / bare aiohttp CPU | 1.34x ") and lines[2].endswith("| yes  |")
    assert lines[3].startswith("| a \\| in a metric") and "| two lines |" in lines[3]  # one cell each, one line
    assert lines[4].endswith("| NO   |")
    assert len({len(line) for line in lines[:5]}) == 1  # padded: it reads as a table in plain text too
    assert lines[6] == "memory/resume: how the inputs were made."
    assert lines[8] == ("Measured by `make bench` (full run of overhead, shards; 512 s) on 2026-12-07 04:10 UTC, "
                        "commit 0123456789ab, 2 cores (Some CPU @ 2.0GHz), load average 3.21 / 2.50 / 2.00 (1, 5, 15 "
                        "min) at the start and 4.00 / 3.10 / 2.25 at the end.")
    assert text.endswith(".\n") and table.markdown_table(RESULTS) == text
    assert "plus uncommitted changes" in table.markdown_table({**RESULTS, "dirty": True})


def test_the_bench_writes_what_it_prints_and_the_docs_table_reads_it(tmp_path: Path, monkeypatch, capsys):
    row = {"metric": "shards: worst", "value": "1.11x", "target": "<= 1.3x", "met": True}
    monkeypatch.setattr(shards, "shards", lambda workdir, rows: {"rows": rows})
    monkeypatch.setattr(shards, "shards_rows", lambda got: [tuple(row.values())])
    out = tmp_path / "results.json"
    assert bench.main(["--only", "shards", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    results = table.load_results(out)
    assert results["table"] == [row] and results["figures"]["shards"] == {"rows": shards.SHARD_ROWS}
    assert results["machine"]["cores"] >= 1 and len(results["machine"]["load_before"]) == 3
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                          cwd=Path(bench.__file__).parent).stdout.strip()
    assert results["commit"] == head and isinstance(results["dirty"], bool)
    assert results["parts"] == ["shards"] and results["mode"] == "full"
    assert table.render(results["table"]) in printed  # every line printed is in the file
    assert table.render(results["table"]) in table.markdown_table(results)


def test_the_committed_results_render_and_the_table_module_imports_no_scenario():
    results = table.load_results()
    assert results["mode"] == "full" and set(results["parts"]) == set(bench.PARTS)
    assert {row["metric"].split(":")[0] for row in results["table"]} >= {"shards", "shard memory", "S3 checkpoint"}
    assert table.markdown_table(results).count("\n|") >= len(results["table"])
    probe = ("import sys, bench.table; heavy = {'bench.bench', 'bench.shards', 'pyarrow', 'batch'} & set(sys.modules);"
             "print(sorted(heavy))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            cwd=Path(table.__file__).parent.parent)
    assert json.loads(loaded.stdout.replace("'", '"')) == []
