"""The seam between a run and the way it gets answers.

A run (batch/runner.py) owns the lifecycle: the lock, the checkpoint, the resume state, the
signals, the final file and the summary. It hands the rows it sends to an `Answerer`, which gets
their answers and gives each row's record back through `record`. The online pool
(batch/online/answerer.py) is one; a provider's Batch API (batch/batch_api/answerer.py) is the other. Both stop
through the same `Stop`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from batch.errors import CheckpointWriteError
from batch.input.reader import Row
from batch.records import Record

log = logging.getLogger("batch")

Messages = list[dict[str, Any]]


@dataclass(slots=True)
class Pending:
    """A row to send, with the messages built from it."""

    row: Row
    messages: Messages


class Answerer(Protocol):
    """Gets the answers for the rows a run sends."""

    async def answer(self, rows: AsyncIterator[Pending], record: Callable[[Record], None]) -> None:
        """Answer `rows` (until they end or the run stops), giving each row's record to `record`, which raises
        CheckpointWriteError when the record cannot be kept."""

    def cancel(self) -> None:
        """Stop at once: requests in flight are dropped, and their rows stay pending."""


@dataclass
class Stop:
    """Why a run stops early, if it does: the first reason given is the one reported."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None
    exit_code: int | None = None
    write_error: CheckpointWriteError | None = None  # the checkpoint cannot be written: stop at once

    @property
    def asked(self) -> bool:
        return self.event.is_set()

    def note(self, reason: str, exit_code: int) -> None:
        """Record why the run will end early without stopping it (the budget: cached rows are still answered)."""
        if self.reason is None:
            self.reason, self.exit_code = reason, exit_code
            log.error("stopping: %s", reason)

    def now(self, reason: str, exit_code: int) -> None:
        """Take no more rows; requests in flight may finish."""
        self.note(reason, exit_code)
        self.event.set()

    def halt(self, error: CheckpointWriteError) -> None:
        """A checkpoint write failed: nothing more may be sent (the answerer is cancelled by the caller)."""
        if self.write_error is None:
            self.write_error = error
        self.event.set()
