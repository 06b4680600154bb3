"""SIGINT and SIGTERM from the command's start until a run takes them (batch.runner): one line and exit 130.

Each raises KeyboardInterrupt where the program is, and is noted. Python drops a KeyboardInterrupt raised while a
finalizer runs (a `__del__`, a generator closed as it is freed, a garbage collector's callback: "Exception ignored
in ..."), and the signal with it: the command would go on as if none came. So the places that hand over to the
next step ask `taken_early()` (the command line after the input's scan, a run once its own handlers are in), and a
KeyboardInterrupt dropped so is not reported either: it is acted on there. No imports but the standard library's:
`python -m batch` sets this up before its own imports.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_taken: list[str] = []  # the signals this handler took, by name
_drops_unraisable = sys.unraisablehook


def interrupt(signum: int, frame: object) -> None:
    """The handler: note the signal, and stop what runs now."""
    _taken.append(signal.Signals(signum).name)
    raise KeyboardInterrupt


def take_signals() -> None:
    """SIGINT and SIGTERM handled by `interrupt` from now on (until a run puts its own in place, and after it)."""
    _taken.clear()
    for sig in SIGNALS:
        signal.signal(sig, interrupt)
    sys.unraisablehook = _unraisable


def taken_early() -> str | None:
    """The first signal `interrupt` took, by name, or None."""
    return _taken[0] if _taken else None


def _unraisable(unraisable: Any) -> None:
    """A KeyboardInterrupt of ours that Python dropped in a finalizer is noted already (taken_early): not shown."""
    if not (_taken and isinstance(unraisable.exc_value, KeyboardInterrupt)):
        _drops_unraisable(unraisable)
