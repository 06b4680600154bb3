"""Every user mistake: one `batch: error: ` line on stderr naming what is wrong, exit 2, no traceback, no request."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import output_of

ROWS = [{"review_id": "r1", "text": "good"}, {"review_id": "r2", "text": "bad"}]


def run_fails(run_cli, job: Path | str, *needles: str, sim=None) -> str:
    """Run the job, check the bad-input contract, and return the error line."""
    code, out, err = run_cli("run", job)
    assert "Traceback" not in err and "Traceback" not in out
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("batch: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    if sim is not None:
        assert sim.stats()["requests"] == 0
    return line


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- the job file -------------------------------------------------------------------------------

def test_missing_job_file(tmp_path, run_cli):
    missing = tmp_path / "nope.yaml"
    run_fails(run_cli, missing, str(missing), "not found")


def test_job_file_is_a_directory(tmp_path, run_cli):
    run_fails(run_cli, tmp_path, str(tmp_path), "cannot read job file")


@pytest.mark.parametrize("text, line", [
    ("name: x\ninput:\n\tpath: a.csv\n", 3),          # a tab for indentation
    ("name: x\nlimits: {concurrency: [1, 2\n", 3),      # an unclosed bracket
])
def test_invalid_yaml_names_file_and_line(tmp_path, run_cli, text, line):
    job = write(tmp_path / "job.yaml", text)
    run_fails(run_cli, job, str(job), f"line {line}", "invalid YAML")


@pytest.mark.parametrize("text, kind", [("- name: x\n- model: y\n", "list"), ("", "NoneType"), ("just text\n", "str")])
def test_yaml_that_is_not_a_mapping(tmp_path, run_cli, text, kind):
    job = write(tmp_path / "job.yaml", text)
    run_fails(run_cli, job, str(job), "mapping", kind)


def test_unknown_top_level_key(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, limts={"concurrency": 4})
    run_fails(run_cli, job, str(job), "unknown key 'limts'", "did you mean 'limits'", sim=sim)


def test_unknown_nested_key(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, limits={"concurency": 4})
    run_fails(run_cli, job, str(job), "unknown key 'limits.concurency'", "did you mean 'concurrency'", sim=sim)


def test_wrong_type(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, limits={"concurrency": "eight"})
    run_fails(run_cli, job, str(job), "limits.concurrency", "'eight'", sim=sim)


def test_out_of_range_value(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, limits={"concurrency": 0})
    run_fails(run_cli, job, str(job), "limits.concurrency", "greater than or equal to 1", sim=sim)


def test_missing_required_key(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, model={"provider": "local", "base_url": sim.url})  # deep merge keeps name: rewrite
    text = job.read_text(encoding="utf-8").replace("  name: glm-4-flash\n", "")
    assert "glm-4-flash" not in text
    write(job, text)
    run_fails(run_cli, job, str(job), "missing key 'model.name'", sim=sim)


def test_template_and_messages_column_both_set(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, prompt={"template": "{text}", "messages_column": "text"})
    run_fails(run_cli, job, str(job), "prompt", "exactly one of 'template' or 'messages_column'", sim=sim)


def test_template_and_messages_column_neither_set(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, prompt={"template": None, "system": "hi"})
    run_fails(run_cli, job, str(job), "prompt", "exactly one of 'template' or 'messages_column'", sim=sim)


# -- the input table ----------------------------------------------------------------------------

def test_missing_input_file(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS)
    (tmp_path / "reviews.csv").unlink()
    run_fails(run_cli, job, str(tmp_path / "reviews.csv"), "not found", sim=sim)


def test_unsupported_extension(sim, make_job, run_cli, tmp_path):
    (tmp_path / "reviews.xlsx").write_bytes(b"PK\x03\x04 not really a workbook")
    job = make_job(sim, rows=ROWS, input={"path": "reviews.xlsx"})
    run_fails(run_cli, job, str(job), "input.path", "'.xlsx'", ".csv", sim=sim)


def test_csv_with_header_only(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS)
    data = write(tmp_path / "reviews.csv", "review_id,text\n")
    run_fails(run_cli, job, str(data), "no rows", sim=sim)


def test_zero_byte_csv(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS)
    data = tmp_path / "reviews.csv"
    data.write_bytes(b"")
    run_fails(run_cli, job, str(data), "Empty CSV", sim=sim)


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_empty_jsonl(sim, make_job, run_cli, tmp_path, content):
    job = make_job(sim, rows=ROWS, input_file="reviews.jsonl")
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(content)
    run_fails(run_cli, job, str(data), "no rows", sim=sim)


def test_column_used_by_job_appears_twice_in_header(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS)
    data = write(tmp_path / "reviews.csv", "review_id,text,text\nr1,good,bad\n")
    run_fails(run_cli, job, str(data), "'text'", "2 times", sim=sim)


def test_template_names_missing_column(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS, prompt={"template": "Say: {nope}"})
    run_fails(run_cli, job, str(tmp_path / "reviews.csv"), "'nope'", sim=sim)


def test_messages_column_missing(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS, prompt={"template": None, "messages_column": "chat"})
    run_fails(run_cli, job, str(tmp_path / "reviews.csv"), "'chat'", sim=sim)


def test_keep_columns_names_missing_column(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS, output={"keep_columns": ["text", "stars"]})
    run_fails(run_cli, job, str(tmp_path / "reviews.csv"), "output.keep_columns", "'stars'", sim=sim)


def test_id_column_names_missing_column(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS, input={"id_column": "id"})
    run_fails(run_cli, job, str(tmp_path / "reviews.csv"), "input.id_column", "'id'", sim=sim)


@pytest.mark.parametrize("input_file", ["reviews.csv", "reviews.parquet", "reviews.jsonl"])
def test_duplicate_ids(sim, make_job, run_cli, tmp_path, input_file):
    rows = [{"review_id": "a", "text": "x"}, {"review_id": "b", "text": "y"}, {"review_id": "a", "text": "z"}]
    job = make_job(sim, rows=rows, input_file=input_file)
    run_fails(run_cli, job, str(tmp_path / input_file), "row 3", "duplicate id 'a'", "review_id", sim=sim)


@pytest.mark.parametrize("bad", [None, "", "   "])
def test_empty_id(sim, make_job, run_cli, tmp_path, bad):
    rows = [{"review_id": "a", "text": "x"}, {"review_id": bad, "text": "y"}]
    job = make_job(sim, rows=rows)
    run_fails(run_cli, job, str(tmp_path / "reviews.csv"), "row 2", "empty id", "review_id", sim=sim)


def test_csv_not_utf8(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS)
    data = tmp_path / "reviews.csv"
    data.write_bytes(b"review_id,text\nr1,good\nr2," + "评论很好".encode("gbk") + b"\n")
    run_fails(run_cli, job, str(data), "UTF-8", sim=sim)


def test_csv_header_not_utf8(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS, prompt={"template": "{text}"})
    data = tmp_path / "reviews.csv"
    data.write_bytes(b"review_id,text," + "评论".encode("gbk") + b"\nr1,good,x\n")
    run_fails(run_cli, job, str(data), "UTF-8", sim=sim)


def test_jsonl_not_utf8(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS, input_file="reviews.jsonl")
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(b'{"review_id": "r1", "text": "' + "评论".encode("gbk") + b'"}\n')
    run_fails(run_cli, job, str(data), "UTF-8", sim=sim)


@pytest.mark.parametrize("broken_line", [1, 3])
def test_jsonl_broken_line(sim, make_job, run_cli, tmp_path, broken_line):
    job = make_job(sim, rows=ROWS, input_file="reviews.jsonl")
    lines = ['{"review_id": "r1", "text": "good"}', '{"review_id": "r2", "text": "bad"}',
             '{"review_id": "r3", "text": "ok"}']
    lines[broken_line - 1] = '{"review_id": "r9", "text": "oops"'
    data = write(tmp_path / "reviews.jsonl", "\n".join(lines) + "\n")
    run_fails(run_cli, job, str(data), f"line {broken_line}", "JSON", sim=sim)


def test_jsonl_line_not_an_object(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS, input_file="reviews.jsonl")
    data = write(tmp_path / "reviews.jsonl", '{"review_id": "r1", "text": "good"}\n["r2", "bad"]\n')
    run_fails(run_cli, job, str(data), "line 2", "JSON object", sim=sim)


def test_corrupt_parquet(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS, input_file="reviews.parquet")
    data = write(tmp_path / "reviews.parquet", "review_id,text\nr1,good\n")
    run_fails(run_cli, job, str(data), "cannot read PARQUET", sim=sim)


# -- the prompt template --------------------------------------------------------------------------

@pytest.mark.parametrize("template, needle", [
    ("Classify: {0}", "{0}"),
    ("Classify: {}", "{}"),
    ("Classify: {text.upper}", "{text.upper}"),
    ("Classify: {text[0]}", "{text[0]}"),
    ("Classify: {text!r}", "{text!r}"),
    ("Classify: {text:>10}", "{text:>10}"),
    ("Classify: {text", "expected '}'"),
    ("Classify: text}", "'}'"),
])
def test_bad_template_placeholder(sim, make_job, run_cli, template, needle):
    job = make_job(sim, rows=ROWS, prompt={"template": template})
    run_fails(run_cli, job, "prompt.template", needle, sim=sim)


# -- the API key ----------------------------------------------------------------------------------

def test_api_key_unset_for_provider(sim, make_job, run_cli, tmp_path, monkeypatch):
    monkeypatch.delenv("ZHIPU_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    job = make_job(sim, rows=ROWS, model={"provider": "zhipu"})
    run_fails(run_cli, job, str(job), "ZHIPU_API_KEY", sim=sim)


def test_api_key_unset_for_custom_variable(sim, make_job, run_cli, tmp_path, monkeypatch):
    monkeypatch.delenv("MY_KEY_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    job = make_job(sim, rows=ROWS, model={"provider": "local", "api_key_env": "MY_KEY_VAR"})
    run_fails(run_cli, job, str(job), "MY_KEY_VAR", sim=sim)


def test_api_key_empty_counts_as_unset(sim, make_job, run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("ZHIPU_API_KEY", "")
    monkeypatch.chdir(tmp_path)
    job = make_job(sim, rows=ROWS, model={"provider": "zhipu"})
    run_fails(run_cli, job, str(job), "ZHIPU_API_KEY", sim=sim)


# -- and a good job still runs ----------------------------------------------------------------------

def test_valid_job_still_works(sim, make_job, run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("ZHIPU_API_KEY", "sk-test-key-123456")
    monkeypatch.chdir(tmp_path)
    job = make_job(sim, rows=ROWS, model={"provider": "zhipu"})
    code, out, err = run_cli("run", job)
    assert code == 0, err
    assert "Traceback" not in err and "batch: error" not in err
    assert list(output_of(job)["status"]) == ["ok", "ok"]
    assert sim.stats()["requests"] == len(ROWS)


@pytest.mark.parametrize("input_file, content", [
    ("reviews.csv", "review_id,text\nr1,good\nr2,bad\n"),
    ("reviews.jsonl", '{"review_id": "r1", "text": "good"}\n{"review_id": "r2", "text": "bad"}\n'),
])
def test_utf8_with_bom_is_not_an_error(sim, make_job, run_cli, tmp_path, input_file, content):
    job = make_job(sim, rows=ROWS, input_file=input_file)
    (tmp_path / input_file).write_bytes(content.encode("utf-8-sig"))
    code, out, err = run_cli("run", job)
    assert code == 0, err
    assert "Traceback" not in err and "batch: error" not in err
    assert list(output_of(job)["review_id"]) == ["r1", "r2"]


def test_a_cache_path_that_cannot_be_created_is_one_line(sim, make_job, run_cli, tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    job = make_job(sim, cache={"path": "blocker/answers.sqlite"})
    code, _, err = run_cli("run", job)
    assert code == 2
    assert err.startswith("batch: error: ") and "answer cache" in err and "Traceback" not in err
    assert sim.stats()["requests"] == 0


def test_json_columns_naming_a_key_twice_is_refused_naming_the_key_and_line(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, output={"parse_json": True, "json_columns": ["a", "b", "a"]})
    line = run_fails(run_cli, job, "output.json_columns", "names the key 'a' twice", sim=sim)
    assert f"{job} line " in line
