"""`python -m batch` and the `batch` command."""

import atexit
import os
import sys

from batch.errors import EXIT_INTERRUPTED  # a module of constants: no imports of its own
from batch.interrupts import take_signals, taken_early  # the standard library's imports only


def main() -> int:
    """The command line, with SIGTERM ending it as Ctrl-C does from the start: one line, exit 130 (batch.cli).

    Set before the imports (~0.6 s) and kept through the input's scan (seconds on a large file), until a run puts
    its own handlers in place (batch.runner) and gives these back after them. Without it SIGTERM kills the
    process silently there, and Ctrl-C prints a traceback. A signal whose KeyboardInterrupt Python dropped on its
    way is acted on where the command next asks (batch.interrupts).
    """
    try:
        take_signals()
        from batch.cli import main as command_line
    except KeyboardInterrupt:
        try:
            print("batch: interrupted", file=sys.stderr)
        except OSError:  # nobody reads stderr any more
            pass
        _exit_without_teardown(EXIT_INTERRUPTED)
    code = command_line()
    # The command is done: the process ends without the interpreter's teardown. Arrow's thread pools do not always
    # survive it: one `batch status` in ~50 ended in SIGABRT ("terminate called without an active exception",
    # exit 134) after printing its status, its work done (apache/arrow#34314; a gc.collect() here first did not
    # help). What a teardown does that matters is done first: the atexit functions (logging's shutdown, which
    # flushes and closes batch.log; the libraries' own), unless a signal stopped the command early (then as
    # before: nothing of it is left to finish), and the standard streams' flush.
    if not taken_early():
        atexit._run_exitfuncs()
    _exit_without_teardown(code)
    return code  # not reached


def _exit_without_teardown(code: int) -> None:
    """The process ends now, skipping the interpreter's teardown: for every command once it is done (main says why),
    and at once for one stopped by a signal before a run.

    A signal during the imports or the input's scan can leave an Arrow thread about to call into Python (the CSV
    reader reads ahead from a Python file object on Arrow's I/O threads; an extension half imported). At teardown
    Python ends such a thread with pthread_exit, whose unwinding through Arrow's C++ frames is std::terminate:
    SIGABRT and "terminate called without an active exception" instead of exit 130 (apache/arrow#34314, #45017).
    Nothing of the command is left to do: its `finally` blocks ran as the KeyboardInterrupt went up, and it had
    written nothing a teardown would finish; only the standard streams are flushed.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, a stream closed
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
