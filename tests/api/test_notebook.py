"""The Python API in a real Jupyter kernel, driven as a notebook drives it (jupyter_client, as nbclient does): the
kernel runs on this worktree's Python, cells run inside the kernel's running event loop, the stop button is the
kernel's interrupt, and every run talks to a simulator the test starts on 127.0.0.1."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

CELL_TIMEOUT_S = 120  # a deadline for a cell that never ends, not a wait


@dataclass
class Cell:
    """What a cell printed and raised, as a notebook shows it."""

    stdout: str = ""
    stderr: str = ""
    error: dict[str, Any] | None = None  # ename, evalue, traceback
    status: str = ""


@dataclass
class Notebook:
    km: KernelManager
    client: Any
    folder: Path
    first_import: Cell = field(default_factory=Cell)  # the kernel's first cell: `import batch`

    def start(self, code: str) -> str:
        """Send a cell to run; returns its message id."""
        return self.client.execute(code)

    def outcome(self, msg_id: str) -> Cell:
        """The outputs of cell `msg_id`, read from iopub until the kernel is idle after it."""
        cell = Cell()
        while True:
            msg = self.client.get_iopub_msg(timeout=CELL_TIMEOUT_S)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                setattr(cell, content["name"], getattr(cell, content["name"]) + content["text"])
            elif kind == "error":
                cell.error = content
            elif kind == "status" and content["execution_state"] == "idle":
                break
        cell.status = self.client.get_shell_msg(timeout=CELL_TIMEOUT_S)["content"]["status"]
        return cell

    def run(self, code: str) -> Cell:
        return self.outcome(self.start(code))


@pytest.fixture(scope="module")
def notebook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Notebook]:
    """An IPython kernel on this venv's Python (a kernelspec of its own in a temp folder), its first cell
    `import batch`."""
    folder = tmp_path_factory.mktemp("notebook")
    spec = folder / "kernels" / "batch-test"
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                 "--HistoryManager.enabled=False"],
        "display_name": "batch test", "language": "python"}), encoding="utf-8")
    km = KernelManager(kernel_name="batch-test", transport="ipc", connection_file=str(folder / "kernel.json"),
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder / "kernels")]))
    km.start_kernel(cwd=str(folder), env={**os.environ, "IPYTHONDIR": str(folder / "ipython")})
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=CELL_TIMEOUT_S)
        book = Notebook(km, client, folder)
        book.first_import = book.run("import batch")
        yield book
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)


def frame_cell(sim_url: str, output: Path, rows: int, **options: Any) -> str:
    """A cell a data scientist would write: a DataFrame in, run_frame, the count of rows answered printed."""
    model = {"provider": "local", "name": "glm-4-flash", "base_url": sim_url, "params": {"max_tokens": 64}}
    return f"""
import pandas as pd
frame = pd.DataFrame({{"text": [f"review number {{i}}" for i in range({rows})]}})
answered = batch.run_frame(frame, template="Classify: {{text}}", model={model!r}, output={str(output)!r},
                           **{options!r})
print((answered["status"] == "ok").sum())
"""


def test_import_batch_in_a_notebook_without_ipywidgets_prints_nothing(notebook):
    assert notebook.run("import importlib.util; print(importlib.util.find_spec('ipywidgets'))").stdout == "None\n"
    assert notebook.first_import.error is None and notebook.first_import.status == "ok"
    assert notebook.first_import.stderr == "" and notebook.first_import.stdout == ""


def test_run_frame_inside_the_kernels_running_loop(notebook, sim, tmp_path):
    assert notebook.run("import asyncio; print(asyncio.get_running_loop().is_running())").stdout == "True\n"
    cell = notebook.run(frame_cell(sim.url, tmp_path / "answers.parquet", 30))
    assert cell.error is None and cell.stdout == "30\n"
    assert sim.stats()["requests"] == 30
    assert "30/30" in cell.stderr and "IProgress" not in cell.stderr  # tqdm's text bar: ipywidgets is missing


def test_the_stop_button_stops_the_run_and_the_next_run_pays_nothing_twice(notebook, start_sim, tmp_path):
    sim = start_sim(latency_ms=100)  # 300 rows, 4 at a time: the interrupt after 40 requests lands mid-run
    cell = frame_cell(sim.url, tmp_path / "answers.parquet", 300, progress=False, limits={"concurrency": 4})
    running = notebook.start(cell)
    wait_until(lambda: sim.stats()["requests"] >= 40, "40 requests from the kernel")
    notebook.km.interrupt_kernel()
    stopped = notebook.outcome(running)
    assert stopped.error is not None and stopped.error["ename"] == "Interrupted", stopped
    state = notebook.run(f"import json; print(json.dumps(batch.status({str(tmp_path / 'answers.parquet')!r})))")
    status = json.loads(state.stdout)
    assert status["failed"] == 0 and 0 < status["pending"] < 300
    assert sim.stats()["requests"] == status["ok"]  # the requests in flight finished and were kept

    sim.reconfigure(latency_ms=0)
    resumed = notebook.run(cell)
    assert resumed.error is None and resumed.stdout == "300\n"
    assert sim.stats()["requests"] == 300 and max(sim.stats()["by_prompt"].values()) == 1  # nothing paid twice


def test_handle_signals_in_a_notebook_gives_the_programs_handlers_back(notebook, sim, tmp_path):
    job = {"name": "signals", "input": {"path": str(tmp_path / "in.csv"), "id_column": "id"},
           "prompt": {"template": "Classify: {text}"},
           "model": {"provider": "local", "name": "glm-4-flash", "base_url": sim.url},
           "output": {"path": str(tmp_path / "out.parquet")}}
    (tmp_path / "in.csv").write_text("id,text\n" + "".join(f"r{i},review {i}\n" for i in range(12)), encoding="utf-8")
    cell = notebook.run(f"""
import signal
def programs_own(signum, frame):
    pass
signal.signal(signal.SIGTERM, programs_own)
sigint_before = signal.getsignal(signal.SIGINT)
ran = await batch.arun({job!r}, handle_signals=True, progress=False)  # on the kernel's loop, in the main thread
again = batch.run({job!r}, handle_signals=True, progress=False)  # in a worker thread: the kernel's loop is running
print(ran.ok, again.ok, signal.getsignal(signal.SIGTERM) is programs_own,
      signal.getsignal(signal.SIGINT) is sigint_before)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
""")
    assert cell.error is None, cell
    assert cell.stdout == "12 12 True True\n"
