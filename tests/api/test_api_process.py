"""The process a run from Python shares: its signal handlers, its logging, its other runs, its output streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import until, wait_until
from hypothesis import given
from hypothesis import strategies as st
from test_api import ctrl_c, local_model, reviews, when

import batch
from batch.checkpoint.guard import RunLock


def test_handle_signals_gives_the_programs_own_handlers_back(start_sim, make_job):
    sim = start_sim(latency_ms=20)
    job = make_job(sim, rows=[{"review_id": f"g{i}", "text": f"t {i}"} for i in range(200)])
    taken: list[int] = []

    def programs_own(signum: int, frame: object) -> None:
        taken.append(signum)

    before = {sig: signal.signal(sig, programs_own) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        when(lambda: sim.stats()["requests"] >= 20, ctrl_c)
        with pytest.raises(batch.Interrupted) as interrupted:
            batch.run(job, progress=False, handle_signals=True)
        assert interrupted.value.result.stopped == "interrupted by SIGINT" and taken == []  # the run's, meanwhile
        assert {sig: signal.getsignal(sig) for sig in before} == dict.fromkeys(before, programs_own)
        signal.raise_signal(signal.SIGTERM)
        assert taken == [signal.SIGTERM]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.asyncio
async def test_arun_with_handle_signals_gives_the_loops_and_the_programs_handlers_back(sim, make_job):
    job = make_job(sim)
    loop = asyncio.get_running_loop()
    loops_own = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, loops_own.set)
    programs_own = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert (await batch.arun(job, progress=False, handle_signals=True)).ok == 12
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)  # else the signal below ends pytest
        signal.raise_signal(signal.SIGTERM)
        await asyncio.wait_for(loops_own.wait(), 30)  # the loop's handler took it
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGINT, programs_own)


def logged_lines(log_file: Path) -> list[str]:
    """batch.log's lines without their time: "LEVEL message"."""
    return [line.split(" batch ", 1)[1] for line in log_file.read_text(encoding="utf-8").splitlines()]


def kinds(lines: list[str]) -> set[str]:
    """The lines with their numbers blanked: which lines, not what they counted."""
    return {re.sub(r"\d+(\.\d+)?", "N", line) for line in lines}


def test_a_run_from_python_logs_the_command_lines_info_lines(start_sim, make_job, run_cli, tmp_path, fresh_logging):
    sim = start_sim(latency_ms=200)  # 12 rows, 4 at a time: at least 0.6 s, so a progress line every 0.25 s tick
    job = make_job(sim)
    values = yaml.safe_load(job.read_text(encoding="utf-8"))
    values["input"]["path"] = str(tmp_path / values["input"]["path"])
    values["output"]["path"] = str(tmp_path / "python" / "result.parquet")
    assert batch.run(values, progress_interval=0).ok == 12  # first: the command line configures logging
    from_python = logged_lines(tmp_path / "python" / "result.checkpoint" / "batch.log")
    assert fresh_logging.level == logging.NOTSET and not fresh_logging.handlers  # the program's, as it was

    code, _, _ = run_cli("run", job, "--progress-interval", "0")
    assert code == 0
    from_the_command_line = logged_lines(tmp_path / "out" / "result.checkpoint" / "batch.log")
    assert any(line.startswith("INFO progress ") for line in from_python)
    assert kinds(from_python) == kinds(from_the_command_line)


@pytest.mark.asyncio
async def test_two_runs_at_once_in_one_process_each_write_their_own_batch_log(start_sim, tmp_path, fresh_logging):
    stuck = start_sim(latency_ms=60_000)  # the first run's requests stay in flight until it is stopped
    answering = start_sim(latency_ms=100)
    first_log = tmp_path / "first.checkpoint" / "batch.log"
    second_log = tmp_path / "second.checkpoint" / "batch.log"
    first = asyncio.create_task(batch.arun_frame(
        reviews(5), template="Classify: {text}", model=local_model(stuck), output=tmp_path / "first.parquet",
        progress_interval=0))
    await until(lambda: stuck.stats()["requests"] > 0, "the first run's requests")
    # Meanwhile a second job, from another thread; its model has no price, which it warns of.
    second = await asyncio.to_thread(
        batch.run_frame, reviews(12), template="Classify: {text}", output=tmp_path / "second.parquet",
        model={**local_model(answering), "name": "unpriced-model"}, progress_interval=0,
        limits={"concurrency": 2})  # 12 rows, 2 at a time: at least 0.6 s, a progress line at each tick
    assert (second["status"] == "ok").all()
    first.cancel()
    await until(lambda: "cancellation: taking no more rows" in first_log.read_text(encoding="utf-8"),
                "the first run taking the cancellation")
    first.cancel()  # the second stops it at once
    with pytest.raises(asyncio.CancelledError):
        await first

    first_lines, second_lines = logged_lines(first_log), logged_lines(second_log)
    assert any(line.startswith("INFO progress 0/5 rows") for line in first_lines)
    assert any(line.startswith("INFO progress ") and "/12 rows" in line for line in second_lines)
    assert any("no known price for model unpriced-model" in line for line in second_lines)
    assert not any("/12 rows" in line or "unpriced-model" in line for line in first_lines)
    assert not any("/5 rows" in line or "cancellation" in line for line in second_lines)


@pytest.mark.asyncio
async def test_the_same_output_twice_at_once_in_one_process_is_locked_and_the_first_runs_frame_kept(start_sim,
                                                                                                    tmp_path):
    sim = start_sim(latency_ms=60_000)  # the first run's requests stay in flight until it is stopped
    settings = {"template": "Classify: {text}", "model": local_model(sim), "output": tmp_path / "o.parquet",
                "progress": False}
    first = asyncio.create_task(batch.arun_frame(reviews(5), **settings))
    await until(lambda: sim.stats()["requests"] > 0, "the first run's requests")
    files = [tmp_path / "o.input.parquet", tmp_path / "o.job.yaml"]
    written = [path.read_bytes() for path in files]

    another_frame = reviews(8)
    with pytest.raises(batch.LockedError, match=r"o\.checkpoint: another run of this job is alive \(pid \d+: this "
                                                r"process\); wait for it or stop it"):
        await asyncio.to_thread(batch.run_frame, another_frame, **settings)  # another thread
    with pytest.raises(batch.LockedError, match="another run of this job is alive"):
        await batch.arun_frame(another_frame, **settings)  # the same loop
    with pytest.raises(batch.LockedError, match="another run of this job is alive"):
        await asyncio.to_thread(batch.run, tmp_path / "o.parquet", progress=False)
    assert [path.read_bytes() for path in files] == written  # the live run's input and job file as they were

    first.cancel()
    await until(lambda: "cancellation: taking no more rows" in (tmp_path / "o.checkpoint" / "batch.log").read_text(
        encoding="utf-8"), "the first run taking the cancellation")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert sim.stats()["requests"] == 5


PROGRAM = """
import sys
{logging}
import pandas as pd
import batch
frame = pd.DataFrame({{"text": [f"review {{i}}" for i in range(12)]}})
model = {{"provider": "local", "name": "glm-4-flash", "base_url": sys.argv[1]}}
answered = batch.run_frame(frame, template="Classify: {{text}}", model=model, output=sys.argv[2],
                           progress_interval=0, limits={{"concurrency": 4}})
print((answered["status"] == "ok").sum())
"""


def read_all(terminal: int) -> str:
    """What a process wrote to a pseudo-terminal, once it has ended (Linux answers EIO at the end)."""
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := os.read(terminal, 4096):
            chunks.append(chunk)
    os.close(terminal)
    return b"".join(chunks).decode()


def test_progress_from_a_script_writing_to_a_pipe_is_the_command_lines_lines(start_sim, tmp_path):
    sim = start_sim(latency_ms=200)  # 12 rows, 4 at a time: at least 0.6 s, so a progress line at each 0.25 s tick
    # stderr a pipe (where a bar would be drawn), stdout a terminal: it is stderr that decides.
    scripts = {"bare": "", "warnings_only": "import logging; logging.basicConfig(level=logging.WARNING)"}
    terminal, its_end = os.openpty()
    started = {}
    for name, setup in scripts.items():  # both at once: each spends most of its time importing
        script = tmp_path / f"{name}.py"
        script.write_text(PROGRAM.format(logging=setup), encoding="utf-8")
        stdout = its_end if name == "bare" else subprocess.PIPE
        started[name] = subprocess.Popen([sys.executable, str(script), sim.url, f"{name}.parquet"],
                                         stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    os.close(its_end)
    done = {name: process.communicate(timeout=120) for name, process in started.items()}
    assert {name: process.returncode for name, process in started.items()} == dict.fromkeys(scripts, 0), done
    assert read_all(terminal) == "12\r\n" and done["warnings_only"][0] == "12\n"

    err = done["bare"][1]  # a script that configured no logging: the command line's lines on stderr
    assert "row/s" not in err and "%|" not in err  # no tqdm bar
    progress = [line for line in err.splitlines() if " batch INFO progress " in line]
    assert progress and all(re.fullmatch(r"\S+ \S+ batch INFO progress \d+/12 rows .*", line) for line in progress)
    assert done["warnings_only"][1] == ""  # the program shows warnings only: its choice; batch.log has them
    in_the_log = logged_lines(tmp_path / "warnings_only.checkpoint" / "batch.log")
    assert any(line.startswith("INFO progress ") and "/12 rows" in line for line in in_the_log)


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.booleans(), st.text(max_size=3),
                 st.none(), st.decimals(allow_nan=False)))
def test_progress_interval_is_seconds_zero_or_more_or_one_config_error(interval):
    """Checked before the job is read: a good interval lets the call go on to the job (missing here)."""
    seconds = isinstance(interval, int | float) and not isinstance(interval, bool)
    good = seconds and 0 <= interval < float("inf")
    with pytest.raises(batch.ConfigError) as refused:
        batch.run("no-such-job.yaml", progress_interval=interval)
    if good:
        assert "no-such-job.yaml" in str(refused.value)
    else:
        assert str(refused.value) == f"progress_interval is seconds, 0 or more, not {interval!r}"


def test_a_keyboard_interrupt_while_run_frame_writes_its_input_leaves_the_job_free(sim, tmp_path):
    settings = {"template": "Classify: {text}", "model": local_model(sim), "output": tmp_path / "o.parquet",
                "progress": False}
    os.mkfifo(tmp_path / ".o.input.parquet.tmp")  # where the input is written first: the write waits for a reader
    lock = RunLock(tmp_path / "o.checkpoint")
    when(lambda: lock.holder() is not None, ctrl_c)  # the lock taken, the write waiting: the stop button
    with pytest.raises(KeyboardInterrupt) as interrupted:
        batch.run_frame(reviews(5), **settings)
    assert lock.holder() is None  # though the traceback, kept as a notebook keeps it, holds the call's frames
    assert not (tmp_path / ".o.input.parquet.tmp").exists() and sim.stats()["requests"] == 0
    assert (batch.run_frame(reviews(5), **settings)["status"] == "ok").all()
    del interrupted


@pytest.mark.parametrize("interval", ["nan", "inf", "-inf", "-1", "Infinity"])
def test_the_command_line_refuses_a_progress_interval_that_is_not_seconds_in_one_line(capsys, interval):
    from batch.cli import main

    with pytest.raises(SystemExit) as exited:  # argparse's own exit, as for any bad option
        main(["run", "no-such-job.yaml", f"--progress-interval={interval}"])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    assert err.strip().splitlines()[-1] == (f"batch run: error: argument --progress-interval: is seconds, 0 or more, "
                                            f"not '{interval}'")


ASYNC_PROGRAM = """
import asyncio
import sys

import pandas as pd

import batch


async def main():
    frame = pd.DataFrame({{"text": [f"review {{i}}" for i in range(40)]}})
    model = {{"provider": "local", "name": "glm-4-flash", "base_url": sys.argv[1]}}
    call = batch.arun_frame(frame, template="Classify: {{text}}", model=model, output=sys.argv[2],
                            handle_signals=True, progress=False, limits={{"concurrency": 2}})
    try:
        {awaited}
    except batch.RunInterrupted as stopped:
        print(stopped.result.stopped, stopped.exit_code, stopped.result.ok + stopped.result.pending)


asyncio.run(main())
"""


@pytest.mark.parametrize("awaited", ["await call", "await asyncio.create_task(call)"])
def test_a_signal_stops_an_async_run_with_an_exception_the_program_catches_awaited_or_in_a_task(
        start_sim, tmp_path, awaited):
    """With handle_signals=True a SIGTERM stops arun_frame gracefully, and the program catches RunInterrupted, an
    Exception: a KeyboardInterrupt raised in a task would leave the event loop past its `except`, in a traceback."""
    sim = start_sim(latency_ms=300)  # 40 rows, 2 at a time: about 6 s, the signal comes well before the end
    script = tmp_path / "program.py"
    script.write_text(ASYNC_PROGRAM.format(awaited=awaited), encoding="utf-8")
    process = subprocess.Popen([sys.executable, str(script), sim.url, "out.parquet"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        wait_until(lambda: sim.stats()["requests"] >= 2, "the run's first requests")
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in err, err
    assert out == "interrupted by SIGTERM 130 40\n"


GIVING_BACK_PROGRAM = """
import signal
import sys

import batch

taken = []
signal.signal(signal.SIGTERM, lambda signum, frame: taken.append(signum))
giving_back = False


def at_every_step(frame, event, arg):
    # While the run gives the signals back: a SIGTERM after each step it takes (a handler set, asyncio's own
    # removal returning), so every instant between two of them is tried once.
    global giving_back
    if event == "call" and frame.f_code.co_name == "_remove_signal_handlers":
        giving_back = True
    elif event == "return" and frame.f_code.co_name == "_remove_signal_handlers":
        giving_back = False
        signal.raise_signal(signal.SIGTERM)
    elif giving_back and (event == "c_return" and getattr(arg, "__name__", "") in ("signal", "set_wakeup_fd")
                          or event == "return" and frame.f_code.co_name == "remove_signal_handler"):
        signal.raise_signal(signal.SIGTERM)


sys.setprofile(at_every_step)
result = batch.run(sys.argv[1], progress=False, handle_signals=True)
sys.setprofile(None)
print(result.ok, bool(taken))
"""


def test_a_sigterm_while_the_run_gives_the_handlers_back_never_finds_the_default_in_place(make_job, sim, tmp_path):
    """The program's own SIGTERM handler goes back before the run's is taken away: asyncio's remove_signal_handler
    would put the default in between, and a SIGTERM then killed the program outright."""
    job = make_job(sim)
    script = tmp_path / "program.py"
    script.write_text(GIVING_BACK_PROGRAM, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), str(job)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, "12 True\n"), done.stderr
