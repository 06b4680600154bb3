"""The outage breaker's rules, on a fake clock: when it opens, how it probes, when it gives up."""

from __future__ import annotations

import pytest

from batch.online.breaker import TRIP_AFTER_FAILURES, TRIP_AFTER_S, Breaker, Unreachable


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, max_outage_s: float = 300, first_probe_s: float = 1, max_probe_s: float = 8) -> Breaker:
    return Breaker(clock, max_outage_s, first_probe_s, max_probe_s)


def fail_rows(breaker: Breaker, count: int, rows: int = 2) -> bool:
    opened = False
    for i in range(count):
        opened = breaker.failed(i % rows, f"connection: refused #{i}")
    return opened


def test_opens_after_enough_failures_of_several_rows_and_enough_quiet_time(clock):
    breaker = make(clock)
    assert not fail_rows(breaker, TRIP_AFTER_FAILURES)  # many failures, but only just now
    clock.advance(TRIP_AFTER_S)
    assert breaker.failed(0, "server_error: HTTP 503")
    assert breaker.open and breaker.last_error == "server_error: HTTP 503"


def test_quiet_time_alone_or_a_few_failures_do_not_open_it(clock):
    breaker = make(clock)
    clock.advance(TRIP_AFTER_S * 10)
    assert not fail_rows(breaker, TRIP_AFTER_FAILURES - 1)
    assert not breaker.open


def test_an_answer_resets_the_count_and_the_quiet_time(clock):
    breaker = make(clock)
    fail_rows(breaker, TRIP_AFTER_FAILURES - 1)
    clock.advance(TRIP_AFTER_S)
    assert breaker.answered() is None  # a 4xx or a 429 counts: the endpoint is up
    assert not breaker.failed(0, "timeout")
    clock.advance(TRIP_AFTER_S - 1)
    assert not fail_rows(breaker, TRIP_AFTER_FAILURES)


def test_one_row_failing_alone_never_opens_it(clock):
    """A poison row (the last one left, or its neighbours are answered) is that row's failure."""
    breaker = make(clock)
    clock.advance(TRIP_AFTER_S * 10)
    assert not fail_rows(breaker, TRIP_AFTER_FAILURES * 3, rows=1)
    assert not breaker.gave_up()


def test_a_row_whose_retries_ran_out_while_another_fails_too_opens_it_at_once(clock):
    breaker = make(clock)
    breaker.failed(0, "connection")
    breaker.failed(1, "connection")
    assert breaker.gave_up()


def test_one_probe_at_a_time_at_a_growing_capped_interval(clock):
    breaker = make(clock, first_probe_s=1, max_probe_s=4)
    fail_rows(breaker, 2)
    assert breaker.gave_up()
    assert breaker.admit() == pytest.approx(1)  # nothing is sent before the first probe is due
    intervals = []
    for _ in range(5):
        wait = breaker.admit()
        clock.advance(wait)
        assert breaker.admit() is None  # this request is the probe ...
        assert breaker.admit() > 0  # ... and no other goes while it is out
        assert breaker.failed(7, "connection", probe=True)
        intervals.append(breaker.next_probe_in)
    assert intervals == [2, 4, 4, 4, 4]
    assert breaker.probes == 5


def test_an_answered_probe_closes_it(clock):
    breaker = make(clock)
    fail_rows(breaker, 2)
    breaker.gave_up()
    clock.advance(1)
    assert breaker.admit() is None
    clock.advance(0.5)
    assert breaker.answered() == pytest.approx(1.5)  # how long nothing had answered
    assert not breaker.open and breaker.failures == 0


def test_an_abandoned_probe_lets_another_go(clock):
    breaker = make(clock)
    fail_rows(breaker, 2)
    breaker.gave_up()
    clock.advance(1)
    assert breaker.admit() is None
    breaker.probe_abandoned()
    assert breaker.admit() is None


def test_it_gives_up_when_nothing_answered_for_max_outage_s(clock):
    breaker = make(clock, max_outage_s=30)
    clock.advance(10)
    fail_rows(breaker, 2)
    breaker.gave_up()
    clock.advance(19)
    assert breaker.admit() is None  # 29 s without an answer: still probing
    breaker.failed(0, "connection: Connect call failed", probe=True)
    assert breaker.admit() == pytest.approx(1)  # the wait ends at the deadline, not after it
    clock.advance(1)
    with pytest.raises(Unreachable, match="nothing answered for 30 s.*last error: connection: Connect call failed"):
        breaker.admit()
