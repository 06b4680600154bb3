"""`python -m batch` and the `batch` command."""

import gc
import sys

from batch.errors import EXIT_INTERRUPTED  # a module of constants: no imports of its own
from batch.interrupts import take_signals  # the standard library's imports only


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
        return EXIT_INTERRUPTED
    code = command_line()
    # Arrow readers left for the interpreter's last teardown can abort it ("terminate called without an active
    # exception", SIGABRT; apache/arrow#34314): collected here, their threads are joined while Arrow still stands.
    gc.collect()
    return code


if __name__ == "__main__":
    sys.exit(main())
