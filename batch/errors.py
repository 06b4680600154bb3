"""Errors a user can cause or meet, each with the exit code the CLI returns for it."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_JOB_FATAL = 3
EXIT_LOCKED = 4
EXIT_BUDGET = 5
EXIT_INTERRUPTED = 130


class BatchError(Exception):
    """A problem reported to the user as one line, never as a traceback."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BatchError):
    """The job file, its input or the environment is wrong: fix it and run again."""

    exit_code = EXIT_BAD_INPUT


class JobFatalError(BatchError):
    """The API refuses the whole job (bad key, arrears, unknown model, quota)."""

    exit_code = EXIT_JOB_FATAL


class LockedError(BatchError):
    """Another run of the same job is alive (cron started one while the last still runs)."""

    exit_code = EXIT_LOCKED
