"""The command line's process-wide settings, in one place. Only the CLI enters them: a program that imports
batch (a notebook, a script) keeps its own allocator and imports as they are.

Each one is about memory: a run holds ~5 bytes per input row, and the rest of its peak is what the
allocators keep (see the README's Performance section).
"""

from __future__ import annotations

import ctypes
import importlib.abc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
