"""Identical requests are paid for once: within a job, in flight, and across jobs with `cache:`."""

from __future__ import annotations

import json
import sqlite3

import pandas as pd
import yaml
from helpers import output_of


def test_identical_requests_in_flight_together_are_sent_once(start_sim, make_job, run_cli):
    sim = start_sim(latency_ms=200)
    rows = [{"review_id": f"d{i}", "text": "the same review"} for i in range(6)]
    rows.append({"review_id": "other", "text": "a different one"})
    job = make_job(sim, rows=rows, model={"name": "glm-4-plus"}, limits={"concurrency": 8})
    code, _, err = run_cli("run", job)
    assert code == 0, err
    assert sim.stats()["requests"] == 2
    result = output_of(job).set_index("review_id")
    assert result["response"].nunique() == 2
    assert int((~result["cache_hit"]).sum()) == 2  # two rows paid, five copied
    assert result.loc[result["cache_hit"], "cost"].eq(0).all()
    assert result.loc[~result["cache_hit"], "cost"].gt(0).all()


def test_a_shared_cache_makes_a_later_job_free(sim, make_job, run_cli, tmp_path):
    rows = [{"review_id": f"c{i}", "text": f"review {i}"} for i in range(5)]
    first = make_job(sim, rows=rows, cache={"path": "shared-answers.sqlite"})
    assert run_cli("run", first)[0] == 0
    assert sim.stats()["requests"] == 5

    second = make_job(sim, rows=rows, cache={"path": "shared-answers.sqlite"},
                      output={"path": "other/result.parquet"}, name="another-job")
    code, out, _ = run_cli("run", second)
    assert code == 0
    assert sim.stats()["requests"] == 5  # nothing new was sent
    again = pd.read_parquet(tmp_path / "other" / "result.parquet")
    assert again["cache_hit"].all()
    assert list(again["response"]) == list(output_of(first)["response"])
    assert (again["attempts"] == 0).all()


def test_a_changed_parameter_is_a_different_request(sim, make_job, run_cli):
    rows = [{"review_id": "x", "text": "same text"}]
    assert run_cli("run", make_job(sim, rows=rows, cache={"path": "c.sqlite"}))[0] == 0
    job = make_job(sim, rows=rows, cache={"path": "c.sqlite"}, model={"params": {"max_tokens": 5}},
                   output={"path": "o2/result.parquet"})
    assert run_cli("run", job)[0] == 0
    assert sim.stats()["requests"] == 2


def test_an_answer_not_yet_saved_to_disk_is_reused_and_saved_at_the_end(sim, make_job, run_cli, tmp_path):
    # One worker: the repeat comes after the first answer, from the cache's unsaved batch, not in flight.
    texts = ["alpha", "beta", "alpha", "gamma", "beta"]
    rows = [{"review_id": f"s{i}", "text": text} for i, text in enumerate(texts)]
    job = make_job(sim, rows=rows, limits={"concurrency": 1}, cache={"path": "answers.sqlite"})
    assert run_cli("run", job)[0] == 0
    assert sim.stats()["requests"] == 3
    assert list(output_of(job)["cache_hit"]) == [False, False, True, False, True]
    with sqlite3.connect(tmp_path / "answers.sqlite") as db:
        assert db.execute("SELECT count(*) FROM answers").fetchone()[0] == 3


def test_params_in_another_order_are_the_same_request(sim, make_job, run_cli):
    rows = [{"review_id": "x", "text": "same text"}]
    params = {"max_tokens": 64, "temperature": 0.5}
    assert run_cli("run", make_job(sim, rows=rows, cache={"path": "c.sqlite"}, model={"params": params}))[0] == 0
    job = make_job(sim, rows=rows, cache={"path": "c.sqlite"}, output={"path": "o2/result.parquet"})
    spec = yaml.safe_load(job.read_text())
    spec["model"]["params"] = dict(reversed(params.items()))
    job.write_text(yaml.safe_dump(spec, sort_keys=False))  # make_job's dump would sort them back
    assert "temperature: 0.5\n    max_tokens: 64" in job.read_text()
    assert run_cli("run", job)[0] == 0
    assert sim.stats()["requests"] == 1


def test_an_entry_cached_before_a_field_was_kept_is_a_miss_and_is_asked_again(sim, make_job, run_cli, tmp_path):
    """An older batch cached answers without `tool_calls` (or another field kept since): such an entry is not a
    whole answer, and a hit on it would be an `ok` row with nothing in it. It is asked again, and replaced; an
    entry with every field is still a hit."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    rows = [{"review_id": "calls", "text": "calls [[toolcalls:1]]"}, {"review_id": "plain", "text": "plain"}]
    model = {"params": {"max_tokens": 64, "tools": tools}}
    assert run_cli("run", make_job(sim, rows=rows, model=model, cache={"path": "shared.sqlite"}))[0] == 0
    assert sim.stats()["requests"] == 2
    with sqlite3.connect(tmp_path / "shared.sqlite") as db:  # the call's entry as an older batch wrote it
        for key, text in db.execute("SELECT key, record FROM answers").fetchall():
            kept = json.loads(text)
            if kept["finish_reason"] == "tool_calls":
                del kept["tool_calls"]
                db.execute("UPDATE answers SET record = ? WHERE key = ?", (json.dumps(kept), key))
    second = make_job(sim, rows=rows, model=model, cache={"path": "shared.sqlite"},
                      output={"path": "other/result.parquet"}, name="another-job")
    code, out, err = run_cli("run", second)
    assert code == 0, out + err
    assert sim.stats()["requests"] == 3  # the old entry asked again, the whole one a hit
    again = pd.read_parquet(tmp_path / "other" / "result.parquet").set_index("review_id")
    assert not again.loc["calls", "cache_hit"] and again.loc["plain", "cache_hit"]
    assert json.loads(again.loc["calls", "tool_calls"])[0]["function"]["name"] == "get_weather"
    with sqlite3.connect(tmp_path / "shared.sqlite") as db:  # replaced by the whole answer
        assert all("tool_calls" in json.loads(text) for (text,) in db.execute("SELECT record FROM answers"))
