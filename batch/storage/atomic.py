"""Whole-file writes that a crash cannot leave half done: a temp file beside the target, fsynced,
renamed over it, and the folder fsynced so the rename itself survives a power cut."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temp file that then replaces `path`; on any failure the temp file is removed."""
    tmp = temp_path(path)
    try:
        write(tmp)
        place(tmp, path, sync_folder=False)
    except BaseException:
        with contextlib.suppress(OSError):  # the folder may be gone or read-only: the first error is the one to tell
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def temp_path(path: Path) -> Path:
    """Where a file is written before it replaces `path` (a dot file beside it, removed at a checkpoint's open)."""
    return path.with_name(f".{path.name}.tmp")


def place(tmp: Path, path: Path, sync_folder: bool = True) -> None:
    """A temp file filled elsewhere (written in steps, e.g. streamed) put in place: fsynced, renamed over `path`,
    and (`sync_folder`) the folder fsynced so the rename survives a power cut."""
    with open(tmp, "rb") as written:
        os.fsync(written.fileno())
    os.replace(tmp, path)
    if sync_folder:
        fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
