"""provider openai and output.json_schema: what is sent with strict: true is a schema OpenAI's strict mode takes
(the simulator, with openai_strict, answers 400 to any other, as OpenAI does); a schema it cannot express goes with
strict: false and a warning; a strict response_format of the job's own that OpenAI would refuse is refused first."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from batch.replies.schema import openai_strict
from batch.simulator import reply_marker
from batch.simulator.answers import conforming, strict_schema_problem

# Optional keys everywhere strict mode looks: the root, a nested object, an array's items, $defs behind a $ref, an
# anyOf branch; and no additionalProperties anywhere.
LOOSE = {
    "type": "object",
    "properties": {
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "note": {"type": "string"},
        "label": {"enum": ["positive", "negative"]},
        "author": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                   "required": ["name"]},
        "spans": {"type": "array", "items": {"type": "object", "properties": {"start": {"type": "integer"},
                                                                              "end": {"type": "integer"}},
                                             "required": ["start"]}},
        "place": {"$ref": "#/$defs/place", "description": "where it happened"},  # a keyword beside $ref
        "either": {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"x": {"type": "number"}}}]},
    },
    "required": ["score"],
    "$defs": {"place": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def openai_job(make_job, sim, monkeypatch, schema, texts=("one", "two", "three"), **model):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-strict-test")
    return make_job(sim, rows=[{"review_id": f"r{i}", "text": text} for i, text in enumerate(texts)],
                    model={"provider": "openai", "params": {"max_tokens": 400, **model}},
                    output={"json_schema": schema})


def sent_format(sim) -> dict:
    return sim.bodies()[0]["response_format"]


def test_optional_keys_are_sent_as_strict_mode_takes_them_and_every_row_answers(start_sim, make_job, run_cli,
                                                                                 monkeypatch):
    sim = start_sim(keep_bodies=True, openai_strict=True)
    job = openai_job(make_job, sim, monkeypatch, LOOSE)
    code, _, err = run_cli("run", job)
    assert code == 0, err
    assert sim.stats()["by_status"] == {"200": 3}
    response_format = sent_format(sim)
    assert response_format["json_schema"]["strict"] is True and strict_schema_problem(sim.bodies()[0]) is None
    sent = response_format["json_schema"]["schema"]
    assert sorted(sent["required"]) == sorted(LOOSE["properties"]) and sent["additionalProperties"] is False
    assert sent["properties"]["note"] == {"type": ["string", "null"]}
    assert sent["$defs"]["place"]["required"] == ["city"]
    assert sent["properties"]["place"] == {"anyOf": [{"$ref": "#/$defs/place"}, {"type": "null"}],
                                           "description": "where it happened"}
    table = pq.read_table(job.parent / "out" / "result.parquet")
    types = {name: table.schema.field(name).type for name in LOOSE["properties"]}
    assert types["score"] == pa.int64() and types["note"] == pa.string() and types["label"] == pa.string()
    fields = {field.name: field.type for field in types["author"]}  # closed by strict mode: a struct
    assert fields == {"name": pa.string(), "age": pa.int64()}
    assert {field.name: field.type for field in types["spans"].value_type} == {"start": pa.int64(), "end": pa.int64()}
    for row in table.to_pylist():
        reply = json.loads(row["response"])
        assert set(reply) == set(LOOSE["properties"]) and row["score"] == reply["score"]
        assert row["author"] == {"name": reply["author"]["name"], "age": reply["author"]["age"]}


@pytest.mark.parametrize(("part", "why"), [
    ({"extra": {"type": "object"}}, "an object whose keys are not fixed at $.properties.extra"),
    ({"open": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True}},
     "additionalProperties true at $.properties.open"),
    ({"both": {"allOf": [{"type": "string"}, {"type": "string"}]}}, "allOf at $.properties.both"),
    ({"tags": {"type": "object", "patternProperties": {"^t": {"type": "string"}}, "additionalProperties": False}},
     "patternProperties at $.properties.tags"),
    ({"other": {"type": "string", "not": {"const": "x"}}}, "not at $.properties.other"),
    ({"anything": {"description": "any JSON value"}}, "a value of any type at $.properties.anything"),
    ({"list": {"type": "array", "items": {}}}, "a value of any type at $.properties.list.items"),
])
def test_a_schema_strict_mode_cannot_express_is_sent_with_strict_false_and_a_warning(
        start_sim, make_job, run_cli, monkeypatch, part, why):
    sim = start_sim(keep_bodies=True, openai_strict=True)
    schema = {"type": "object", "properties": {"score": {"type": "integer"}, **part}, "required": ["score"]}
    job = openai_job(make_job, sim, monkeypatch, schema, texts=("one",))
    code, _, err = run_cli("validate", job)
    assert code == 0, err
    warning = "sent with strict: false, as OpenAI's strict mode cannot express it"
    assert warning in err and why in err
    code, _, err = run_cli("run", job)
    assert code in (0, 1), err  # the reply is the simulator's; the point is that it was not refused
    assert sim.stats()["by_status"] == {"200": 1}
    assert sent_format(sim)["json_schema"] == {"name": "output", "schema": schema, "strict": False}


def test_constraints_strict_mode_refuses_are_left_out_of_the_request_and_checked_by_batch(
        start_sim, make_job, run_cli, monkeypatch):
    """maxLength, a format OpenAI does not list, oneOf: strict mode refuses them, yet they only narrow the values, so
    the request goes strict without them (oneOf as anyOf) and batch checks each reply against them."""
    sim = start_sim(keep_bodies=True, openai_strict=True)
    schema = {"type": "object", "required": ["code", "link", "pick"], "properties": {
        "code": {"type": "string", "maxLength": 20}, "link": {"type": "string", "format": "uri"},
        "pick": {"oneOf": [{"type": "integer"}, {"type": "string"}]}}}
    too_long = json.dumps({"code": "x" * 21, "link": "l", "pick": 1})
    job = openai_job(make_job, sim, monkeypatch, schema, texts=("fits", f"too long {reply_marker(too_long)}"))
    code, _, err = run_cli("run", job)
    assert code == 1, err
    assert sim.stats()["by_status"] == {"200": 4}  # 1 + 3 attempts, none refused
    sent = sent_format(sim)["json_schema"]
    assert sent["strict"] is True and sent["schema"]["properties"] == {
        "code": {"type": "string"}, "link": {"type": "string"}, "pick": {"anyOf": [{"type": "integer"},
                                                                                  {"type": "string"}]}}
    rows = {row["text"]: row for row in pq.read_table(job.parent / "out" / "result.parquet").to_pylist()}
    assert rows["fits"]["status"] == "ok"
    bad = rows[f"too long {reply_marker(too_long)}"]
    assert (bad["error_class"], bad["attempts"]) == ("bad_json", 3)
    assert bad["error"].startswith("the reply does not match output.json_schema at $.code: ")
    assert "is too long" in bad["error"]


@pytest.mark.parametrize("where", ["params", "extra_body"])
def test_a_strict_response_format_of_the_jobs_own_that_openai_would_refuse_is_refused_at_its_line(
        sim, make_job, run_cli, monkeypatch, where):
    own = {"type": "json_schema", "json_schema": {"name": "mine", "strict": True, "schema": LOOSE}}
    params = {"response_format": own} if where == "params" else {"extra_body": {"response_format": own}}
    job = openai_job(make_job, sim, monkeypatch, None, **params)
    key = "model.params.response_format" if where == "params" else "model.params.extra_body.response_format"
    line = next(n for n, text in enumerate(job.read_text().splitlines(), 1) if "response_format:" in text)
    code, _, err = run_cli("validate", job)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{job} line {line}: {key}: OpenAI's strict mode refuses this schema (it needs " in err
    assert sim.stats()["requests"] == 0
    own["json_schema"]["strict"] = False  # the job's own choice, sent as it is
    job = openai_job(make_job, sim, monkeypatch, None, **params)
    assert run_cli("validate", job)[0] == 0


def test_the_simulator_refuses_a_strict_schema_as_openai_does(start_sim):
    """The test double itself: OpenAI's 400 and its words for each rule, and a schema that keeps them accepted."""
    sim = start_sim(openai_strict=True)

    def post(schema, strict=True):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "output", "schema": schema, "strict": strict}}}
        request = urllib.request.Request(sim.url + "/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, body = post(LOOSE)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == ("Invalid schema for response_format 'output': In context=(), "
                                        "'additionalProperties' is required to be supplied and to be false.")
    status, body = post({**LOOSE, "additionalProperties": False})
    assert status == 400 and body["error"]["message"].endswith(
        "'required' is required to be supplied and to be an array including every key in properties. Missing 'note'.")
    status, body = post({"anyOf": [{"type": "object"}]})
    assert status == 400 and "must be a JSON Schema of 'type: \"object\"'" in body["error"]["message"]
    assert post(openai_strict(LOOSE).schema)[0] == 200
    assert post(LOOSE, strict=False)[0] == 200


SCALAR = st.sampled_from([{"type": "string"}, {"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"},
                          {"type": "number"}, {"enum": ["a", "b"]}, {"type": ["string", "null"]}])


def _objects(children):
    return st.dictionaries(st.sampled_from(["a", "b", "on", "2024", "x y"]), children, min_size=1, max_size=4).flatmap(
        lambda properties: st.fixed_dictionaries({
            "type": st.just("object"), "properties": st.just(properties),
            "required": st.lists(st.sampled_from(sorted(properties)), unique=True),
        }, optional={"additionalProperties": st.just(False)}))


SCHEMAS = st.recursive(SCALAR, lambda children: st.one_of(
    _objects(children),
    st.fixed_dictionaries({"type": st.just("array"), "items": children}),
    st.fixed_dictionaries({"anyOf": st.lists(children, min_size=1, max_size=2)}),
), max_leaves=8)


@given(root=_objects(SCHEMAS), seed=st.text(max_size=4))
def test_any_schema_of_supported_kinds_becomes_one_strict_mode_takes(root, seed):
    """Whatever the nesting of objects (optional keys, additionalProperties set or not), arrays and anyOf: the schema
    made strict is one OpenAI would take, valid JSON Schema, and the replies drawn from it match it."""
    made = openai_strict(root)
    assert made.blocker is None
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "o", "strict": True,
                                                                       "schema": made.schema}}}
    assert strict_schema_problem(body) is None
    Draft202012Validator.check_schema(made.schema)
    reply = conforming(made.schema, seed, "$")
    assert not list(Draft202012Validator(made.schema).iter_errors(reply))
    assert openai_strict(made.schema).changes == []  # made strict once, nothing left to change
