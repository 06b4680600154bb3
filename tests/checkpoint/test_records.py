"""The result record (batch.records) and the resume state read from it: one layout, streamed reads."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from batch.checkpoint.answered import should_send
from batch.input.reader import Row
from batch.pricing import flat
from batch.records import (
    CACHED_FIELDS,
    OUTPUT_FIELDS,
    RECORD_FIELDS,
    RECORD_SCHEMA,
    WORST_CASE_FIELDS,
    add_paid_before,
    answer_record,
    cached_fields,
    cached_record,
    failed_record,
)
from batch.replies.columns import ReplyColumns

ROW = Row(7, "r7", {}, prompt_hash=12345)
ANSWER = {"id": "chatcmpl-1", "model": "glm-4-flash",
          "choices": [{"message": {"content": "fine", "reasoning_content": "hm"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}}}


def test_every_constructor_makes_a_record_of_the_schema_with_each_field_typed():
    answered = answer_record(ROW, ANSWER, 0.123456, 2, flat(1.0, 2.0), "glm-4-flash")
    made = [answered, failed_record(ROW, "server_error", "HTTP 500", 3, "glm-4-flash"),
            cached_record(cached_fields(answered), ROW)]
    for record in made:
        assert sorted(record) == sorted(RECORD_FIELDS)
    table = pa.Table.from_pylist(made, schema=RECORD_SCHEMA)  # raises on a value of the wrong type
    assert table.column("status").to_pylist() == ["ok", "failed", "ok"]
    assert table.column("total_tokens").to_pylist() == [15, None, 15]  # a server leaving out the total
    assert table.column("request_id").to_pylist() == ["chatcmpl-1", None, "chatcmpl-1"]
    assert table.column("prompt_hash").to_pylist() == [12345] * 3
    internal = {"id", "seq", "prompt_hash", *WORST_CASE_FIELDS, "epoch", "carried"}
    assert set(OUTPUT_FIELDS) == set(RECORD_FIELDS) - internal


def test_a_cached_answer_is_copied_at_no_cost():
    answered = answer_record(ROW, ANSWER, 0.5, 1, flat(1.0, 2.0), "glm-4-flash")
    kept = json.loads(json.dumps(cached_fields(answered)))  # as the cache stores it
    assert list(kept) == list(CACHED_FIELDS)
    other = Row(9, "r9", {}, prompt_hash=1)
    copied = cached_record(kept, other)
    assert (copied["id"], copied["seq"], copied["prompt_hash"]) == ("r9", 9, 1)
    assert (copied["cost"], copied["attempts"], copied["cache_hit"]) == (0.0, 0, True)
    assert {name: copied[name] for name in CACHED_FIELDS} == kept


def test_a_record_holds_what_earlier_answers_to_its_row_cost():
    record = answer_record(ROW, ANSWER, 0.5, 1, None, "glm-4-flash")  # no price: cost unknown
    add_paid_before(record, {"cost": 0.25, "prompt_tokens": 3, "completion_tokens": None, "total_tokens": 3})
    assert (record["cost"], record["prompt_tokens"], record["completion_tokens"], record["total_tokens"]) == \
        (0.25, 13, 5, 18)


def replies_table(texts: list[str | None], status: str = "ok") -> pa.Table:
    return pa.table({"status": [status] * len(texts), "response": texts})


def test_reply_columns_take_one_type_for_every_window_from_a_first_pass():
    windows = [replies_table(['{"n": 1, "k": 1, "s": "a"}', "prose"]),
               replies_table(['{"n": "1", "k": 2}', '{"n": 2, "k": 3, "s": "b", "deep": {"x": [1]}}'])]
    replies = ReplyColumns(iter(windows), None, taken={"status"})
    first, second = ({name: values.to_pylist() for name, values in replies.columns(w)} for w in windows)
    # "n" is 1 in one window and "1" in another: JSON text in both; "k" is an integer everywhere it is given.
    assert first == {"n": ["1", None], "k": [1, None], "s": ["a", None], "deep": [None, None]}
    assert second == {"n": ['"1"', "2"], "k": [2, 3], "s": [None, "b"], "deep": [None, '{"x": [1]}']}
    types = {field.name: field.type for field in replies.fields}
    assert (types["n"], types["k"], types["s"]) == (pa.string(), pa.int64(), pa.string())


def test_reply_columns_have_the_type_a_table_of_every_reply_would_give_them():
    texts = ['{"score": 1, "label": "a"}', '{"score": 2.5}', '{"label": null, "status": true}', '{"score": 3}']
    replies = ReplyColumns([replies_table(texts[:2]), replies_table(texts[2:])], None, taken={"status"})
    assert replies.names == ["score", "label", "json_status"]
    # As in a table of them all: an integer column with a float is float.
    assert [field.type for field in replies.fields] == [pa.float64(), pa.string(), pa.bool_()]
    wanted = ReplyColumns([replies_table(texts)], ["label", "absent"], taken=set())
    assert (wanted.names, [field.type for field in wanted.fields]) == (["label", "absent"], [pa.string(), pa.null()])
    assert dict(wanted.columns(replies_table(texts, status="failed")))["label"].to_pylist() == [None] * 4


def test_status_counts_every_answer_paid_for_as_the_budget_does(sim, make_job, run_cli):
    """A row that moved (a row above it deleted) and whose prompt changed is sent again: its first answer
    was paid for too, and is not carried into the new record. status counts it, as the budget does."""
    rows = [{"review_id": f"r{i}", "text": f"review number {i}"} for i in range(12)]
    job = make_job(sim, rows=rows, input_file="reviews.parquet")
    assert run_cli("run", job)[0] == 0
    first = json.loads((job.parent / "out" / "result.checkpoint" / "summary.json").read_text())["run"]
    edited = [dict(r) for r in rows[1:]]
    edited[4]["text"] = "review number 5, edited at some length"
    pa.Table.from_pylist(edited).to_pandas().to_parquet(job.parent / "reviews.parquet", index=False)
    assert run_cli("run", job)[0] == 0
    second = json.loads((job.parent / "out" / "result.checkpoint" / "summary.json").read_text())["run"]
    assert second["ok"] == 1

    status = json.loads(run_cli("status", job, "--json")[1])
    assert (status["prompt_tokens"], status["completion_tokens"]) == (
        first["prompt_tokens"] + second["prompt_tokens"], first["completion_tokens"] + second["completion_tokens"])


@pytest.mark.parametrize("error_class", ["batch_expired", "batch_failed", "batch_cancelled"])
def test_rows_of_batches_that_expired_failed_or_were_cancelled_are_sent_again_by_retry_failed(error_class):
    # None of them says anything of the row: the batch ended without doing it (a cancel is over once asked).
    assert should_send(error_class, retry_failed=True) and not should_send(error_class, retry_failed=False)
