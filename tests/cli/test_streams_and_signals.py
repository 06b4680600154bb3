"""The command's own process: output whose reader went away, and a signal before a run's handlers are in place
(the imports, the input's scan)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import can_make_immutable, checkpoint_of, output_of, start_run, summary_of, wait_until

# Row 3 fails (HTTP 400, code 1214): a complete job with a failed row exits 1, which a closed pipe must not change.
ROWS = [{"review_id": f"r{i}", "text": f"review {i}" + (" [[error:400:1214]]" if i == 3 else "")} for i in range(8)]


def unread_pipe() -> int:
    """The write end of a pipe whose reader is gone (`| head -1` once head has exited): every write fails (EPIPE)."""
    read, write = os.pipe()
    os.close(read)
    return write


def no_error_shown(*texts: str | None) -> None:
    for text in texts:
        for sign in ("Traceback", "internal error", "Broken pipe", "BrokenPipeError"):
            assert sign not in (text or ""), text


@pytest.mark.parametrize("closed", ["stdout", "stderr", "both"])
@pytest.mark.parametrize("command", ["run", "status"])
def test_output_closed_early_changes_nothing_but_what_is_shown(sim, make_job, run_cli, command, closed):
    job = make_job(sim, rows=ROWS)
    if command == "status":
        assert run_cli("run", job)[0] == 1
    gone = unread_pipe()
    streams = {name: gone if closed in (name, "both") else subprocess.PIPE for name in ("stdout", "stderr")}
    try:
        # -v: a debug line per failed row on stderr, mid-run; the summary or the status on stdout.
        done = subprocess.run([sys.executable, "-m", "batch", command, str(job), *(["-v"] if command == "run" else [])],
                              text=True, timeout=60, **streams)  # type: ignore[call-overload]
    finally:
        os.close(gone)
    no_error_shown(done.stdout, done.stderr)
    if command == "run":
        assert done.returncode == 1  # what the run itself says: complete, one row failed
        assert summary_of(job)["exit_code"] == 1
        assert list(output_of(job)["status"]).count("ok") == 7
    else:
        assert done.returncode == 0
    if closed == "stderr":
        assert "ok 7, failed 1" in done.stdout


def test_status_writes_nothing_and_answers_on_a_folder_it_cannot_write(sim, make_job, run_cli, tmp_path):
    if not can_make_immutable(tmp_path):
        pytest.skip("needs root and chattr on a file system that supports it")
    job = make_job(sim, rows=ROWS)
    assert run_cli("run", job)[0] == 1
    folder = checkpoint_of(job)
    subprocess.run(["chattr", "+i", *map(str, folder.iterdir()), str(folder)], check=True)
    try:
        code, out, err = run_cli("status", job)
    finally:
        subprocess.run(["chattr", "-R", "-i", str(folder)], capture_output=True)
    assert (code, err) == (0, "")
    assert "ok 7, failed 1, pending 0" in out and "running now: no" in out


def handles(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler of its own for `sig` (its SigCgt mask in /proc)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return False
    mask = int(status.split("SigCgt:")[1].split()[0], 16)
    return bool(mask >> (sig - 1) & 1)


def reads(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open."""
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def interrupted_with_one_line(process: subprocess.Popen[str], job: Path) -> None:
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert (out, err) == ("", "batch: interrupted\n")
    assert not checkpoint_of(job).exists()  # stopped before its first write


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_imports_ends_the_command_with_one_line_and_130(make_job, sig):
    job = make_job(rows=ROWS)
    process = start_run(job)
    try:
        # The first thing `python -m batch` does is to handle SIGTERM; the imports take ~0.6 s after it.
        wait_until(lambda: handles(process.pid, signal.SIGTERM), "batch's own SIGTERM handler")
        process.send_signal(sig)
        interrupted_with_one_line(process, job)
    finally:
        process.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_input_scan_ends_the_command_with_one_line_and_130(make_job, sig):
    job = make_job(rows=ROWS)
    lines = (f"r{i},review number {i}" for i in range(300_000))  # a scan of ~0.25 s
    (job.parent / "reviews.csv").write_text("review_id,text\n" + "\n".join(lines) + "\n")
    process = start_run(job)
    try:
        wait_until(lambda: reads(process.pid, job.parent / "reviews.csv") and not checkpoint_of(job).exists(),
                   "the input's scan, before the run's first write")
        process.send_signal(sig)
        interrupted_with_one_line(process, job)
    finally:
        process.kill()


# The command's own entry point, with SIGTERM arriving while a finalizer runs, as the process opens `sys.argv[1]`:
# Python drops a KeyboardInterrupt raised there ("Exception ignored in ..."), so the handler's exception is lost and
# only what the handler noted is left to stop the command.
SIGNAL_IN_A_FINALIZER = """
import signal
import sys

from batch.__main__ import main

arrives_with = sys.argv[1]


class Freed:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)


def arrive(event, args):
    global arrives_with
    if event == "open" and arrives_with is not None and str(args[0]) == arrives_with:
        arrives_with = None
        Freed()  # freed at once: its finalizer runs here


sys.addaudithook(arrive)
sys.argv = ["batch", "run", sys.argv[2]]
sys.exit(main())
"""


@pytest.mark.parametrize("arrives_with", ["the input's scan", "the run's log"])
def test_a_signal_whose_keyboard_interrupt_python_drops_still_stops_the_command(make_job, tmp_path, arrives_with):
    """The window between the early handler and the run's own, made deterministic: the signal comes while a finalizer
    runs, when the input is opened (the scan: nothing written yet) or batch.log (the checkpoint folder made, the
    run's handlers not in yet). The command stops with 130 all the same, and sends nothing; it went on before."""
    job = make_job(rows=ROWS, retry={"max_outage_s": 1})  # unreachable: without the stop, exit 3 after 1 s
    opened = job.parent / "reviews.csv" if arrives_with == "the input's scan" else \
        checkpoint_of(job) / "batch.log"
    driver = tmp_path / "driver.py"
    driver.write_text(SIGNAL_IN_A_FINALIZER, encoding="utf-8")
    process = subprocess.Popen([sys.executable, str(driver), str(opened), str(job)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, out + err
    if arrives_with == "the input's scan":
        assert (out, err) == ("", "batch: interrupted\n")
        assert not checkpoint_of(job).exists()
    else:
        assert "stopped: interrupted by SIGTERM" in out and "Exception ignored" not in err, out + err
        assert summary_of(job)["run"]["attempts"] == 0
