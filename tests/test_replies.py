"""Model output as data: JSON replies become columns; GLM's reasoning_content has its own column."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import output_of

import batch
from batch.replies import JSON_TEXT, MAX_DEPTH, parse_reply
from batch.simulator import json_answer_for, reply_marker

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
    ('````\n{"a": "```"}\n````', {"a": "```"}),  # a longer fence holds a shorter one
])
def test_parse_reply_accepts_objects_and_fenced_objects(text, expected):
    assert parse_reply(text) == expected


@pytest.mark.parametrize(("text", "reason"), [
    ("", "the reply is empty"), ("[1, 2]", "not an object"), ("not json", "not JSON"), (None, "the reply is empty"),
    ('{"a": ' + "9" * 5000 + "}", "an integer of more than 4300 digits"),
    ("```json\n{\"a\": 1}", "not JSON"),  # a fence never closed
])
def test_parse_reply_rejects_the_rest(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_reply(text)


# -- any reply becomes a row of the final file --------------------------------------------------------------------
def reply_job(make_job, sim, replies: list[str], output: dict | None = None, **job):
    """A job whose row i the simulator answers with replies[i], exactly (parse_json unless `output` says more)."""
    rows = [{"review_id": f"j{i}", "text": f"row {i} {reply_marker(reply)}"} for i, reply in enumerate(replies)]
    return make_job(sim, rows=rows, output={"parse_json": True, **(output or {})}, **job)


def final_table(job) -> pa.Table:
    return pq.read_table(job.parent / "out" / "result.parquet")


def holds_json_text(table: pa.Table, column: str) -> bool:
    field = table.schema.field(column)
    return field.type == pa.string() and field.metadata == {k.encode(): v.encode() for k, v in JSON_TEXT.items()}


BIG = 12345678901234567890123  # a 23-digit order number
HUGE = int("9" * 400)
NUMBER_SCHEMAS = [
    None,  # parse_json: typed by the values
    {"type": "object", "properties": {"order": {"type": "integer"}}, "required": ["order"]},
    {"type": "object", "properties": {"order": {"type": "number"}}, "required": ["order"]},
]


@pytest.mark.parametrize("schema", NUMBER_SCHEMAS, ids=["parse_json", "integer", "number"])
def test_an_integer_beyond_int64_is_kept_exactly_as_json_text(sim, make_job, run_cli, schema):
    replies = [f'{{"order": {BIG}}}', f'{{"order": {HUGE}}}', '{"order": 5}', '{"order": -9223372036854775809}']
    job = reply_job(make_job, sim, replies, {"json_schema": schema} if schema else None)
    code, _, err = run_cli("run", job)
    assert code == 0, err
    table = final_table(job)
    assert table.column("status").to_pylist() == ["ok"] * 4
    assert holds_json_text(table, "order")  # the file says so: no reader takes "5" for a string
    assert [json.loads(cell) for cell in table.column("order").to_pylist()] == [BIG, HUGE, 5, -(2**63) - 1]
    if schema:
        assert "cannot hold exactly" in err and "'order'" in err


def test_integers_that_fit_stay_int64_and_exact_even_with_gaps(sim, make_job, run_cli):
    """An integer column with a gap stays int64 (Arrow holds nulls): as float64 2**63 - 1 would read back rounded."""
    replies = ['{"n": 9223372036854775807, "x": 1.5}', '{"x": 2}', '{"n": -7, "x": 9007199254740993}']
    job = reply_job(make_job, sim, replies)
    assert run_cli("run", job)[0] == 0
    table = final_table(job)
    assert table.schema.field("n").type == pa.int64()
    assert table.column("n").to_pylist() == [2**63 - 1, None, -7]
    # 2**53 + 1 has no float64: the column of 1.5, 2 and it is JSON text rather than a rounded number.
    assert [json.loads(cell) for cell in table.column("x").to_pylist()] == [1.5, 2, 2**53 + 1]


@pytest.mark.parametrize("reply", ['{"a": "\\ud83d"}', '{"\\udc00": 1}', '{"a": [{"b": "x\\ud800y"}]}'],
                         ids=["value", "key", "nested"])
def test_a_lone_surrogate_is_bad_json_with_the_reason(sim, make_job, run_cli, reply):
    job = reply_job(make_job, sim, [reply, '{"a": "\\ud83d\\ude00"}'], {"json_attempts": 1})  # a whole pair is text
    code, _, err = run_cli("run", job)
    assert code == 1, err
    table = final_table(job)
    bad, good = table.to_pylist()
    assert (bad["status"], bad["error_class"]) == ("failed", "bad_json")
    assert bad["error"].startswith("the reply holds a lone surrogate (") and "which is not text" in bad["error"]
    assert bad["response"] == reply  # the reply as it came, escape and all
    assert good["status"] == "ok" and good["a"] == "\U0001f600"


def test_a_reply_nested_too_deep_is_bad_json_once_and_not_paid_again(sim, make_job, run_cli):
    deep = '{"a": ' + "[" * 1000 + "]" * 1000 + "}"  # past the parser's own limit: a RecursionError stopped the run
    deeper_than_allowed = '{"a": ' + "{\"b\": " * MAX_DEPTH + "1" + "}" * MAX_DEPTH + "}"
    at_the_limit = '{"a": ' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}"
    job = reply_job(make_job, sim, [deep, deeper_than_allowed, at_the_limit], {"json_attempts": 1})
    code, _, err = run_cli("run", job)
    assert code == 1, err
    rows = final_table(job).to_pylist()
    for row in rows[:2]:
        assert (row["status"], row["error_class"]) == ("failed", "bad_json")
        assert row["error"] == f"the reply nests deeper than {MAX_DEPTH} levels"
    assert rows[2]["status"] == "ok" and json.loads(rows[2]["a"]) == json.loads(at_the_limit)["a"]
    sent = sim.stats()["requests"]
    assert run_cli("run", job)[0] == 1
    assert sim.stats()["requests"] == sent  # recorded as failed: a rerun pays for nothing


def test_a_deep_reply_under_a_recursive_schema_is_bad_json_not_a_crash(sim, make_job, run_cli):
    """A schema that refers to itself has the validator follow the reply down, many Python frames a level: a reply
    within MAX_DEPTH can still be too deep for it."""
    tree = {"$defs": {"node": {"anyOf": [{"allOf": [{"oneOf": [{"anyOf": [{"$ref": "#/$defs/back"}]}]}]},
                                         {"type": "integer"}]},
                      "back": {"allOf": [{"anyOf": [{"$ref": "#"}]}]}},
            "type": "object", "additionalProperties": {"$ref": "#/$defs/node"}}
    nested = "1"
    for _ in range(MAX_DEPTH):
        nested = f'{{"k": {nested}}}'
    job = reply_job(make_job, sim, [nested, '{"k": {"k": 1}}'], {"json_schema": tree, "json_attempts": 1})
    code, _, err = run_cli("run", job)
    assert code == 1, err
    deep, shallow = final_table(job).to_pylist()
    assert (deep["status"], deep["error_class"]) == ("failed", "bad_json")
    assert deep["error"] == "the reply nests too deep to check against output.json_schema"
    assert shallow["status"] == "ok" and json.loads(shallow["k"]) == {"k": 1}


def test_reply_keys_that_clash_after_the_prefix_are_columns_of_their_own(sim, make_job, run_cli):
    """`status` clashes with the output's column and becomes json_status, which the reply holds too."""
    reply = '{"status": "s", "json_status": "js", "json_json_status": "jjs", "text": "t", "json_text": 7}'
    job = reply_job(make_job, sim, [reply])
    code, _, err = run_cli("run", job)
    assert code == 0, err
    row = final_table(job).to_pylist()[0]
    assert row["status"] == "ok" and row["text"].startswith("row 0")  # the output's own columns are left alone
    assert {key: row[key] for key in ("json_json_json_status", "json_status", "json_json_status",
                                      "json_json_text", "json_text")} == \
        {"json_json_json_status": "s", "json_status": "js", "json_json_status": "jjs", "json_json_text": "t",
         "json_text": 7}


@pytest.mark.parametrize("schema", [None, {"type": "object", "properties": {
    "v": {"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "boolean"}, {"type": "object"}]}}}],
    ids=["parse_json", "anyOf"])
def test_values_of_several_types_are_json_text_so_5_and_quoted_5_differ(sim, make_job, run_cli, schema):
    replies = ['{"v": 5}', '{"v": "5"}', '{"v": true}', '{"v": {"w": "5"}}', '{}']
    job = reply_job(make_job, sim, replies, {"json_schema": schema} if schema else None)
    code, _, err = run_cli("run", job)
    assert code == 0, err
    table = final_table(job)
    assert holds_json_text(table, "v")
    assert table.column("v").to_pylist() == ["5", '"5"', "true", '{"w": "5"}', None]
    exported = job.parent / "export.jsonl"
    assert run_cli("export", job, "--format", "jsonl", "--to", exported)[0] == 0
    assert [json.loads(line)["v"] for line in exported.read_text().splitlines()] == \
        ["5", '"5"', "true", '{"w": "5"}', None]


FENCED = ['```JSON\n{"a": 1}\n```', '```Json\n{"a": 2}\n```', '``` json\n{"a": 3}\n```', '~~~\n{"a": 4}\n~~~',
          '~~~json\n{"a": 5}\n~~~', '````jsonc\n{"a": 6}\n````', '```javascript\n{"a": 7}\n```',
          '```json {"a": 8}```', '  ```\n{"a": 9}\n```  \n']


def test_a_reply_in_a_fence_of_any_case_or_tag_is_read(sim, make_job, run_cli):
    job = reply_job(make_job, sim, FENCED, {"json_schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                            "required": ["a"]}})
    code, _, err = run_cli("run", job)
    assert code == 0, err
    table = final_table(job)
    assert table.column("a").to_pylist() == list(range(1, len(FENCED) + 1))
    assert table.column("attempts").to_pylist() == [1] * len(FENCED)  # none asked again


@pytest.mark.parametrize("edit", [{"keep_columns": []}, {"json_columns": ["label"]}, {"parse_json": False}])
def test_a_complete_job_with_edited_output_settings_writes_its_final_file_again(sim, make_job, run_cli, edit):
    """Nothing is left to send and no record is newer than the final file, yet its columns are not the job's."""
    job = make_job(sim, rows=ROWS, model={"params": JSON_PARAMS}, output={"parse_json": True})
    assert run_cli("run", job)[0] == 0
    sent = sim.stats()["requests"]
    settings = yaml.safe_load(job.read_text())
    settings["output"].update(edit)
    job.write_text(yaml.safe_dump(settings), encoding="utf-8")  # the input file untouched
    code, _, err = run_cli("run", job)
    assert code == 0, err
    columns = list(output_of(job).columns)
    assert ("text" in columns) == ("text" in settings["output"]["keep_columns"])
    assert ("reply" in columns) == (edit == {"keep_columns": []})
    assert ("label" in columns) == (edit != {"parse_json": False})
    assert sim.stats()["requests"] == sent
    assert list(batch.read_results(job).columns) == columns
