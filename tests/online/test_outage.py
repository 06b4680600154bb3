"""An outage is not a failed row: over real HTTP, a down endpoint leaves rows pending and a returning one is used."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import pytest
from helpers import output_of

from batch.online.answerer import ROWS_PER_SLOT

ROWS = [{"review_id": f"r{i}", "text": f"review number {i}"} for i in range(20)]
CONCURRENCY = 2
ROWS_IN_HAND = ROWS_PER_SLOT * CONCURRENCY  # the row tasks: a row waiting to retry holds one, not a slot


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A port that is bound but never listens: every connection is refused, and no one else can take it."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{closed.getsockname()[1]}/v1"


def checkpoint_records(job) -> list[dict]:
    wal = job.parent / "out" / "result.checkpoint" / "wal.jsonl"
    return [json.loads(line) for line in wal.read_text().splitlines() if line.strip()] if wal.exists() else []


def assert_nothing_failed_and_all_pending(job, run_cli) -> None:
    assert not any(r["status"] == "failed" for r in checkpoint_records(job))
    assert not (job.parent / "out" / "result.parquet").exists()
    code, out, _ = run_cli("status", job, "--json")
    state = json.loads(out)
    assert (state["ok"], state["failed"], state["pending"]) == (0, 0, len(ROWS))


def test_refused_connections_stop_the_run_with_exit_3_and_every_row_pending(make_job, run_cli, refused_url):
    job = make_job(rows=ROWS, model={"base_url": refused_url}, limits={"concurrency": CONCURRENCY},
                   retry={"max_outage_s": 0.5})
    code, out, err = run_cli("run", job)
    assert code == 3, err
    assert "the endpoint is unreachable" in err and "last error: connection" in err
    assert "stopped: the endpoint is unreachable" in out
    assert "failed 0, pending 20" in out
    assert_nothing_failed_and_all_pending(job, run_cli)


def test_html_error_pages_for_every_request_are_an_outage_too(start_sim, make_job, run_cli):
    sim = start_sim(down_for_requests=10**9, down_as="html")
    job = make_job(sim, rows=ROWS, limits={"concurrency": CONCURRENCY}, retry={"max_outage_s": 0.5})
    code, out, err = run_cli("run", job)
    assert code == 3, err
    assert "the endpoint is unreachable" in err and "502 Bad Gateway" in err
    assert_nothing_failed_and_all_pending(job, run_cli)
    # Only the rows in hand when it began were sent; the rest waited.
    assert len(sim.stats()["by_prompt"]) <= ROWS_IN_HAND < len(ROWS)


def test_no_row_waiting_for_its_slot_is_sent_once_the_outage_began(start_sim, make_job, run_cli):
    """The rows in hand wait for the one slot, their retries too; the row that runs out of attempts while others
    failed opens the breaker. The rows still waiting for the slot then send nothing: the first probe would come after
    1 s (initial_backoff_s 0), past max_outage_s, so every request sent is an attempt the warning counts."""
    sim = start_sim(fail_after=0, fail_status=500, fail_code="1200")
    job = make_job(sim, rows=ROWS, limits={"concurrency": 1},
                   retry={"max_attempts": 2, "initial_backoff_s": 0, "max_outage_s": 1})
    code, out, err = run_cli("run", job)
    assert code == 3, err
    warned = re.search(r"the endpoint is not answering \((\d+) attempts failed", err)
    assert warned is not None, err
    stats = sim.stats()
    assert stats["requests"] == int(warned.group(1)) and len(stats["by_prompt"]) > 1
    assert_nothing_failed_and_all_pending(job, run_cli)


@pytest.mark.parametrize("down_as", ["503", "html"])
def test_a_run_rides_out_an_outage_and_answers_every_row(start_sim, make_job, run_cli, down_as):
    down_for = 40  # more than the rows' attempts together (20 x 3): without the breaker every row would fail
    sim = start_sim(down_for_requests=down_for, down_as=down_as)
    # Probes every 10 ms: the outage is counted in requests, and waiting longer between them proves nothing more.
    job = make_job(sim, rows=ROWS, limits={"concurrency": CONCURRENCY}, retry={"max_backoff_s": 0.01})
    code, out, err = run_cli("run", job)
    assert code == 0, err
    result = output_of(job)
    assert (result["status"] == "ok").all() and len(result) == len(ROWS)
    assert "the endpoint is not answering" in err and "the endpoint answers again" in err
    stats = sim.stats()
    assert stats["requests"] == down_for + len(ROWS)
    # During the outage only the rows already in hand were tried (one probe at a time), not every row
    # max_attempts times.
    tried_while_down = [prompt for prompt, count in stats["by_prompt"].items() if count > 1]
    assert 0 < len(tried_while_down) <= ROWS_IN_HAND < len(ROWS)


def test_a_row_failing_alone_is_still_that_rows_failure(sim, make_job, run_cli):
    """A poison row among answered ones (or last in the queue) fails as before: one row cannot stop a job."""
    rows = [dict(r) for r in ROWS[:6]]
    rows[5]["text"] += " [[error:503:1305]]"
    job = make_job(sim, rows=rows, limits={"concurrency": 2})
    code, out, err = run_cli("run", job)
    assert code == 1, err
    result = output_of(job).set_index("review_id")
    assert result.loc["r5", "status"] == "failed" and result.loc["r5", "attempts"] == 3
    assert "not answering" not in err
