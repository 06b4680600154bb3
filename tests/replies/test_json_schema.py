"""output.json_schema: what is sent for it, replies checked against it and asked again, columns typed by it."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import interrupt, output_of, start_run, summary_of, wait_until
from jsonschema import Draft202012Validator

import batch
from batch.replies.columns import arrow_type
from batch.replies.schema import MAX_ERROR_CHARS, JsonOutput
from batch.simulator import completion_for
from batch.simulator.answers import requested_schema, schema_answer_for

MODEL = "glm-4-flash"
PRICING = {"input": 1.0, "output": 2.0}  # CNY per million tokens
SCORE = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}, "summary": {"type": "string"}},
    "required": ["score", "summary"],
    "additionalProperties": False,
}
# Every kind of column a schema gives: simple types, an enum, a closed object, lists, an optional key, an open object.
TYPED = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"},
        "ratio": {"type": "number"},
        "ok": {"type": "boolean"},
        "label": {"enum": ["positive", "negative", "neutral"]},
        "note": {"type": ["string", "null"]},  # optional: missing from about half the answers
        "author": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                   "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "spans": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                             "required": ["start"], "properties": {"start": {"type": "integer"}}}},
        "extra": {"type": "object"},  # its shape is not fixed: JSON text
    },
    "required": ["count", "ratio", "ok", "label", "author", "tags", "spans", "extra"],
    "additionalProperties": False,
}


def rows(*texts: str) -> list[dict]:
    return [{"review_id": f"s{i}", "text": text} for i, text in enumerate(texts)]


def schema_job(make_job, sim, texts, schema=SCORE, provider="local", output=None, **job):
    """A job over `texts` asking for `schema` (more `output` keys, and other sections, as given)."""
    return make_job(sim, rows=rows(*texts), model={"provider": provider, "params": {"max_tokens": 200}},
                    pricing=PRICING, output={"json_schema": schema, **(output or {})}, **job)


def answers_sent(sim, prompt: str) -> list[dict]:
    """The simulator's answer to each request it got for `prompt` (counted from the bodies it kept)."""
    found, violations = [], 0
    for body in sim.bodies():
        if body["messages"][-1]["content"] == prompt:
            marked = "[[badjson:" in prompt
            bad_for = int(prompt.split("[[badjson:")[1].split("]]")[0]) if marked else 0
            violations += 1
            found.append(completion_for(MODEL, body["messages"], body["max_tokens"], True, requested_schema(body),
                                        violate=violations <= bad_for))
    return found


def cost_of(answers: list[dict]) -> float:
    return sum(a["prompt_tokens"] * PRICING["input"] + a["completion_tokens"] * PRICING["output"]
               for a in answers) / 1e6


def test_a_reply_that_does_not_match_is_asked_again_and_every_answer_is_paid(start_sim, make_job, run_cli):
    sim = start_sim(keep_bodies=True)
    job = schema_job(make_job, sim, ["fine", "wrong twice [[badjson:2]]", "fenced [[fenced]]"])
    code, _, err = run_cli("run", job)
    assert code == 0, err
    result = output_of(job).set_index("review_id")
    assert (result["status"] == "ok").all()
    assert result["attempts"].tolist() == [1, 3, 1]
    prompt = "Classify: wrong twice [[badjson:2]]"
    assert sim.stats()["by_prompt"][prompt] == 3
    asked = answers_sent(sim, prompt)
    assert len(asked) == 3 and asked[0]["content"] != asked[2]["content"]  # two that do not match, then one that does
    again = result.loc["s1"]
    assert again["response"] == asked[2]["content"]
    assert again["prompt_tokens"] == sum(a["prompt_tokens"] for a in asked)
    assert again["completion_tokens"] == sum(a["completion_tokens"] for a in asked)
    assert again["total_tokens"] == again["prompt_tokens"] + again["completion_tokens"]
    assert again["cost"] == pytest.approx(cost_of(asked))
    assert summary_of(job)["run"]["cost"] == pytest.approx(result["cost"].sum())
    assert result.loc["s2", "response"].startswith("```json")  # a fenced reply is fine as it is
    assert 1 <= result.loc["s2", "score"] <= 5


def test_a_reply_that_never_matches_fails_bad_json_with_the_path_and_the_last_reply(start_sim, make_job, run_cli):
    sim = start_sim(keep_bodies=True)
    job = schema_job(make_job, sim, ["fine", "always wrong [[badjson:99]]", "prose [[badjson]]"],
                     output={"json_attempts": 2})
    assert run_cli("run", job)[0] == 1
    result = output_of(job).set_index("review_id")
    wrong = result.loc["s1"]
    assert (wrong["status"], wrong["error_class"], wrong["attempts"]) == ("failed", "bad_json", 2)
    assert wrong["error"] == ("the reply does not match output.json_schema at $.score: "
                              "'not what the schema says' is not of type 'integer'")
    asked = answers_sent(sim, "Classify: always wrong [[badjson:99]]")
    assert len(asked) == 2 and wrong["response"] == asked[-1]["content"]
    assert wrong["total_tokens"] == sum(a["prompt_tokens"] + a["completion_tokens"] for a in asked)
    assert wrong["cost"] == pytest.approx(cost_of(asked))
    prose = result.loc["s2"]
    assert (prose["error_class"], prose["attempts"]) == ("bad_json", 2)
    assert prose["error"].startswith("the reply is not JSON")
    assert pd_isna(result.loc["s1", "score"]) and result.loc["s0", "status"] == "ok"


def pd_isna(value) -> bool:
    return value is None or value != value


def test_each_request_asked_again_is_held_against_the_budget(start_sim, make_job, run_cli):
    sim = start_sim(keep_bodies=True)
    job = schema_job(make_job, sim, ["always wrong [[badjson:99]]"], limits={"concurrency": 1})
    code, out, err = run_cli("estimate", job, "--json")
    assert code == 0, err
    worst = json.loads(out)["prompt_tokens_max"] + 200
    messages = [{"role": "user", "content": "Classify: always wrong [[badjson:99]]"}]
    answer = completion_for(MODEL, messages, 200, True, SCORE, violate=True)
    paid = answer["prompt_tokens"] + answer["completion_tokens"]
    # Room for two answers and the worst case of a third, not for the third's worst case after them.
    job = schema_job(make_job, sim, ["always wrong [[badjson:99]]"], limits={"concurrency": 1},
                     budget={"max_total_tokens": paid + worst + paid - 1})
    code, out, err = run_cli("run", job)
    assert code == 5, out + err
    assert sim.stats()["requests"] == 2
    record = output_of(job).iloc[0]  # the bad replies were paid for: kept, not left pending
    assert (record["error_class"], record["attempts"], record["total_tokens"]) == ("bad_json", 2, 2 * paid)


def test_columns_are_typed_from_the_schema(start_sim, make_job, run_cli, tmp_path):
    sim = start_sim(keep_bodies=True)
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "typed.json").write_text(json.dumps(TYPED), encoding="utf-8")
    texts = [f"review {i}" for i in range(8)] + ["wrong [[badjson:9]]"]
    job = schema_job(make_job, sim, texts, schema="schemas/typed.json")
    assert run_cli("run", job)[0] == 1
    table = pq.read_table(job.parent / "out" / "result.parquet")
    types = {name: table.schema.field(name).type for name in TYPED["properties"]}
    assert types == {
        "count": pa.int64(), "ratio": pa.float64(), "ok": pa.bool_(), "label": pa.string(), "note": pa.string(),
        "author": pa.struct([("name", pa.string()), ("age", pa.int64())]),
        "tags": pa.list_(pa.string()),
        "spans": pa.list_(pa.struct([("start", pa.int64())])),
        "extra": pa.string(),
    }
    got = table.to_pylist()
    for row, body in zip(got, sim.bodies()):
        want = json.loads(schema_answer_for(MODEL, body["messages"], TYPED))
        if row["status"] != "ok":
            assert all(row[key] is None for key in TYPED["properties"])
            continue
        assert {key: row[key] for key in ("count", "ratio", "ok", "label", "author", "tags", "spans")} == \
            {key: want[key] for key in ("count", "ratio", "ok", "label", "author", "tags", "spans")}
        assert row["note"] == want.get("note")  # null where the answer left the optional key out
        assert json.loads(row["extra"]) == want["extra"]
    notes = [row["note"] for row in got if row["status"] == "ok"]
    assert None in notes and any(note is not None for note in notes)


def test_export_to_csv_writes_nested_values_as_json_text(start_sim, make_job, run_cli, tmp_path):
    sim = start_sim()
    job = schema_job(make_job, sim, [f"review {i}" for i in range(3)], schema=TYPED)
    assert run_cli("run", job)[0] == 0
    parquet = output_of(job)
    assert run_cli("export", job, "--format", "csv", "--to", tmp_path / "out.csv")[0] == 0
    with open(tmp_path / "out.csv", encoding="utf-8", newline="") as handle:
        exported = list(csv.DictReader(handle))
    for row, (_, want) in zip(exported, parquet.iterrows()):
        assert json.loads(row["author"]) == {"name": want["author"]["name"], "age": want["author"]["age"]}
        assert json.loads(row["tags"]) == list(want["tags"])
        assert json.loads(row["spans"]) == [dict(span) for span in want["spans"]]
        assert int(row["count"]) == want["count"]


@pytest.mark.parametrize(("schema", "message", "at"), [
    ({"type": "object", "properties": {"score": {"type": "integr"}}},
     "output.json_schema is not a valid JSON Schema at $.properties.score.type: 'integr' is not valid", "integr"),
    ({"type": "array", "items": {"type": "string"}}, "the schema's type must be object", "json_schema"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "points at nothing in the schema",
     "json_schema"),
    ("missing.json", "missing.json not found (a relative path is relative to the job file)", "json_schema"),
])
def test_an_invalid_schema_is_refused_before_anything_is_sent(sim, make_job, run_cli, schema, message, at):
    """The line named is the key at fault's, when the schema is written in the job file."""
    job = schema_job(make_job, sim, ["fine"], schema=schema)
    line = next(number for number, text in enumerate(job.read_text().splitlines(), 1) if at in text)
    for command in ("validate", "run", "estimate"):
        code, _, err = run_cli(command, job)
        assert code == 2, err
        assert f"{job} line {line}: output.json_schema" in err and message in err
    assert sim.stats()["requests"] == 0
    assert not (job.parent / "out").exists()


def test_zhipu_gets_json_object_and_the_schema_in_the_system_prompt_others_get_json_schema(
        start_sim, make_job, run_cli, monkeypatch):
    monkeypatch.setenv("ZHIPU_API_KEY", "sk-zhipu-test")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test")
    shapes = {}
    for provider, via in (("zhipu", None), ("openai", None), ("zhipu", "response_format"), ("openai", "prompt")):
        sim = start_sim(keep_bodies=True)
        output = {"path": f"out/{provider}-{via}.parquet", **({"schema_via": via} if via else {})}
        job = schema_job(make_job, sim, ["one", "two"], provider=provider, output=output)
        code, _, err = run_cli("run", job)
        assert code == 0, err  # the simulator answered to the schema either way, and the replies matched it
        shapes[provider, via] = sim.bodies()[0]
        scores = pq.read_table(job.parent / output["path"]).column("score").to_pylist()
        assert len(scores) == 2 and all(1 <= score <= 5 for score in scores)
    for key in (("zhipu", None), ("openai", "prompt")):
        body = shapes[key]
        assert body["response_format"] == {"type": "json_object"}
        system = body["messages"][0]
        assert system["role"] == "system" and system["content"].startswith("Answer with one JSON object")
        assert json.loads(system["content"].split("```json\n")[1].split("\n```")[0]) == SCORE
    for key in (("openai", None), ("zhipu", "response_format")):
        body = shapes[key]
        assert body["response_format"] == {"type": "json_schema",
                                           "json_schema": {"name": "output", "schema": SCORE, "strict": True}}
        assert [m["role"] for m in body["messages"]] == ["user"]


def test_the_schema_goes_after_the_jobs_own_system_prompt(start_sim, make_job, run_cli, monkeypatch):
    monkeypatch.setenv("ZHIPU_API_KEY", "sk-zhipu-test")
    sim = start_sim(keep_bodies=True)
    job = make_job(sim, rows=rows("one"), prompt={"system": "You rate reviews."},
                   model={"provider": "zhipu", "params": {"max_tokens": 200}}, output={"json_schema": SCORE})
    assert run_cli("run", job)[0] == 0
    system = sim.bodies()[0]["messages"][0]["content"]
    assert system.startswith("You rate reviews.\n\nAnswer with one JSON object")


def test_a_response_format_in_params_is_the_jobs_own_choice(start_sim, make_job, run_cli):
    sim = start_sim(keep_bodies=True)
    own = {"type": "json_schema", "json_schema": {"name": "mine", "schema": SCORE, "strict": False}}
    job = make_job(sim, rows=rows("one"), model={"params": {"max_tokens": 200, "response_format": own}},
                   output={"json_schema": SCORE})
    assert run_cli("run", job)[0] == 0
    assert sim.bodies()[0]["response_format"] == own


@pytest.mark.parametrize("via", ["prompt", "response_format"])
def test_estimate_counts_the_prompt_tokens_the_schema_adds(sim, make_job, run_cli, via):
    texts = [f"review {i}" for i in range(5)]
    plain = json.loads(run_cli("estimate", make_job(sim, rows=rows(*texts), pricing=PRICING), "--json")[1])
    job = schema_job(make_job, sim, texts, output={"schema_via": via})
    code, out, err = run_cli("estimate", job, "--json")
    assert code == 0, err
    with_schema = json.loads(out)
    extra = with_schema["schema_prompt_tokens_per_row"]
    assert extra > len(json.dumps(SCORE)) // 8 and with_schema["schema_via"] == via
    assert with_schema["prompt_tokens_estimate"] - plain["prompt_tokens_estimate"] == 5 * extra
    assert with_schema["prompt_tokens_max"] - plain["prompt_tokens_max"] >= 5 * len(json.dumps(SCORE))
    assert with_schema["cost_max"] > plain["cost_max"]
    assert f"of which ~{extra} per row are output.json_schema" in run_cli("estimate", job)[1]


def test_a_cached_answer_that_does_not_match_is_asked_again(start_sim, make_job, run_cli, tmp_path):
    sim = start_sim()
    shared = {"path": str(tmp_path / "shared.sqlite")}
    loose = make_job(sim, rows=rows("one"), model={"params": {"max_tokens": 200, "response_format":
                     {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}},
                     cache=shared, output={"parse_json": True})
    assert run_cli("run", loose)[0] == 0
    (loose.parent / "out" / "result.parquet").unlink()
    strict = make_job(sim, rows=rows("one"), model={"params": {"max_tokens": 200, "response_format":
                      {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}},
                      cache=shared, output={"path": "out/strict.parquet", "json_schema": SCORE, "json_attempts": 1})
    code, _, err = run_cli("run", strict)
    assert code == 1, err  # the simulator answers to the schema in params ({} here), which SCORE refuses
    assert sim.stats()["requests"] == 2  # the cached answer did not match: asked again, not copied


def test_the_schema_is_part_of_the_checkpoints_settings(sim, make_job, run_cli):
    job = schema_job(make_job, sim, ["one"])
    assert run_cli("run", job)[0] == 0
    changed = {**SCORE, "required": ["score"]}
    job = schema_job(make_job, sim, ["one"], schema=changed)
    code, _, err = run_cli("run", job)
    assert code == 2 and "json_schema" in err and "--force" in err


@pytest.mark.parametrize(("output", "message"), [
    ({"json_schema": SCORE, "parse_json": False}, "json_schema needs the reply parsed as JSON"),
    ({"schema_via": "prompt"}, "set json_schema too"),
    ({"json_attempts": 2}, "json_attempts is for replies parsed as JSON"),
    ({"json_columns": ["label"]}, "json_columns picks keys of replies parsed as JSON"),
    ({"json_columns": ["label"], "parse_json": False}, "json_columns picks keys of replies parsed as JSON"),
    ({"json_schema": SCORE, "json_attempts": 0}, "json_attempts"),
])
def test_output_keys_that_do_not_go_together_are_refused(sim, make_job, run_cli, output, message):
    job = make_job(sim, rows=rows("one"), output=output)
    code, _, err = run_cli("validate", job)
    assert code == 2 and message in err and "line" in err


@pytest.mark.parametrize(("schema", "arrow"), [
    ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, pa.int64()),  # an optional value, as pydantic writes it
    ({"type": ["integer", "number"]}, pa.float64()),
    ({"enum": [1, 2, 3]}, pa.int64()),
    ({"enum": [1, "two"]}, pa.string()),  # JSON text
    ({"const": True}, pa.bool_()),
    ({"type": "object", "properties": {"a": {"type": "integer"}}}, pa.string()),  # other keys allowed: not fixed
    ({"type": "array"}, pa.string()),
    ({"type": "array", "items": {"type": "array", "items": {"type": "number"}}}, pa.list_(pa.list_(pa.float64()))),
    ({"$ref": "#/$defs/x"}, pa.string()),
    ({"type": ["string", "integer"]}, pa.string()),
])
def test_the_arrow_type_of_each_kind_of_schema(schema, arrow):
    assert arrow_type(schema) == arrow


def test_keys_the_schema_does_not_name_are_found_in_the_replies(start_sim, make_job, run_cli):
    sim = start_sim()
    open_schema = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}
    reply = json.dumps(json.dumps({"score": 2, "why": 5}))  # the marker's value is JSON: a string holding the reply
    job = make_job(sim, rows=rows("one", f"two [[set:choices.0.message.content={reply}]]"),
                   output={"json_schema": open_schema})
    code, _, err = run_cli("run", job)
    assert code == 0, err
    table = pq.read_table(job.parent / "out" / "result.parquet")
    assert table.schema.field("score").type == pa.int64() and table.schema.field("why").type == pa.int64()
    assert table.column("why").to_pylist() == [None, 5]  # an integer key with a gap stays int64, as with parse_json


def test_the_python_apis_results_so_far_are_typed_by_the_schema_too(sim, make_job):
    job = schema_job(make_job, sim, ["one", "two", "three"], schema=TYPED)
    assert batch.run(job, limit=2, progress=False).pending == 1
    so_far = batch.read_results(job)
    assert so_far["status"].tolist() == ["ok", "ok", "pending"]
    assert all(isinstance(author, dict) for author in so_far["author"][:2])  # a struct, not JSON text
    assert batch.run(job, progress=False).exit_code == 0
    assert so_far["author"][:2].tolist() == output_of(job)["author"][:2].tolist()


@pytest.mark.parametrize("signals", [1, 2])
def test_a_bad_reply_paid_for_is_kept_when_the_run_stops(start_sim, make_job, run_cli, signals):
    """One signal: the request in flight finishes, the row is not asked again. Two: the request in flight is
    dropped. Either way the bad replies already paid for are the row's record, not lost with a pending row."""
    sim = start_sim(latency_ms=500)
    prompt = "Classify: always wrong [[badjson:99]]"
    job = schema_job(make_job, sim, ["always wrong [[badjson:99]]"], output={"json_attempts": 5})
    process = start_run(job)
    try:
        wait_until(lambda: sim.stats()["by_prompt"].get(prompt) == 2, "the first re-ask")
        interrupt(process, signals)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, out + err
    answered = 2 if signals == 1 else 1
    record = output_of(job).iloc[0]
    assert (record["status"], record["error_class"], record["attempts"]) == ("failed", "bad_json", answered)
    messages = [{"role": "user", "content": prompt}]
    answer = completion_for(MODEL, messages, 200, True, SCORE, violate=True)
    assert record["total_tokens"] == answered * (answer["prompt_tokens"] + answer["completion_tokens"])
    assert sim.stats()["by_prompt"][prompt] == 2  # not asked again after the signal


def test_a_reply_cut_at_max_tokens_says_so(sim, make_job, run_cli):
    job = make_job(sim, rows=rows("one"), model={"params": {"max_tokens": 5}}, output={"json_schema": SCORE})
    assert run_cli("run", job)[0] == 1
    record = output_of(job).iloc[0]
    assert record["finish_reason"] == "length" and record["attempts"] == 3
    assert record["error"].endswith("(the answer was cut at max_tokens 5: raise it)")


def test_an_edited_schema_file_is_a_change_of_settings(sim, make_job, run_cli, tmp_path):
    schema_file = tmp_path / "score.json"
    schema_file.write_text(json.dumps(SCORE), encoding="utf-8")
    job = schema_job(make_job, sim, ["one"], schema="score.json")
    assert run_cli("run", job)[0] == 0
    schema_file.write_text(json.dumps({**SCORE, "required": ["score"]}), encoding="utf-8")
    code, _, err = run_cli("run", job)
    assert code == 2 and "json_schema" in err and "--force" in err


def test_an_edited_schema_resumed_with_force_gives_the_new_schemas_columns(sim, make_job, run_cli, tmp_path):
    """The answers are kept; their columns are the new schema's: its keys, its types, each value kept exactly."""
    huge = int("9" * 400)
    before = {"type": "object", "additionalProperties": False, "properties": {
        "order": {"type": "integer"}, "score": {"type": "integer"}, "note": {"type": "string"}}}
    after = {"type": "object", "additionalProperties": False, "properties": {
        "order": {"type": "number"}, "score": {"type": "number"}, "note": {"type": "integer"},
        "label": {"enum": ["a", "b"]}}}
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(before), encoding="utf-8")
    reply = json.dumps(json.dumps({"order": huge, "score": 3, "note": "n"}))
    job = schema_job(make_job, sim, [f"one [[set:choices.0.message.content={reply}]]"], schema="schema.json")
    assert run_cli("run", job)[0] == 0
    schema_file.write_text(json.dumps(after), encoding="utf-8")
    code, _, err = run_cli("run", job, "--force")
    assert code == 0, err
    table = pq.read_table(job.parent / "out" / "result.parquet")
    types = {name: table.schema.field(name).type for name in table.column_names[-4:]}
    # order: a number float64 cannot hold exactly is JSON text; note: "n" is not an integer, left null (said once)
    assert types == {"order": pa.string(), "score": pa.float64(), "note": pa.int64(), "label": pa.string()}
    row = table.to_pylist()[0]
    assert (json.loads(row["order"]), row["score"], row["note"], row["label"]) == (huge, 3.0, None, None)
    assert "a value of key 'note' does not have the schema's type (int64)" in err
    assert sim.stats()["requests"] == 1  # the answer was kept, not asked again


def test_a_schema_file_saved_with_a_bom_is_read_like_the_input_and_job_files(sim, make_job, run_cli, tmp_path):
    """Windows editors start a UTF-8 file with a BOM: the job file and a JSONL input take it; so does a schema."""
    (tmp_path / "score.json").write_text("\ufeff" + json.dumps(SCORE), encoding="utf-8")
    job = schema_job(make_job, sim, ["one"], schema="score.json")
    code, out, err = run_cli("validate", job)
    assert code == 0, err
    assert run_cli("run", job)[0] == 0
    (tmp_path / "score.json").write_text("\ufeff" + json.dumps({**SCORE, "required": ["score"]}), encoding="utf-8")
    code, _, err = run_cli("run", job)
    assert code == 2 and "json_schema" in err and "--force" in err  # the fingerprint reads it too


def test_a_validation_error_quoting_a_long_reply_is_cut_short():
    """The message quotes the value at fault, which may be the whole reply: the row's error stays short."""
    checked = JsonOutput(1, SCORE, "prompt", Draft202012Validator(SCORE))
    problem = checked.problem(json.dumps({"score": "x" * 5000, "summary": "s"}))
    assert problem.startswith("the reply does not match output.json_schema at $.score: ")
    assert problem.endswith("...") and len(problem) < MAX_ERROR_CHARS + 100


# YAML 1.1 reads these keys as a number, a boolean or null; in a job file they are the text written.
YAML_KEYS_SCHEMA = """\
  json_schema:
    type: object
    properties:
      2024: {type: integer}
      on: {type: string}
      yes: {type: boolean}
      1.5: {type: number}
      1.50: {type: string}
      null: {type: string}
      ~: {type: integer}
    required: ["2024", "on", "yes", "1.5", "1.50", "null", "~"]
    additionalProperties: false
"""
YAML_KEYS = ["2024", "on", "yes", "1.5", "1.50", "null", "~"]


def yaml_keys_job(make_job, sim, schema_text: str):
    """A job whose schema (and request params) have keys YAML would read as numbers, booleans or null."""
    job = make_job(sim, rows=rows("one", "two"), model={"params": {"max_tokens": 300}},
                   output={"json_schema": "PLACEHOLDER"})
    text = job.read_text(encoding="utf-8")
    params = "    max_tokens: 300\n"
    assert "  json_schema: PLACEHOLDER\n" in text and params in text
    text = text.replace("  json_schema: PLACEHOLDER\n", schema_text)
    text = text.replace(params, params + "    metadata: {on: a, 2024: b, null: c}\n"
                                         "    extra_body: {logit_bias: {1.5: 1, yes: 2}}\n")
    job.write_text(text, encoding="utf-8")
    return job


@pytest.mark.parametrize("in_a_file", [False, True])
def test_keys_yaml_reads_as_numbers_or_booleans_are_the_text_written(start_sim, make_job, run_cli, tmp_path,
                                                                     in_a_file):
    """`2024:`, `on:`, `yes:`, `1.5:`, `null:`, `~:` are property names, in the request and the columns alike, the
    same as in a .json schema file; and request params keep theirs as written too."""
    sim = start_sim(keep_bodies=True)
    schema_text = YAML_KEYS_SCHEMA
    if in_a_file:
        (tmp_path / "keys.json").write_text(json.dumps({
            "type": "object", "additionalProperties": False, "required": YAML_KEYS,
            "properties": {"2024": {"type": "integer"}, "on": {"type": "string"}, "yes": {"type": "boolean"},
                           "1.5": {"type": "number"}, "1.50": {"type": "string"}, "null": {"type": "string"},
                           "~": {"type": "integer"}}}), encoding="utf-8")
        schema_text = "  json_schema: keys.json\n"
    job = yaml_keys_job(make_job, sim, schema_text)
    code, _, err = run_cli("run", job)
    assert code == 0, err
    body = sim.bodies()[0]
    assert sorted(body["response_format"]["json_schema"]["schema"]["properties"]) == sorted(YAML_KEYS)
    assert body["metadata"] == {"on": "a", "2024": "b", "null": "c"}
    assert body["logit_bias"] == {"1.5": 1, "yes": 2}
    table = pq.read_table(job.parent / "out" / "result.parquet")
    assert {key: table.schema.field(key).type for key in YAML_KEYS} == {
        "2024": pa.int64(), "on": pa.string(), "yes": pa.bool_(), "1.5": pa.float64(), "1.50": pa.string(),
        "null": pa.string(), "~": pa.int64()}
    for row in table.to_pylist():
        reply = json.loads(row["response"])
        assert sorted(reply) == sorted(YAML_KEYS) and all(row[key] == reply[key] for key in YAML_KEYS)


def test_a_yaml_boolean_where_the_schema_wants_a_name_is_refused_at_its_line(sim, make_job, run_cli):
    """Keys are read as written, values as YAML reads them: `required: [on]` is [true], which names no key."""
    job = yaml_keys_job(make_job, sim, YAML_KEYS_SCHEMA.replace('required: ["2024", "on"', 'required: ["2024", on'))
    code, _, err = run_cli("validate", job)
    line = next(n for n, text in enumerate(job.read_text().splitlines(), 1) if "required:" in text)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{job} line {line}: output.json_schema is not a valid JSON Schema at $.required[1]: True" in err
    assert "quote it" in err
    assert sim.stats()["requests"] == 0
