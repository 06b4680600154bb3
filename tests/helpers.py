"""What several test files share: the data folder, the output and checkpoint of a job, a run in its own process,
waiting for an observable condition, and checkpoint records built by hand. Fixtures live in conftest.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

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
