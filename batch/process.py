"""The command line's process-wide settings, in one place. Only the CLI enters them: a program that imports
batch (a notebook, a script) keeps its own allocator and imports as they are.

Most are about memory: a run holds ~5 bytes per input row, and the rest of its peak is what the
allocators keep (see the README's Performance section). One is about the standard streams, whose reader may leave.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import pyarrow as pa

_tuned = False


class _NoPandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name.partition(".")[0] == "pandas":
            raise ImportError("pandas is kept out of this run (batch.process.command_line_process)")


_NO_PANDAS = _NoPandas()


@contextmanager
def command_line_process() -> Iterator[None]:
    """The command line's settings for as long as it runs a command.

    - Arrow's system allocator: its default (mimalloc) keeps freed pages for reuse, so each batch's buffers
      would stay in the peak; the system allocator hands them back (-30 to -90 MB of peak RSS per run).
    - pandas kept out: pyarrow imports pandas at its first conversion of Python values, only to learn
      pandas' NA and NaT (arrow/python/helpers.cc, InitPandasStaticData) and whether a value is a pandas
      object. A run converts none, and the import costs 0.3 s and 33 MB of peak RSS. pyarrow tries again
      at the next conversion when the import fails, so the block lasts the whole command (parse_json's
      columns are built in Arrow too). A process that has already imported pandas is unaffected.
    - give_back_freed_memory() trims the C heap when asked.
    """
    global _tuned
    allocator = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    if "pandas" not in sys.modules and _NO_PANDAS not in sys.meta_path:
        sys.meta_path.insert(0, _NO_PANDAS)
    _tuned = True
    try:
        yield
    finally:
        _tuned = False
        let_pandas_in()
        pa.set_memory_pool(allocator)


def let_pandas_in() -> None:
    """Lift the block on pandas (at the end of a command)."""
    if _NO_PANDAS in sys.meta_path:
        sys.meta_path.remove(_NO_PANDAS)


def give_back_freed_memory() -> None:
    """Hand the heap pages freed so far back to the system (glibc's malloc_trim), under the command line only.

    glibc keeps them, and later buffers (the checkpoint merge's, after the final file) do not fit in their
    holes: 173 -> 164 MB of peak RSS for a finished million-row job.
    """
    if not _tuned:
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _ReaderMayLeave:
    """A standard stream whose reader may go away (`batch status | head -1`, a closed terminal).

    Python ignores SIGPIPE, so a write to a pipe nobody reads raises BrokenPipeError wherever it happens: in a log
    line mid-run, in the progress bar, in the summary. Here the first one points the stream's file descriptor at
    os.devnull, as Python's docs advise (library/signal, "Note on SIGPIPE"), and the text is dropped: the command
    goes on and ends with its own exit code, and the interpreter's last flush at exit has nothing to fail on.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def readers_may_leave() -> Iterator[None]:
    """stdout and stderr, for as long as a command runs, taking a reader that went away quietly (_ReaderMayLeave)."""
    given = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _ReaderMayLeave(sys.stdout), _ReaderMayLeave(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = given
