"""Errors a user can cause or meet, each with the exit code the CLI returns for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_JOB_FATAL = 3
EXIT_LOCKED = 4
EXIT_BUDGET = 5
# Batch API mode: batches are still being worked on at the provider; run again later (or use --wait).
EXIT_BATCHES_LIVE = 6
# batch itself cannot go on: an unexpected error (its traceback goes to batch.log), or the checkpoint
# can no longer be written. Not 1, which means "complete, some rows failed". 70 is EX_SOFTWARE (sysexits.h).
EXIT_INTERNAL = 70
# A server the job needs (its object store, its Redis) did not answer before anything was done: the same command may
# succeed later, unlike a mistake (2). 75 is EX_TEMPFAIL (sysexits.h); an orchestrator retries it.
EXIT_UNREACHABLE = 75
EXIT_INTERRUPTED = 130
# What each exit code tells the one who ran the command (the docs' table of exit codes is written from it).
EXIT_MEANINGS = {
    EXIT_OK: "Every row is ok; or a --limit run sent what it was asked to and rows are still pending.",
    EXIT_ROWS_FAILED: "The job is complete, but some rows failed: each one's error_class and error say why; "
                      "--retry-failed sends again those whose error may have gone away.",
    EXIT_BAD_INPUT: "A mistake in the command line, the job file, its input, its output path or the environment (a "
                    "missing API key), or a checkpoint made with other settings: one line names the file, line, key "
                    "or row. Fix it and run again.",
    EXIT_JOB_FATAL: "The API refused the whole job (a bad key, arrears, an unknown model, a quota), or the endpoint "
                    "answered nothing for retry.max_outage_s: the rows not answered stay pending.",
    EXIT_LOCKED: "Another run of the same job is alive (its lock is held): nothing was done.",
    EXIT_BUDGET: "The budget is reached: nothing that could cross it was sent; the pending rows wait for a larger "
                 "budget.",
    EXIT_BATCHES_LIVE: "Batch API: batches of the job are still being worked on at the provider; what finished is "
                       "merged. Run again later, or use --wait.",
    EXIT_INTERNAL: "batch cannot go on: the checkpoint or the final file cannot be written, a checkpoint part was "
                   "found damaged, or a defect in batch (its traceback goes to batch.log). Answers received are kept.",
    EXIT_UNREACHABLE: "A server the job needs did not answer (its object store, or its Redis under limits.shared): "
                      "nothing was sent or written. Run again once it answers; a Kubernetes Job retries it.",
    EXIT_INTERRUPTED: "Stopped by Ctrl-C or SIGTERM: the checkpoint is kept, and a rerun resumes.",
}


class BatchError(Exception):
    """A problem reported to the user as one line, never as a traceback."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BatchError):
    """The job file, its input or the environment is wrong: fix it and run again."""

    exit_code = EXIT_BAD_INPUT


class InputChangedError(ConfigError):
    """The input file was edited, replaced or deleted while batch was reading it: rows read before and after the
    change must not be taken for one table."""


class UnreachableError(BatchError):
    """A server the job needs did not answer (a connection refused or timed out, its name not resolved) before
    anything was sent or written: not the job's mistake, and a later run may find it up."""

    exit_code = EXIT_UNREACHABLE


class JobFatalError(BatchError):
    """The API refuses the whole job (bad key, arrears, unknown model, quota)."""

    exit_code = EXIT_JOB_FATAL


class LockedError(BatchError):
    """Another run of the same job is alive (cron started one while the last still runs)."""

    exit_code = EXIT_LOCKED


class CheckpointWriteError(BatchError):
    """The checkpoint can no longer be written (folder gone, disk full, read-only): the run stops at once."""

    exit_code = EXIT_INTERNAL


class CheckpointReadError(BatchError):
    """A checkpoint part cannot be had from its store (a file that cannot be opened, a store that does not answer):
    not damage, so nothing is set aside; a rerun once it can be read carries on."""

    exit_code = EXIT_INTERNAL


class OutputWriteError(BatchError):
    """The final file cannot be written (a full disk, a read-only folder): the run stops there, every answer kept
    in the checkpoint, and a rerun writes the file without sending anything again."""

    exit_code = EXIT_INTERNAL


class CheckpointDamagedError(BatchError):
    """A checkpoint part turned out damaged after the run had counted its records: it was moved
    aside, and a new run sends the rows it held."""

    exit_code = EXIT_INTERNAL


# Whether the code running was called from Python (batch.api) rather than from the command line: a hint then
# says what to do in Python (a run option as the keyword argument it is there). A context variable: each run's
# tasks and threads (asyncio.to_thread) carry their caller's.
_PYTHON_CALLER: ContextVar[bool] = ContextVar("batch_python_caller", default=False)


def in_callers_words(command_line: str, python: str) -> str:
    """A hint as its reader acts on it: `command_line` for the command line's user, `python` for a Python caller."""
    return python if _PYTHON_CALLER.get() else command_line


def option(name: str, value: str = "True") -> str:
    """A run option as the caller writes it: `--retry-failed` on the command line, `retry_failed=True` from Python
    (`value`: what the keyword is given)."""
    return in_callers_words(f"--{name}", f"{name.replace('-', '_')}={value}")


@contextmanager
def python_caller() -> Iterator[None]:
    """Hints made within are for a Python caller (see `in_callers_words`)."""
    token = _PYTHON_CALLER.set(True)
    try:
        yield
    finally:
        _PYTHON_CALLER.reset(token)


def os_reason(exc: OSError) -> str:
    """An OS error as a short phrase. pyarrow's carry the path and errno in their text, Python's a filename."""
    if exc.strerror and exc.filename is None and "Detail:" not in exc.strerror:
        return exc.strerror
    return os.strerror(exc.errno) if exc.errno else str(exc)


def read_reason(exc: OSError | UnicodeDecodeError) -> str:
    """Why a text file could not be read, as a short phrase."""
    return "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else os_reason(exc)
