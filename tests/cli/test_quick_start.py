"""The first five minutes: `make demo` and `make demo-batch` against the simulator, its port taken or chosen."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_MADE = ".venv/.installed"  # the Makefile's mark of an installed venv


def make(folder: Path, target: str, port: int) -> subprocess.CompletedProcess[str]:
    """`make TARGET SIM_PORT=port` in a copy of the project's jobs and data (out/ goes there), with this Python."""
    if shutil.which("make") is None:
        pytest.skip("needs make")
    for name in ("jobs", "data"):
        shutil.copytree(REPO / name, folder / name)
    # -o: the venv is this one, installed already.
    return subprocess.run(["make", "-f", str(REPO / "Makefile"), "-o", VENV_MADE, target, f"SIM_PORT={port}",
                           f"PY={sys.executable}"], cwd=folder, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("target", ["demo", "demo-batch"])
def test_make_demo_with_its_port_taken_says_so_in_one_line(tmp_path, target):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = make(tmp_path, target, port)
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if not line.startswith("make")]
    assert said == [f"simulator: cannot listen on 127.0.0.1:{port}: Address already in use; pick another port "
                    "with --port (make demo SIM_PORT=...)"], done.stderr


def test_make_demo_on_another_port_runs_end_to_end(tmp_path):
    done = make(tmp_path, "demo", 0)  # any free port: the job takes the one the simulator got
    assert done.returncode == 0, done.stderr
    assert "all runs: ok 12, failed 0, pending 0" in done.stdout
    result = pd.read_parquet(tmp_path / "out" / "demo.parquet")
    assert len(result) == 12 and set(result["status"]) == {"ok"}


@pytest.mark.parametrize("target", ["demo", "demo-batch", "run", "validate", "docs"])
def test_a_fresh_clone_needs_no_npm_for_the_demo_or_a_job(tmp_path, target):
    """The quick start promises Python and the package index: what a target runs on a fresh clone (make -n) fetches
    nothing from npm, which only `make install` and `make test` need (for Azurite, the tests of az://)."""
    if shutil.which("make") is None:
        pytest.skip("needs make")
    shutil.copy(REPO / "pyproject.toml", tmp_path)  # a fresh clone's, which the venv is made from
    done = subprocess.run(["make", "-n", "-f", str(REPO / "Makefile"), target], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pip install" in done.stdout  # a fresh clone: the venv is made first
    assert "npm" not in done.stdout and "azurite" not in done.stdout, done.stdout


def test_the_batch_demo_job_asks_the_simulator_on_its_port():
    done = subprocess.run([sys.executable, "-m", "batch.simulator", "--port", "0", "--", sys.executable, "-m",
                           "batch", "validate", str(REPO / "jobs" / "demo-batch.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    port = re.search(r"simulator listening on http://127\.0\.0\.1:(\d+)/v1", done.stderr).group(1)
    assert f"model glm-4-flash at http://127.0.0.1:{port}/api/paas/v4/" in done.stdout


def test_a_base_url_naming_an_unset_variable_is_one_line_naming_key_and_variable(make_job, run_cli, monkeypatch):
    monkeypatch.delenv("BATCH_TEST_PORT", raising=False)
    job = make_job(rows=[{"review_id": "r1", "text": "good"}],
                   model={"base_url": "http://127.0.0.1:${BATCH_TEST_PORT}/v1"})
    code, out, err = run_cli("validate", job)
    assert code == 2 and "model.base_url" in err and "BATCH_TEST_PORT, which is not set" in err, err
    monkeypatch.setenv("BATCH_TEST_PORT", "18099")
    code, out, err = run_cli("validate", job)
    assert code == 0 and "at http://127.0.0.1:18099/v1" in out, err
