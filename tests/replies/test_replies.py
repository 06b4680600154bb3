"""Model output as data: JSON replies become columns; GLM's reasoning_content has its own column."""

from __future__ import annotations

import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import output_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

import batch
from batch.records import RECORD_FIELDS
from batch.replies.columns import MAX_DEPTH, column_names, parse_reply
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
    ('{"a": "\ud83d"}', "a lone surrogate"),  # the half itself, not its escape: text that never was UTF-8
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


def holds_json_text(field: pa.Field) -> bool:
    """Whether the field carries the metadata the README documents for a column of JSON text."""
    return field.type == pa.string() and field.metadata == {b"batch": b"json"}


def is_json_text(table: pa.Table, column: str) -> bool:
    return holds_json_text(table.schema.field(column))


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
    assert is_json_text(table, "order")  # the file says so: no reader takes "5" for a string
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


@pytest.mark.parametrize("schema", NUMBER_SCHEMAS, ids=["parse_json", "integer", "number"])
def test_numbers_json_has_not_or_float64_cannot_hold_are_bad_json_with_the_reason(sim, make_job, run_cli, schema):
    replies = ['{"order": NaN}', '{"order": Infinity}', '{"order": -Infinity}', '{"order": 1e400}',
               '{"order": -1.5E+999}', '{"order": "unterminated', '{"order": 1e308}']
    job = reply_job(make_job, sim, replies, {"json_attempts": 1, **({"json_schema": schema} if schema else {})})
    assert run_cli("run", job)[0] == 1
    rows = final_table(job).to_pylist()
    assert [(row["status"], row["error_class"], row["error"]) for row in rows[:6]] == [
        ("failed", "bad_json", "the reply is not JSON: NaN"),
        ("failed", "bad_json", "the reply is not JSON: Infinity"),
        ("failed", "bad_json", "the reply is not JSON: -Infinity"),
        ("failed", "bad_json", "the reply holds a number beyond float64's range (1e400)"),
        ("failed", "bad_json", "the reply holds a number beyond float64's range (-1.5E+999)"),
        ("failed", "bad_json", "the reply is not JSON: Unterminated string starting at character 10"),
    ]
    if schema is None or schema["properties"]["order"]["type"] == "number":
        assert rows[6]["status"] == "ok" and rows[6]["order"] == 1e308


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
    assert is_json_text(table, "v")
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


# -- the contract, over any JSON value: a final file that reads back ------------------------------------------------
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=6)  # lone surrogates included
KEYS = st.sampled_from(["status", "json_status", "text", "json_text", "id", "", "a"]) | ANY_TEXT  # clashes likely
LEAVES = (st.none() | st.booleans() | st.integers() | st.integers(-(10**400), 10**400)
          | st.floats(allow_nan=False, allow_infinity=False) | ANY_TEXT)


def wrapped(leaf: object, levels: int) -> object:
    """`leaf` inside `levels` arrays and objects, alternately."""
    for level in range(levels):
        leaf = [leaf] if level % 2 else {"k": leaf}
    return leaf


DEEP = st.builds(wrapped, LEAVES, st.sampled_from([MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, 1000]))
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                      max_leaves=8) | DEEP
REPLIES = st.lists(st.dictionaries(KEYS, VALUES, max_size=4), min_size=1, max_size=4)
RUNS = itertools.count()  # each example's output path: a checkpoint of its own


def depth_of(value: object) -> int:
    """How many objects and arrays deep `value` goes (an object of scalars: 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((item, depth + 1) for item in (node.values() if isinstance(node, dict) else node))
    return deepest


def has_lone_surrogate(value: object) -> bool:
    """Whether a key or a string anywhere in `value` holds half of a surrogate pair on its own."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str) and any(0xD800 <= ord(char) <= 0xDFFF for char in node):
            return True
        if isinstance(node, dict):
            stack.extend([*node.keys(), *node.values()])
        elif isinstance(node, list):
            stack.extend(node)
    return False


def read_back(cell: object, field: pa.Field) -> object:
    """The reply's value as the final file gives it back: JSON text parsed, structs and lists item by item."""
    if cell is None:
        return None
    if holds_json_text(field):
        return json.loads(cell)
    if pa.types.is_struct(field.type):
        return {child.name: read_back(cell[child.name], child) for child in field.type}
    if pa.types.is_list(field.type):
        return [read_back(item, field.type.value_field) for item in cell]
    return cell


def schema_for(value: object, pick: int) -> dict:
    """A schema `value` matches, one of several for each JSON type (`pick` chooses): simple types, unions, closed
    objects (structs), arrays of anything (lists of JSON text), open objects (JSON text)."""
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return [{"type": "integer"}, {"type": "number"}, {"anyOf": [{"type": "integer"}, {"type": "string"}]}][pick % 3]
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return [{"type": "string"}, {"anyOf": [{"type": "integer"}, {"type": "string"}]}][pick % 2]
    if isinstance(value, list):
        return [{"type": "array", "items": {}}, {"type": "array"}][pick % 2]
    if isinstance(value, dict):
        if pick % 2 or not value or has_lone_surrogate(list(value)):
            return {"type": "object"}
        return {"type": "object", "additionalProperties": False, "required": list(value),
                "properties": {key: schema_for(item, pick) for key, item in value.items()}}
    return {"type": "null"}


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])  # a whole run each example
@given(replies=REPLIES, with_schema=st.booleans(), pick=st.integers(0, 5))
def test_any_json_reply_becomes_a_final_file_that_reads_back(sim, make_job, run_cli, replies, with_schema, pick):
    """Any JSON object a model replies with (any nesting, integers of any size, floats, any text for keys and
    strings, lone surrogates included) gives a final file that pandas reads, with every ok reply's values read back
    exactly from its columns, and every other row bad_json with its reason."""
    schema = None
    if with_schema:  # named from the first reply's keys: later replies may not match it
        named = {key: value for key, value in replies[0].items() if not has_lone_surrogate(key)}
        if depth_of(named) <= MAX_DEPTH:
            schema = {"type": "object", "properties": {key: schema_for(value, pick) for key, value in named.items()}}
    checker = Draft202012Validator(schema) if schema else None
    path = f"out/{next(RUNS)}.parquet"
    job = reply_job(make_job, sim, [json.dumps(reply) for reply in replies],
                    {"path": path, "json_attempts": 1, **({"json_schema": schema} if schema else {})})
    code, _, err = run_cli("run", job)
    assert code in (0, 1), err
    table = pq.read_table(job.parent / path)
    assert len(table.to_pandas()) == len(replies)
    kept = [not has_lone_surrogate(reply) and depth_of(reply) <= MAX_DEPTH and
            (checker is None or checker.is_valid(reply)) for reply in replies]
    keys = list(dict.fromkeys(key for reply, ok in zip(replies, kept) if ok for key in reply))
    names = dict(zip(keys, column_names(keys, {"review_id", "text", *RECORD_FIELDS})))
    for reply, ok, row in zip(replies, kept, table.to_pylist()):
        if not ok:
            assert (row["status"], row["error_class"]) == ("failed", "bad_json"), row["error"]
            assert row["error"].startswith(("the reply holds a lone surrogate", "the reply nests deeper than",
                                            "the reply does not match output.json_schema"))
            continue
        assert row["status"] == "ok", row["error"]
        for key in keys:
            assert read_back(row[names[key]], table.schema.field(names[key])) == reply.get(key), key
