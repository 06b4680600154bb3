"""run_frame's DataFrame out: an ordinary frame pandas can write, reply keys named beside the frame's columns,
output settings and the Batch API from Python, and hints in Python's words. Over HTTP to the simulator.
`make test` runs this file under pandas 2 as well (.venv-pandas2)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import batch
from batch.simulator import SimulatorThread, answer_for, reply_marker


def local_model(sim: SimulatorThread, **params: Any) -> dict[str, Any]:
    return {"provider": "local", "name": "glm-4-flash", "base_url": sim.url, "params": {"max_tokens": 64, **params}}


def frame_of(count: int) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"review {i}" for i in range(count)]},
                        index=pd.Index([f"r{i}" for i in range(count)], name="review_id"))


def expected(text: str) -> str:
    return answer_for("glm-4-flash", [{"role": "user", "content": f"Classify: {text}"}])


def test_the_result_and_any_slice_of_it_write_to_parquet_with_the_runs_summary(sim, tmp_path):
    answered = batch.run_frame(frame_of(3), template="Classify: {text}", model=local_model(sim),
                               output=tmp_path / "o.parquet", progress=False)
    answered.to_parquet(tmp_path / "whole.parquet")
    answered.iloc[1:][["response", "cost"]].to_parquet(tmp_path / "slice.parquet")
    answered.to_json(tmp_path / "whole.json")

    read = pd.read_parquet(tmp_path / "whole.parquet")
    assert read["response"].tolist() == [expected(f"review {i}") for i in range(3)]
    assert read.attrs["batch_summary"] == answered.attrs["batch_summary"]
    assert pd.read_parquet(tmp_path / "slice.parquet").attrs["batch_summary"]["job_totals"]["ok"] == 3
    result = batch.RunResult.from_summary(answered.attrs["batch_summary"])
    assert result.ok == 3 and result.complete and "all runs: ok 3, failed 0, pending 0" in str(result)


def test_reply_keys_named_like_the_frames_columns_get_the_batch_prefix(sim, tmp_path):
    schema = {"type": "object", "required": ["text", "label", "status", "score"],
              "properties": {"text": {"type": "string"}, "label": {"type": "string"},
                             "status": {"type": "string"}, "score": {"type": "integer"}}}
    frame = pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"], "status": ["new", "old"]})
    answered = batch.run_frame(frame, template="Classify: {text}", model=local_model(sim),
                               output=tmp_path / "o.parquet", json_schema=schema, progress=False)

    assert answered[["text", "label", "status"]].equals(frame)  # the frame's own columns, as they were
    assert answered["batch_status"].tolist() == ["ok", "ok"]  # the answer's status: the frame has a status
    replies = [json.loads(r) for r in answered["response"]]
    # A key named like a frame column: batch_KEY; named like an answer column (status): json_KEY, as in the file.
    assert answered["batch_text"].tolist() == [r["text"] for r in replies]
    assert answered["batch_label"].tolist() == [r["label"] for r in replies]
    assert answered["json_status"].tolist() == [r["status"] for r in replies]
    assert answered["score"].tolist() == [r["score"] for r in replies]
    assert "json_text" not in answered and "json_label" not in answered


def test_every_column_of_the_result_has_a_name_of_its_own(sim, tmp_path):
    schema = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}
    frame = pd.DataFrame({"text": ["a", "b"], "status": ["new", "old"], "batch_status": [1, 2], "batch_text": [3, 4]})
    answered = batch.run_frame(frame, template="Classify: {text}", model=local_model(sim),
                               output=tmp_path / "o.parquet", json_schema=schema, progress=False)
    assert answered.columns.is_unique and answered[frame.columns].equals(frame)
    assert answered["batch_batch_status"].tolist() == ["ok", "ok"]
    assert answered["batch_batch_text"].tolist() == [json.loads(r)["text"] for r in answered["response"]]
    answered.to_parquet(tmp_path / "whole.parquet")


def test_output_settings_go_into_the_job_files_output_section(sim, tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text('{"type": "object", "required": ["label"], "properties": {"label": {"type": "string"}}}')
    answered = batch.run_frame(frame_of(2), template="Classify: {text}", model=local_model(sim),
                               output=tmp_path / "out" / "o.parquet", json_schema=str(schema_file),
                               json_attempts=2, progress=False)
    assert answered["label"].notna().all()
    with pytest.raises(batch.ConfigError, match="output_format"):
        batch.run_frame(frame_of(2), template="Classify: {text}", model=local_model(sim),
                        output=tmp_path / "o2.parquet", output_format="csv")


def test_the_batch_api_from_python_without_wait_raises_batches_live_and_a_later_call_collects(start_sim, tmp_path):
    sim = start_sim(batch_speed=0)  # the provider's clock moves only when the test says
    settings = {"template": "Classify: {text}", "model": local_model(sim), "output": tmp_path / "o.parquet",
                "mode": "batch_api", "batch_api": {"poll_interval_s": 0.05}, "progress": False}
    with pytest.raises(batch.BatchesLive) as stopped:
        batch.run_frame(frame_of(4), **settings)
    message = str(stopped.value)
    assert "1 Batch API batch still being worked on" in message and "wait=True" in message
    assert "stopped: None" not in message and "--wait" not in message
    assert stopped.value.exit_code == 6 and stopped.value.result.pending == 4
    assert "wait=True" in str(stopped.value.result) and "--wait" not in str(stopped.value.result)

    sim.advance(3600)
    answered = batch.run_frame(frame_of(4), **settings)
    assert answered["response"].tolist() == [expected(f"review {i}") for i in range(4)]


def test_the_batch_api_from_python_with_wait_returns_every_answer(start_sim, tmp_path):
    sim = start_sim(batch_speed=10_000)
    answered = batch.run_frame(frame_of(3), template="Classify: {text}", model=local_model(sim),
                               output=tmp_path / "o.parquet", mode="batch_api", wait=True,
                               batch_api={"poll_interval_s": 0.01}, progress=False)
    assert answered["response"].tolist() == [expected(f"review {i}") for i in range(3)]
    assert sim.stats()["batch_api"]["batches_created"] == 1
    with pytest.raises(batch.ConfigError, match="mode is 'online' or 'batch_api', not 'batch'"):
        batch.run_frame(frame_of(3), template="Classify: {text}", model=local_model(sim),
                        output=tmp_path / "o.parquet", mode="batch")


def test_hints_name_the_keyword_argument_not_the_command_line_option(sim, tmp_path):
    settings = {"template": "Classify: {text}", "output": tmp_path / "o.parquet", "progress": False}
    batch.run_frame(frame_of(2), model=local_model(sim), **settings)
    with pytest.raises(batch.ConfigError, match="run again with force=True to resume anyway") as refused:
        batch.run_frame(frame_of(2), model=local_model(sim, temperature=0.5), **settings)
    assert "--force" not in str(refused.value)
    (tmp_path / "o.checkpoint" / "fingerprint.json").write_text("{damaged")
    with pytest.raises(batch.ConfigError, match="run with force=True to write it again"):
        batch.run_frame(frame_of(2), model=local_model(sim), **settings)


# -- ids: named like an output column, blanks around labels --------------------------------------------------------

def test_an_index_or_id_column_named_like_an_output_column_keeps_its_ids(sim, tmp_path):
    for name, frame, id_column in [
        ("index", frame_of(3).rename_axis("status"), None),
        ("column", frame_of(3).reset_index().rename(columns={"review_id": "cost"}), "cost"),
        ("unnamed", frame_of(3).reset_index(drop=True).assign(index=["a", "b", "c"]), None),
    ]:
        output = tmp_path / f"{name}.parquet"
        answered = batch.run_frame(frame, template="Classify: {text}", model=local_model(sim), output=output,
                                   id_column=id_column, progress=False)
        assert answered.index.equals(frame.index) and answered[frame.columns].equals(frame), name
        status = "status" if "status" not in frame.columns else "batch_status"
        assert answered[status].tolist() == ["ok"] * 3, name
        assert answered["response"].tolist() == [expected(t) for t in frame["text"]], name
        written = batch.read_results(output)  # the final file: the ids beside every answer column
        ids = frame[id_column] if id_column else frame.index
        assert written.iloc[:, 0].tolist() == [str(i) for i in ids] and written.columns[0].startswith("batch_"), name
        assert written["status"].tolist() == ["ok"] * 3 and written["cost"].notna().all(), name
    assert sim.stats()["requests"] == 9


def test_index_labels_with_blanks_keep_their_rows_and_never_collide(sim, tmp_path):
    frame = pd.DataFrame({"text": ["a", "b"]}, index=["k1 ", " k2"])
    answered = batch.run_frame(frame, template="Classify: {text}", model=local_model(sim),
                               output=tmp_path / "o.parquet", progress=False)
    assert answered.index.tolist() == ["k1 ", " k2"] and answered["response"].tolist() == [expected("a"), expected("b")]

    refused = [
        (pd.DataFrame({"text": ["a", "b"]}, index=["k1 ", "k1"]),
         None, "the frame's index holds 'k1 ' and 'k1', one id once the blanks around them are trimmed"),
        (pd.DataFrame({"text": ["a", "b"]}, index=["k1", "  "]), None, "the frame's index has no id at row 2"),
        (pd.DataFrame({"text": ["a", "b"], "key": ["x", None]}), "key", "id_column 'key' has no id at row 2"),
    ]
    for frame, id_column, message in refused:
        with pytest.raises(batch.ConfigError, match=message):
            batch.run_frame(frame, template="Classify: {text}", model=local_model(sim),
                            output=tmp_path / "refused" / "o.parquet", id_column=id_column)
    assert not (tmp_path / "refused").exists() and sim.stats()["requests"] == 2


def test_an_id_column_of_dates_or_numbers_matches_its_rows(sim, tmp_path):
    frame = pd.DataFrame({"text": ["a", "b"], "day": pd.to_datetime(["2024-01-01", "2024-01-02"]),
                          "score": [1.5, 2.0]})
    for id_column in ("day", "score"):
        answered = batch.run_frame(frame, template="Classify: {text}", model=local_model(sim),
                                   output=tmp_path / f"{id_column}.parquet", id_column=id_column, progress=False)
        assert answered["status"].tolist() == ["ok", "ok"] and answered[id_column].equals(frame[id_column])


@pytest.mark.parametrize("column", ["status", "response", "cost", "error", "model", "attempts"])
def test_the_command_line_refuses_an_id_column_named_like_an_output_column(sim, make_job, run_cli, column):
    job = make_job(sim, rows=[{column: "k1", "text": "a"}, {column: "k2", "text": "b"}],
                   input={"id_column": column})
    for command in ("validate", "run"):
        code, _, err = run_cli(command, job)
        assert code == 2 and f"input.id_column: '{column}' is also the name of a result column" in err
    assert sim.stats()["requests"] == 0


# -- the API key: blanks around it (a key file's line break) -------------------------------------------------------

KEY = "sk-frames-0123456789"


def test_a_key_with_a_trailing_line_break_is_sent_without_it(start_sim, make_job, run_cli, tmp_path, monkeypatch):
    sim = start_sim(api_key=KEY)  # any other Authorization is refused with 401
    answered = batch.run_frame(frame_of(2), template="Classify: {text}", model=local_model(sim),
                               output=tmp_path / "py.parquet", api_key=KEY + "\n", progress=False)
    assert answered["status"].tolist() == ["ok", "ok"]

    job = make_job(sim, rows=[{"review_id": "k1", "text": "a"}], model={"api_key_env": "FRAMES_TEST_KEY"})
    monkeypatch.setenv("FRAMES_TEST_KEY", f" {KEY}\r\n")
    assert run_cli("run", job)[0] == 0
    monkeypatch.delenv("FRAMES_TEST_KEY")
    (tmp_path / ".env").write_text(f'FRAMES_TEST_KEY="{KEY}\\n"\n')  # a quoted \n: a line break in the value
    job = make_job(sim, rows=[{"review_id": "k1", "text": "a"}], model={"api_key_env": "FRAMES_TEST_KEY"},
                   output={"path": "dotenv/result.parquet"})
    assert run_cli("run", job)[0] == 0
    assert sim.stats()["by_status"] == {"200": 4}  # every request carried the key: none was refused


def test_a_key_with_a_blank_inside_is_refused_before_anything_is_sent(sim, make_job, run_cli, tmp_path, monkeypatch):
    with pytest.raises(batch.ConfigError, match="api_key: the API key holds a line break inside it") as refused:
        batch.run_frame(frame_of(2), template="Classify: {text}", model=local_model(sim),
                        output=tmp_path / "py.parquet", api_key="sk-one\nsk-two")
    assert "sk-one" not in str(refused.value)
    job = make_job(sim, rows=[{"review_id": "k1", "text": "a"}], model={"api_key_env": "FRAMES_TEST_KEY"})
    monkeypatch.setenv("FRAMES_TEST_KEY", "sk-one two")
    code, _, err = run_cli("run", job)
    assert code == 2 and "the environment variable FRAMES_TEST_KEY: the API key holds a blank inside it" in err
    assert "sk-one" not in err and sim.stats()["requests"] == 0


def test_an_output_named_for_csv_says_how_to_get_csv_from_python(sim, tmp_path):
    with pytest.raises(batch.ConfigError, match=r"for CSV or JSONL, write read_results\(...\) with to_csv") as refused:
        batch.run_frame(frame_of(2), template="Classify: {text}", model=local_model(sim), output=tmp_path / "o.csv")
    assert "batch export" not in str(refused.value) and sim.stats()["requests"] == 0


labels = st.one_of(st.text(st.sampled_from(" \tab\u3000é"), max_size=4),  # blanks around, inside, alone
                   st.text(st.characters(exclude_categories=("Cs",)), max_size=6), st.integers(-3, 3),
                   st.floats(allow_nan=True, allow_infinity=False, width=32), st.none())


@settings(max_examples=40)  # each example is a whole run_frame (files written, the input scanned)
@given(values=st.lists(labels, min_size=1, max_size=6), as_column=st.booleans())
def test_any_labels_give_the_frame_back_whole_or_one_config_error(tmp_path_factory, values, as_column):
    """Any labels: the rows come back under the frame's own index, or a ConfigError says which labels cannot be ids
    (blank, missing, or one id once trimmed). Nothing is sent (limit=0; the address answers nothing)."""
    folder = tmp_path_factory.mktemp("labels")
    texts = [f"row {i}" for i in range(len(values))]
    frame = (pd.DataFrame({"text": texts, "key": pd.Series(values, dtype=object)}) if as_column else
             pd.DataFrame({"text": texts}, index=pd.Index(values, dtype=object)))
    model = {"provider": "local", "name": "glm-4-flash", "base_url": "http://127.0.0.1:9/v1"}
    try:
        answered = batch.run_frame(frame, template="{text}", model=model, output=folder / "o.parquet", limit=0,
                                   id_column="key" if as_column else None, progress=False)
    except batch.ConfigError as exc:
        assert "has no id at row" in str(exc) or "more than once" in str(exc) or "once the blanks" in str(exc)
        return
    assert answered.index.equals(frame.index) and answered["text"].tolist() == texts
    assert (answered["status"] == "pending").all()
    ids = batch.read_results(folder / "o.parquet").iloc[:, 0].tolist()
    assert len(set(ids)) == len(values) and all(i == i.strip() and i for i in ids)


@pytest.mark.parametrize("limit", [None, 1], ids=["final file", "answers so far"])
def test_integers_beyond_float64_come_back_exact_beside_missing_values(sim, tmp_path, limit):
    big = 2**53 + 1
    frame = pd.DataFrame({"text": [reply_marker(json.dumps({"v": big, "w": -big})), reply_marker('{"v": null}')]})
    schema = {"type": "object", "properties": {"v": {"type": ["integer", "null"]}, "w": {"type": "integer"}}}
    for reading in ({"parse_json": True}, {"json_schema": schema}):
        out = tmp_path / f"{sorted(reading)[0]}.parquet"
        answered = batch.run_frame(frame, template="{text}", model=local_model(sim), output=out, progress=False,
                                   limit=limit, **reading)
        assert int(answered["v"].iloc[0]) == big and int(answered["w"].iloc[0]) == -big
        assert pd.isna(answered["v"].iloc[1]) and pd.isna(answered["w"].iloc[1])
        assert batch.read_results(out)["v"].iloc[0] == big


def test_a_multiindex_frame_is_one_config_error_naming_what_to_do(sim, tmp_path):
    frame = pd.DataFrame({"text": ["a", "b"]}, index=pd.MultiIndex.from_tuples([("x", 1), ("x", 2)]))
    with pytest.raises(batch.ConfigError, match=r"index has 2 levels \(a MultiIndex\).*pass id_column="):
        batch.run_frame(frame, template="{text}", model=local_model(sim), output=tmp_path / "o.parquet",
                        progress=False)
    assert sim.stats()["requests"] == 0
    frame["key"] = ["x1", "x2"]
    answered = batch.run_frame(frame, template="{text}", model=local_model(sim), output=tmp_path / "o.parquet",
                               progress=False, id_column="key")
    assert answered.index.equals(frame.index) and answered["status"].tolist() == ["ok", "ok"]


@pytest.mark.parametrize("text", ['{"type":"object"}', "type: object"])
def test_schema_text_in_a_string_is_one_config_error_in_pythons_words(sim, tmp_path, text):
    with pytest.raises(batch.ConfigError, match=r"^run_frame: json_schema= is a schema written as text in a string.*"
                                                r"as a mapping \(json.loads\(text\)\)"):
        batch.run_frame(frame_of(1), template="{text}", model=local_model(sim), output=tmp_path / "o.parquet",
                        progress=False, json_schema=text)
    assert sim.stats()["requests"] == 0


@pytest.mark.parametrize("given", ["run_frame", "mapping"])
def test_a_missing_schema_file_given_from_python_says_it_is_relative_to_the_working_directory(
        sim, tmp_path, monkeypatch, given):
    """From Python a relative path is relative to the working directory (a job file's, to the job file): the one
    line says so, and the same path works once the file is there."""
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "out" / "o.parquet"

    def run() -> Any:
        if given == "run_frame":
            return batch.run_frame(frame_of(2), template="{text}", model=local_model(sim), output=output,
                                   progress=False, json_schema="schema.json")
        (tmp_path / "in.csv").write_text("review_id,text\nr0,a\nr1,b\n")
        return batch.run({"name": "s", "input": {"path": "in.csv", "id_column": "review_id"},
                          "prompt": {"template": "{text}"}, "model": local_model(sim),
                          "output": {"path": str(output), "json_schema": "schema.json"}}, progress=False)

    with pytest.raises(batch.ConfigError) as refused:
        run()
    message = str(refused.value)
    assert "schema.json not found (a relative path is relative to the working directory)" in message, message
    assert "job file" not in message.partition("not found")[2]
    assert sim.stats()["requests"] == 0
    (tmp_path / "schema.json").write_text(json.dumps({"type": "object"}))
    run()
    assert sim.stats()["requests"] == 2


def test_a_schema_key_holding_a_next_line_character_reaches_the_job_file_unchanged(sim, tmp_path):
    """PyYAML writes U+0085 (NEL) where YAML reads a line break: the job file run_frame writes must still load back
    as the settings given, or the schema would refuse the very replies it describes."""
    key = "a\x85b"
    schema = {"type": "object", "additionalProperties": False, "required": [key],
              "properties": {key: {"type": "integer"}}}
    frame = pd.DataFrame({"text": [f"{reply_marker(json.dumps({key: n}))} row {n}" for n in range(3)]})
    out = batch.run_frame(frame, template="{text}", model=local_model(sim), output=tmp_path / "out.parquet",
                          progress=False, json_schema=schema)
    assert out["status"].tolist() == ["ok"] * 3, out["error"].tolist()


def test_run_frame_refuses_an_output_url_in_one_line_and_writes_nothing(sim, tmp_path, monkeypatch):
    """run_frame writes the frame and its job file beside a local output (each whole, atomically); a URL
    was taken for a local path (s3://b/o.parquet as a folder "s3:" in the working directory)."""
    monkeypatch.chdir(tmp_path)
    frame = pd.DataFrame({"text": ["a", "b"]})
    with pytest.raises(batch.ConfigError, match=r"^run_frame: output s3://bucket/o\.parquet is a URL"):
        batch.run_frame(frame, template="Classify: {text}", model=local_model(sim), output="s3://bucket/o.parquet")
    assert list(tmp_path.iterdir()) == []
    answered = batch.run_frame(frame, template="Classify: {text}", model=local_model(sim), output="o.parquet")
    assert list(answered["status"]) == ["ok", "ok"] and list(tmp_path.rglob(".*.tmp")) == []
