"""The preflight: `validate` makes every check `run` makes, and `run` makes them before it writes or sends anything.

Each refused job is tried with both commands: exit 2, one line naming the key (and its line in the job
file) or the path at fault, the same line from both, no request, and no checkpoint folder.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from helpers import can_make_immutable, checkpoint_of, output_of

ROWS = [{"review_id": "r1", "text": "good"}, {"review_id": "r2", "text": "bad"}, {"review_id": "r3", "text": "ok"}]


def refused(run_cli, job: Path, *needles: str, sim=None) -> str:
    """validate and run both refuse the job with the same one-line error; returns it."""
    lines = []
    for command in ("validate", "run"):
        code, out, err = run_cli(command, job)
        assert "Traceback" not in err + out
        assert code == 2, (command, code, out, err)
        assert len(err.strip().splitlines()) == 1, err
        line = err.strip()
        assert line.startswith("batch: error: "), line
        for needle in needles:
            assert needle in line, (command, needle, line)
        lines.append(line)
    assert lines[0] == lines[1], "validate must report exactly what run would"
    if sim is not None:
        assert sim.stats()["requests"] == 0
    return lines[0]


# -- item 2: an output path that would destroy the input or tangle with a checkpoint ----------------------

@pytest.mark.parametrize("output", [
    "reviews.parquet",  # the input itself
    "out/../reviews.parquet",  # the same file, through `..`
    "link.parquet",  # a symlink to the input
    "alias/reviews.parquet",  # the input, through a symlinked folder
])
def test_output_that_is_the_input_is_refused_and_the_input_kept(sim, make_job, run_cli, tmp_path, output):
    (tmp_path / "link.parquet").symlink_to(tmp_path / "reviews.parquet")
    (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
    job = make_job(sim, input_file="reviews.parquet", output={"path": output})
    before = (tmp_path / "reviews.parquet").read_bytes()
    refused(run_cli, job, str(job), "output.path", "is the input file", sim=sim)
    assert (tmp_path / "reviews.parquet").read_bytes() == before
    assert not list(tmp_path.glob("**/*.checkpoint"))


def test_output_that_is_a_folder_is_refused_before_any_request(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS)
    (tmp_path / "out" / "result.parquet").mkdir(parents=True)
    refused(run_cli, job, str(job), "output.path", "is a folder", sim=sim)
    assert not checkpoint_of(job).exists()


def test_output_under_a_file_is_refused_before_any_request(sim, make_job, run_cli, tmp_path):
    """Found by validate too, not first by the run's first write (its log file) in the checkpoint folder."""
    (tmp_path / "out").write_text("a file where the output's folder should be")
    job = make_job(sim, rows=ROWS)
    refused(run_cli, job, "output.path", "is a file, not a folder", sim=sim)


def test_output_inside_the_inputs_checkpoint_folder_is_refused(sim, make_job, run_cli, tmp_path):
    # The input is a previous job's output: prev.checkpoint/ beside it is that job's checkpoint.
    job = make_job(sim, rows=ROWS, input_file="prev.parquet", output={"path": "prev.checkpoint/result.parquet"})
    refused(run_cli, job, "output.path", "inside the checkpoint folder", str(tmp_path / "prev.checkpoint"), sim=sim)
    assert not (tmp_path / "prev.checkpoint").exists()


def test_output_inside_another_jobs_checkpoint_folder_is_refused(sim, make_job, run_cli, tmp_path):
    other = tmp_path / "other.checkpoint"
    other.mkdir()
    (other / "fingerprint.json").write_text("{}", encoding="utf-8")
    job = make_job(sim, rows=ROWS, output={"path": "other.checkpoint/part-000099.parquet"})
    refused(run_cli, job, "output.path", "inside the checkpoint folder", str(other), sim=sim)
    assert sorted(p.name for p in other.iterdir()) == ["fingerprint.json"]


def test_checkpoint_folder_that_would_hold_the_input_is_refused(sim, make_job, run_cli, tmp_path):
    folder = tmp_path / "out" / "result.checkpoint"
    folder.mkdir(parents=True)
    job = make_job(sim, rows=ROWS, input_file="out/result.checkpoint/data.csv")
    refused(run_cli, job, "output.path", "checkpoint folder", "would hold the input", sim=sim)
    assert sorted(p.name for p in folder.iterdir()) == ["data.csv"]


# -- item 8: every check before the lock and the first write --------------------------------------------

@pytest.mark.parametrize("base_url", ["127.0.0.1:9/v1", "ftp://127.0.0.1/v1", "http://"])
def test_base_url_without_scheme_or_host_is_refused(sim, make_job, run_cli, base_url):
    job = make_job(sim, rows=ROWS, model={"base_url": base_url})
    line = refused(run_cli, job, "model.base_url", "http:// or https://", repr(base_url), sim=sim)
    assert f"{job} line " in line
    assert not checkpoint_of(job).exists()


def test_budget_without_max_tokens_leaves_no_checkpoint_so_the_fixed_job_runs(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, model={"name": "glm-4-plus", "params": {"max_tokens": None}}, budget={"max_cost": 1})
    refused(run_cli, job, "budget", "needs model.params.max_tokens", sim=sim)
    assert not checkpoint_of(job).exists()
    fixed = make_job(sim, rows=ROWS, model={"name": "glm-4-plus", "params": {"max_tokens": 16}}, budget={"max_cost": 1})
    code, _, err = run_cli("run", fixed)
    assert code == 0, err
    assert sim.stats()["requests"] == len(ROWS)


def test_budget_without_a_price_is_refused_by_validate_too(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, model={"name": "mystery-model"}, budget={"max_cost": 1})
    line = refused(run_cli, job, "budget.max_cost", "needs a price", "mystery-model", sim=sim)
    assert f"{job} line " in line
    assert not checkpoint_of(job).exists()


def test_fingerprint_mismatch_is_reported_by_validate_as_run_would(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS)
    assert run_cli("run", job)[0] == 0
    stored = (checkpoint_of(job) / "fingerprint.json").read_text(encoding="utf-8")
    sent = sim.stats()["requests"]
    make_job(sim, rows=ROWS, prompt={"template": "Summarise: {text}"})
    refused(run_cli, job, "template: 'Classify: {text}' -> 'Summarise: {text}'", "--force")
    assert sim.stats()["requests"] == sent
    assert (checkpoint_of(job) / "fingerprint.json").read_text(encoding="utf-8") == stored
    code, _, err = run_cli("run", job, "--force")
    assert code == 0, err


# -- issue 15 item 5: one max_tokens, the one sent, for the budget, estimate and the token limiter ---------

def test_max_tokens_in_extra_body_is_the_one_the_budget_and_estimate_use(sim, make_job, run_cli):
    # 10 in params, 500 in extra_body: 500 is what is sent, so 500 bounds what a request can cost.
    # At 1000 CNY per million answer tokens a request may cost 0.5 CNY: a 0.1 CNY budget allows none.
    job = make_job(sim, rows=ROWS, model={"params": {"max_tokens": 10, "extra_body": {"max_tokens": 500}}},
                   pricing={"input": 0, "output": 1000}, budget={"max_cost": 0.1})
    code, out, err = run_cli("estimate", job, "--json")
    assert code == 0, err
    found = json.loads(out)
    assert found["max_tokens"] == 500
    assert found["completion_tokens_max"] == 500 * len(ROWS)
    assert found["cost_max"] == pytest.approx(0.5 * len(ROWS))
    assert run_cli("validate", job)[0] == 0
    code, out, err = run_cli("run", job)
    assert code == 5, (out, err)
    assert "budget reached" in err
    assert sim.stats()["requests"] == 0


def test_budget_with_max_tokens_only_in_extra_body_runs(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS, model={"params": {"max_tokens": None, "extra_body": {"max_tokens": 16}}},
                   pricing={"input": 1, "output": 1}, budget={"max_cost": 1})
    text = job.read_text(encoding="utf-8").replace("    max_tokens: null\n", "")
    assert "max_tokens: null" not in text
    job.write_text(text, encoding="utf-8")
    code, out, err = run_cli("validate", job)
    assert code == 0, err
    code, out, err = run_cli("run", job)
    assert code == 0, err
    assert sim.stats()["requests"] == len(ROWS)
    assert (output_of(job)["completion_tokens"] <= 16).all()  # the simulator cuts answers at the max_tokens sent


# -- item 9: strict job files, each error naming the key and its line ---------------------------------------

JOB = """\
name: strict-job
input:
  path: reviews.csv
  id_column: review_id
prompt:
  template: "Classify: {{text}}"
model:
  provider: local
  name: glm-4-flash
  base_url: {url}
  params:
    max_tokens: 64
limits:
  concurrency: 4
  timeout_s: 10
retry:
  max_attempts: 3
  initial_backoff_s: 0.01
  max_backoff_s: 0.05
output:
  path: out/result.parquet
"""


OUTPUT = "  path: out/result.parquet"


def write_job(tmp_path: Path, sim, old: str = "", new: str = "") -> Path:
    shutil.copy(Path(__file__).resolve().parents[2] / "data" / "reviews.csv", tmp_path / "reviews.csv")
    text = JOB.format(url=sim.url)
    if old:
        assert old in text
        text = text.replace(old, new, 1)
    job = tmp_path / "job.yaml"
    job.write_text(text, encoding="utf-8")
    return job


def line_of(job: Path, needle: str) -> int:
    return next(n for n, line in enumerate(job.read_text(encoding="utf-8").splitlines(), 1) if needle in line)


def test_the_strict_job_is_valid_and_runs(sim, run_cli, tmp_path):
    # Whole numbers are fine floats (timeout_s: 10).
    job = write_job(tmp_path, sim)
    assert run_cli("validate", job)[0] == 0
    code, _, err = run_cli("run", job)
    assert code == 0, err


@pytest.mark.parametrize("old, new, key, needle", [
    ("  concurrency: 4", "  concurrency: true", "limits.concurrency", "valid integer"),
    ("  max_attempts: 3", '  max_attempts: "3"', "retry.max_attempts", "valid integer"),
    ("  timeout_s: 10", '  timeout_s: "10"', "limits.timeout_s", "valid number"),
    ("name: strict-job", 'name: ""', "name", "must not be empty"),
    ("  name: glm-4-flash", "  name: '  '", "model.name", "must not be empty"),
    ("  initial_backoff_s: 0.01", "  initial_backoff_s: 5", "retry.initial_backoff_s", "above retry.max_backoff_s"),
    ("    max_tokens: 64", "    max_tokens: -16", "model.params.max_tokens", "greater than 0"),
    ("    max_tokens: 64", "    max_tokens: 0", "model.params.max_tokens", "greater than 0"),
    ("    max_tokens: 64", "    max_tokens: 2.5", "model.params.max_tokens", "valid integer"),
    ("    max_tokens: 64", '    max_tokens: "64"', "model.params.max_tokens", "valid integer"),
    ("    max_tokens: 64", "    max_tokens: 64\n    extra_body:\n      max_tokens: -16",
     "model.params.extra_body.max_tokens", "greater than 0"),
    ("    max_tokens: 64", "    max_tokens: 64\n    extra_body:\n      max_tokens: 1.5",
     "model.params.extra_body.max_tokens", "valid integer"),
    ("    max_tokens: 64", "    max_tokens: 64\n    extra_body: [1]", "model.params.extra_body", "dictionary"),
    # The output's settings: one line naming the key, never a dump of each member of a union.
    *((OUTPUT, f"{OUTPUT}\n  json_schema: {value}", "output.json_schema",
       "must be a JSON Schema written as a mapping (type: object, properties: ...) or the path of a .json file, "
       f"not a {kind}") for value, kind in (("true", "boolean"), ("[a, b]", "list"), ("3", "number"),
                                            ("2.5", "number"))),
    *((OUTPUT, f"{OUTPUT}\n  json_schema: {value}", "output.json_schema", "is a schema written as text in a string")
      for value in ("'{\"type\": \"object\"}'", '"type: object"', "|\n    type: object\n    required: [a]")),
    (OUTPUT, f"{OUTPUT}\n  parse_json: 'yes'", "output.parse_json", "valid boolean"),
    (OUTPUT, f"{OUTPUT}\n  parse_json: true\n  json_columns: a", "output.json_columns", "valid list"),
    (OUTPUT, f"{OUTPUT}\n  json_schema: {{type: object}}\n  schema_via: 3", "output.schema_via",
     "'prompt' or 'response_format'"),
    (OUTPUT, f"{OUTPUT}\n  json_schema: {{type: object}}\n  json_attempts: '3'", "output.json_attempts",
     "valid integer"),
    (OUTPUT, "  path: 3", "output.path", "must be a file path, written as text"),
    # A name YAML reads as a boolean or a number: the line says to quote it.
    ("  name: glm-4-flash", "  name: 2024", "model.name", "valid string (got 2024); quote it: YAML reads"),
    ("name: strict-job", "name: yes", "name", "valid string (got True); quote it"),
])
def test_a_wrong_value_names_its_key_and_line(sim, run_cli, tmp_path, old, new, key, needle):
    job = write_job(tmp_path, sim, old, new)
    line = line_of(job, [text for text in new.splitlines() if text.strip().startswith(key.split(".")[-1])][-1])
    refused(run_cli, job, f"{job} line {line}: {key}: ", needle, sim=sim)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("old, new, key, first", [
    ("  concurrency: 4", "  concurrency: 4\n  concurrency: 8", "limits.concurrency", "  concurrency: 4"),
    ("name: strict-job", "name: strict-job\nname: other", "name", "name: strict-job"),
    ("    max_tokens: 64", "    max_tokens: 64\n    max_tokens: 500", "model.params.max_tokens", "max_tokens: 64"),
    # Keys are the text written: `"on":` is `on:` again, whatever YAML 1.1 makes of the plain one.
    ("    max_tokens: 64", '    max_tokens: 64\n    on: 1\n    "on": 2', "model.params.on", "on: 1"),
])
def test_a_duplicate_key_is_refused_with_both_lines(sim, run_cli, tmp_path, old, new, key, first):
    job = write_job(tmp_path, sim, old, new)
    again = line_of(job, new.splitlines()[-1])
    refused(run_cli, job, f"{job} line {again}: {key}: duplicate key",
            f"first written at line {line_of(job, first)}", sim=sim)
    assert not (tmp_path / "out").exists()


def test_unknown_key_keeps_its_hint_and_gains_its_line(sim, run_cli, tmp_path):
    job = write_job(tmp_path, sim, "  concurrency: 4", "  concurency: 4")
    refused(run_cli, job, f"{job} line {line_of(job, 'concurency')}: unknown key 'limits.concurency'",
            "did you mean 'concurrency'", sim=sim)


def test_missing_key_points_at_its_parent(sim, run_cli, tmp_path):
    job = write_job(tmp_path, sim, "  name: glm-4-flash\n", "")
    refused(run_cli, job, f"{job} line {line_of(job, 'model:')}: missing key 'model.name'", sim=sim)


def test_unknown_key_in_an_optional_section_gets_a_hint(sim, run_cli, tmp_path):
    job = write_job(tmp_path, sim, "output:\n", "budget:\n  max_cots: 1\noutput:\n")
    refused(run_cli, job, f"{job} line {line_of(job, 'max_cots')}: unknown key 'budget.max_cots'",
            "did you mean 'max_cost'", sim=sim)


@pytest.mark.parametrize("name", ["result.csv", "result"])
def test_output_not_named_parquet_is_refused(sim, make_job, run_cli, tmp_path, name):
    job = make_job(sim, rows=ROWS, output={"path": f"out/{name}"})
    refused(run_cli, job, "output.path", "name it .parquet", "`batch export` it", sim=sim)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("rows", "keep", "id_column"), [
    ([{"review_id": "r1", "text": "good", "status": "vip"}], ["status"], "review_id"),
    ([{"row_id": "mine", "text": "good"}], ["row_id"], None),
])
def test_a_kept_column_named_like_a_result_column_is_refused(sim, make_job, run_cli, rows, keep, id_column):
    job = make_job(sim, rows=rows, input={"id_column": id_column}, output={"keep_columns": keep})
    refused(run_cli, job, "output.keep_columns", f"'{keep[0]}'", sim=sim)


# -- the answer cache and the folders a run writes in: checked before anything is written --------------------

def another_tools_database(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE answers (question TEXT, answer TEXT)")
    db.close()


@pytest.mark.parametrize("cache", ["text", "another_tool"])
def test_a_cache_path_that_is_not_an_answer_cache_is_refused_by_validate_as_by_run(sim, make_job, run_cli,
                                                                                  tmp_path, cache):
    path = tmp_path / "shared.sqlite"
    if cache == "text":
        path.write_text("question,answer\n" * 200)
    else:
        another_tools_database(path)
    job = make_job(sim, rows=ROWS, cache={"path": path.name})
    needle = "file is not a database" if cache == "text" else "not an answer cache of batch"
    refused(run_cli, job, str(path), needle, sim=sim)
    assert not checkpoint_of(job).exists()


def test_a_damaged_answer_cache_of_the_checkpoint_is_refused_before_the_run_writes(sim, make_job, run_cli):
    job = make_job(sim, rows=ROWS)
    assert run_cli("run", job, "--limit", "1")[0] == 0
    folder = checkpoint_of(job)
    (folder / "answers.sqlite").write_bytes(b"not a database" * 100)
    before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    sim.reset()
    line = refused(run_cli, job, "answers.sqlite", "delete it", sim=sim)
    assert "cannot open the answer cache" in line
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == before  # not even its log

    # The Batch API does not use the answer cache: a batch_api run is not refused for it.
    code, out, err = run_cli("validate", make_job(sim, rows=ROWS, mode="batch_api"))
    assert code == 0, err


@pytest.mark.parametrize("frozen", ["output_folder", "checkpoint_folder", "checkpoint_log"])
def test_a_folder_or_file_the_run_would_write_that_cannot_be_written_is_refused_before_any_request(
        sim, make_job, run_cli, tmp_path, frozen):
    if not can_make_immutable(tmp_path):
        pytest.skip("needs root and chattr on a file system that supports it")
    job = make_job(sim, rows=ROWS)
    assert run_cli("run", job, "--limit", "1")[0] == 0
    target = {"output_folder": checkpoint_of(job).parent, "checkpoint_folder": checkpoint_of(job),
              "checkpoint_log": checkpoint_of(job) / "batch.log"}[frozen]
    sim.reset()
    subprocess.run(["chattr", "+i", str(target)], check=True)
    try:
        refused(run_cli, job, f"output.path: {target} cannot be written", sim=sim)
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)
    assert run_cli("run", job)[0] == 0
    assert sim.stats()["requests"] == len(ROWS) - 1
