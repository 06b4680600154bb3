"""Telling an outage from failing rows: the circuit breaker that stops sending while the endpoint is down.

Without it, a server that is down (connection refused, 5xx, an HTML error page for every request)
fails every row after its retries, and a long job burns through its whole input in failures. The
breaker watches every attempt. When the endpoint has answered nothing for a while and the attempts
of more than one row keep failing at the connection or server level, it opens: no row is sent or
retried, one request at a time probes the endpoint at a growing interval, and the first answer
closes it again. A row that fails alone (the others are answered) is that row's failure, never an
outage, so one poison row cannot stop a job.

The breaker is a plain state machine on a clock (a callable returning seconds), so its rules are
tested with a fake clock; the pool does the waiting.
"""

from __future__ import annotations

from collections.abc import Callable

# Failures that say nothing about the row, only that the endpoint did not answer as an API would.
OUTAGE_CLASSES = frozenset({"connection", "timeout", "server_error", "bad_response"})
TRIP_AFTER_FAILURES = 5  # failed attempts in a row (since the last answer), of at least TRIP_ROWS rows
TRIP_AFTER_S = 10.0  # ... with nothing answered for this long
TRIP_ROWS = 2


class Unreachable(Exception):
    """The outage lasted longer than retry.max_outage_s: the run stops, every row not answered stays pending."""


class Breaker:
    """Closed (send freely) or open (one probe at a time, at a growing interval, until an answer comes)."""

    def __init__(self, clock: Callable[[], float], max_outage_s: float, first_probe_s: float,
                 max_probe_s: float) -> None:
        self.clock = clock
        self.max_outage_s = max_outage_s
        self.first_probe_s = first_probe_s
        self.max_probe_s = max(max_probe_s, first_probe_s)
        self.open = False
        self.failures = 0  # failed attempts since the last answer
        self.last_error = ""
        self.probes = 0
        self._failing_rows: set[int] = set()
        self._answered_at = clock()  # the run's start counts as an answer: an outage is measured from here
        self._probing = False
        self._probe_interval = first_probe_s
        self._next_probe_at = 0.0

    @property
    def quiet_s(self) -> float:
        """Seconds since the endpoint last answered."""
        return self.clock() - self._answered_at

    @property
    def next_probe_in(self) -> float:
        return max(0.0, self._next_probe_at - self.clock())

    def answered(self) -> float | None:
        """Anything the API said (a success, a row error, a 429): the endpoint is up.

        Returns how long nothing had answered when this ends an outage, else None.
        """
        now = self.clock()
        quiet_s = now - self._answered_at
        self._answered_at = now
        if self.failures:
            self.failures = 0
            self._failing_rows.clear()
        if not self.open:
            return None
        self.open = self._probing = False
        return quiet_s

    def failed(self, row: int, error: str, probe: bool = False) -> bool:
        """An attempt of `row` failed at the connection or server level. True if the breaker is open now."""
        self.failures += 1
        self._failing_rows.add(row)
        self.last_error = error
        if self.open:
            if probe:
                self._probing = False
                self._probe_interval = min(self._probe_interval * 2, self.max_probe_s)
                self._next_probe_at = self.clock() + self._probe_interval
            return True
        if self.failures >= TRIP_AFTER_FAILURES and self.quiet_s >= TRIP_AFTER_S:
            self._trip_if_not_one_row()
        return self.open

    def gave_up(self) -> bool:
        """A row's retries ran out on its last failure: an outage if other rows fail too (True: keep the row)."""
        if not self.open:
            self._trip_if_not_one_row()
        return self.open

    def probe_abandoned(self) -> None:
        """The probe was cut off without a verdict (the run is stopping): another may go."""
        self._probing = False

    def admit(self) -> float | None:
        """While open, before a request: None to send it as the probe, else the seconds to wait first.

        Raises Unreachable once nothing has answered for max_outage_s.
        """
        now = self.clock()
        deadline = self._answered_at + self.max_outage_s
        if now >= deadline:
            raise Unreachable(f"the endpoint is unreachable: nothing answered for {now - self._answered_at:.0f} s "
                              f"(retry.max_outage_s {self.max_outage_s:g}); last error: {self.last_error}")
        if self._probing:
            return deadline - now  # woken earlier by the probe's verdict
        if now < self._next_probe_at:
            return min(self._next_probe_at, deadline) - now
        self._probing = True
        self.probes += 1
        return None

    def _trip_if_not_one_row(self) -> None:
        if len(self._failing_rows) >= TRIP_ROWS:
            self.open = True
            self._probing = False
            self._probe_interval = self.first_probe_s
            self._next_probe_at = self.clock() + self.first_probe_s
