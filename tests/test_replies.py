"""Model output as data: JSON replies become columns; GLM's reasoning_content has its own column."""

from __future__ import annotations

import json

import pytest
from helpers import output_of

from batch.replies import parse_reply
from batch.simulator import json_answer_for

ROWS = [{"review_id": f"j{i}", "text": f"review {i}"} for i in range(4)]
JSON_PARAMS = {"response_format": {"type": "json_object"}, "max_tokens": 200}


def test_json_replies_become_columns(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, model={"params": JSON_PARAMS}, output={"parse_json": True})
    code, _, err = run_cli("run", job)
    assert code == 0, err
    result = output_of(job)
    for row in result.itertuples():
        messages = [{"role": "user", "content": f"Classify: {row.text}"}]
        want = json.loads(json_answer_for("glm-4-flash", messages))
        assert (row.label, row.reply) == (want["label"], want["reply"])


def test_only_the_named_json_columns(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, model={"params": JSON_PARAMS},
                   output={"parse_json": True, "json_columns": ["label", "missing_key"]})
    assert run_cli("run", job)[0] == 0
    result = output_of(job)
    assert "reply" not in result.columns
    assert set(result["label"]) <= {"positive", "negative", "neutral"}
    assert result["missing_key"].isna().all()


def test_a_reply_that_is_not_json_fails_the_row_with_bad_json_and_keeps_the_reply(sim, make_job, run_cli):
    rows = [dict(r) for r in ROWS]
    rows[1]["text"] = "ignores the format [[badjson]]"
    job = make_job(sim, rows=rows, model={"params": JSON_PARAMS}, output={"parse_json": True})
    assert run_cli("run", job)[0] == 1
    result = output_of(job).set_index("review_id")
    bad = result.loc["j1"]
    # Asked again at once, up to output.json_attempts (3) requests in all, then failed.
    assert (bad["status"], bad["error_class"], bad["attempts"]) == ("failed", "bad_json", 3)
    assert bad["response"].startswith("[glm-4-flash] reply") and bad["completion_tokens"] > 0
    assert sim.stats()["by_prompt"]["Classify: ignores the format [[badjson]]"] == 3
    assert run_cli("run", job, "--retry-failed")[0] == 1
    assert sim.stats()["by_prompt"]["Classify: ignores the format [[badjson]]"] == 6  # retried on request


def test_reasoning_content_has_its_own_column(sim, make_job, run_cli):
    rows = [{"review_id": "t", "text": "think first [[think]]"}, {"review_id": "n", "text": "no thinking"}]
    job = make_job(sim, rows=rows)
    assert run_cli("run", job)[0] == 0
    result = output_of(job).set_index("review_id")
    assert result.loc["t", "reasoning_content"].startswith("reasoning about:")
    assert result["reasoning_content"].isna().tolist() == [False, True]


@pytest.mark.parametrize(("text", "expected"), [
    ('{"a": 1}', {"a": 1}),
    ('```json\n{"a": [1, 2]}\n```', {"a": [1, 2]}),
])
def test_parse_reply_accepts_objects_and_fenced_objects(text, expected):
    assert parse_reply(text) == expected


@pytest.mark.parametrize("text", ["", "[1, 2]", "not json", None])
def test_parse_reply_rejects_the_rest(text):
    with pytest.raises(ValueError):
        parse_reply(text)
