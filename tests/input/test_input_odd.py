"""Odd input files: CSV quotes that never close, ragged rows, long cells; JSONL messages of mixed forms."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from helpers import output_of

from batch.errors import ConfigError
from batch.input.reader import CSV_BLOCK_BYTES, InputTable

ROWS = [{"review_id": "r1", "text": "good"}]


def csv_rows(count: int) -> list[str]:
    return ["review_id,text"] + [f"r{i},review {i}" for i in range(1, count + 1)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def refused(run_cli, command: str, job: Path, *needles: str) -> str:
    """`command` exits 2 with one `batch: error:` line holding every needle; returns that line."""
    code, out, err = run_cli(command, job)
    assert "Traceback" not in err + out
    assert code == 2, (code, out, err)
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err.strip()


def refused_everywhere(run_cli, sim, job: Path, *needles: str) -> str:
    refused(run_cli, "validate", job, *needles)
    line = refused(run_cli, "run", job, *needles)
    assert sim.stats()["requests"] == 0
    assert not (job.parent / "out" / "result.parquet").exists()
    return line


# -- item 1: a CSV the reader cannot make sense of -----------------------------------------------------

def test_stray_quote_running_to_the_end_names_its_line(sim, make_job, run_cli, tmp_path):
    """Row 10 opens a quote that never closes: Arrow read the 990 rows after it as one value."""
    job = make_job(sim, rows=ROWS)
    lines = csv_rows(1000)
    lines[10] = 'r10,"oops'
    data = write_lines(tmp_path / "reviews.csv", lines)
    line = refused_everywhere(run_cli, sim, job, str(data), "line 11:", "never closed")
    assert "line 11: a quoted value opened here is never closed" in line


def test_stray_quote_on_the_last_line_without_a_newline(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS)
    data = tmp_path / "reviews.csv"
    data.write_text('review_id,text\nr1,good\nr2,"oops', encoding="utf-8")
    refused_everywhere(run_cli, sim, job, str(data), "line 3:", "never closed")


def test_stray_quote_closed_by_a_later_quote_names_where_it_opens(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS)
    lines = csv_rows(1000)
    lines[10] = 'r10,"oops'
    lines[500] = 'r500,"fine, quoted"'  # its first quote closes the stray one; the rest is a third field
    data = write_lines(tmp_path / "reviews.csv", lines)
    refused_everywhere(run_cli, sim, job, str(data), "line 11:", "runs to line 501", "3 fields where the header has 2")


def test_stray_quote_in_the_header(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS)
    data = write_lines(tmp_path / "reviews.csv", ['review_id,"text', "r1,good", "r2,bad"])
    refused_everywhere(run_cli, sim, job, str(data), "line 1:", "column name")


@pytest.mark.parametrize("bad, fields", [("r7,too,many", "3 fields"), ("r7", "1 field where")])
@pytest.mark.parametrize("at", [6, 5000])  # in the first block (read for the header) and far past it
def test_ragged_row_names_its_line(sim, make_job, run_cli, tmp_path, bad, fields, at):
    job = make_job(sim, rows=ROWS)
    lines = csv_rows(6000)
    lines[at] = bad
    data = write_lines(tmp_path / "reviews.csv", lines)
    refused_everywhere(run_cli, sim, job, str(data), f"line {at + 1}:", fields, "the header has 2")


def test_quoted_values_keep_working(sim, make_job, run_cli, tmp_path):
    """Commas, doubled quotes and line breaks inside quotes, CRLF line ends, a blank line, no final newline;
    one value's line breaks sit across a 256 KB block boundary (the old reader lost sync there)."""
    job = make_job(sim, rows=ROWS)
    filler = [f"r{i},{'x' * 100} {i}" for i in range(1, 2321)]
    at_boundary = len("review_id,text\r\n") + sum(len(f) + 2 for f in filler)
    assert at_boundary < CSV_BLOCK_BYTES < at_boundary + 5000  # the long value starts 2 KB before
    long_lines = "\r\n".join(f"line {i} of a long value" for i in range(200))
    odd = {"r9001": long_lines, "r9002": "a, b and c", "r9003": 'she said "hi", twice', "r9004": "two\nlines"}
    text = ("review_id,text\r\n" + "\r\n".join(filler) + "\r\n"
            f'r9001,"{long_lines}"\r\n'
            'r9002,"a, b and c"\r\n'
            '\r\n'
            'r9003,"she said ""hi"", twice"\r\n'
            'r9004,"two\nlines"')
    (tmp_path / "reviews.csv").write_text(text, encoding="utf-8", newline="")
    code, out, err = run_cli("run", job)
    assert code == 0, err
    result = output_of(job).set_index("review_id")
    assert len(result) == len(filler) + 4 and set(result["status"]) == {"ok"}
    assert {i: result.loc[i, "text"] for i in odd} == odd
    assert sim.stats()["by_prompt"]["Classify: two\nlines"] == 1
    assert sim.stats()["requests"] == len(filler) + 4


# -- item 17: a CSV cell longer than the reader's block ----------------------------------------------------

def test_csv_cell_of_several_megabytes_is_read(sim, make_job, run_cli, tmp_path):
    job = make_job(sim, rows=ROWS, output={"keep_columns": ["text", "notes"]})
    long_value = "长" * (1 << 20) + "\n" + "y" * (2 << 20)  # 5 MB in UTF-8, with a line break
    lines = ["review_id,text,notes"] + [f"r{i},review {i},n{i}" for i in range(1, 3001)]
    lines[1500] = f'r1500,review 1500,"{long_value}"'
    lines[2500] = f'r2500,review 2500,"{long_value[:600_000]}"'
    write_lines(tmp_path / "reviews.csv", lines)
    code, _, err = run_cli("run", job)
    assert code == 0, err
    result = output_of(job)
    assert list(result["review_id"]) == [f"r{i}" for i in range(1, 3001)]  # none lost, none twice
    assert result["notes"][1499] == long_value and result["notes"][2499] == long_value[:600_000]
    assert result["notes"][1500] == "n1501"
    assert sim.stats()["requests"] == 3000


def test_csv_row_over_the_limit_is_refused_naming_its_row(tmp_path):
    lines = csv_rows(3000)
    lines[1500] = 'r1500,"' + "z\n" * (1 << 20) + '"'
    data = write_lines(tmp_path / "reviews.csv", lines)
    table = InputTable(data, "review_id", ["text"], [], csv_max_row_bytes=1 << 20)  # the refusal, without 64 MB
    with pytest.raises(ConfigError) as refusal:
        table.scan()
    assert str(refusal.value) == (f"{data} row 1500 (line 1501): a row of 2 MB, longer than the 1 MB a CSV row "
                                  "may hold (Parquet and JSONL have no such limit)")


def test_stray_quote_in_a_file_of_several_blocks_is_found_before_blocks_grow(sim, make_job, run_cli, tmp_path):
    """The open value runs past two blocks: it is a stray quote, not a long value (nor, under the limit, too long)."""
    job = make_job(sim, rows=ROWS)
    lines = csv_rows(200_000)  # ~3.4 MB
    lines[10] = 'r10,"oops'
    data = write_lines(tmp_path / "reviews.csv", lines)
    refused_everywhere(run_cli, sim, job, str(data), "line 11:", "never closed")
    with pytest.raises(ConfigError, match="line 11: .*never closed"):
        InputTable(data, "review_id", ["text"], [], csv_max_row_bytes=1 << 20).scan()


# -- item 18: JSONL messages, row by row ----------------------------------------------------------------

def messages_job(make_job, sim, tmp_path: Path, values: list, **extra):
    lines = [json.dumps({"review_id": f"m{i}", "messages": value, **extra.get(f"m{i}", {})}, ensure_ascii=False)
             for i, value in enumerate(values, start=1)]
    job = make_job(sim, rows=ROWS, input_file="chats.jsonl", input={"path": "chats.jsonl"},
                   prompt={"template": None, "messages_column": "messages"}, output={"keep_columns": []})
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return job


def test_jsonl_messages_mixing_lists_and_text_are_judged_row_by_row(sim, make_job, run_cli, tmp_path):
    user = {"role": "user", "content": "hello as a list"}
    values = [
        [user],                                                                  # m1: a list
        json.dumps([{"role": "user", "content": "hello as text"}]),              # m2: its JSON text
        "not json at all",                                                       # m3
        [{"role": "bot", "content": "hi"}],                                      # m4: an unknown role
        [{"role": "user"}],                                                      # m5: no content
        [{"role": "user", "content": 42}],                                       # m6: content not text
        7,                                                                       # m7: not a list
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "parts"}]},
         {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                 "function": {"name": "f", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "42"}, {"role": "user", "content": "and now?"}],  # m8
    ]
    job = messages_job(make_job, sim, tmp_path, values)
    code, out, err = run_cli("run", job)
    assert code == 1, err
    result = output_of(job).set_index("review_id")
    assert [result.loc[f"m{i}", "status"] for i in (1, 2, 8)] == ["ok"] * 3
    errors = {i: result.loc[f"m{i}", "error"] for i in range(3, 8)}
    assert set(result.loc[[f"m{i}" for i in range(3, 8)], "error_class"]) == {"bad_prompt"}
    assert "not valid JSON" in errors[3]
    assert 'message 1 has role "bot"' in errors[4] and "system, user, assistant or tool" in errors[4]
    assert "message 1 has no 'content'" in errors[5]
    assert "message 1 has int content" in errors[6]
    assert "non-empty JSON list" in errors[7]
    prompts = sim.stats()["by_prompt"]
    assert sim.stats()["requests"] == 3
    assert prompts.keys() == {"hello as a list", "hello as text", "and now?"}


@pytest.mark.parametrize("first_chunk", [True, False])
def test_jsonl_column_changing_type_names_its_line(sim, make_job, run_cli, tmp_path, first_chunk):
    rows = [{"review_id": f"r{i}", "text": f"review {i}", "stars": i % 5} for i in range(1, 10001)]
    bad = 7 if first_chunk else 9000  # in the first 8,192 lines (types inferred) or after (types fixed)
    rows[bad - 1]["stars"] = "five"
    job = make_job(sim, rows=ROWS, input_file="reviews.jsonl", output={"keep_columns": ["text", "stars"]})
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    refused_everywhere(run_cli, sim, job, str(data), f"line {bad}:", "column 'stars' changes type", '"five"')


def test_jsonl_column_empty_on_its_first_lines_is_not_a_type_change(tmp_path):
    """A column null on every line of the first batch and text later: its type is the text's, in every batch."""
    rows = [{"review_id": f"r{i}", "text": f"review {i}", "note": None if i <= 150 else f"n{i}"} for i in range(1, 201)]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    table = InputTable(path, "review_id", ["text"], ["note"], batch_rows=100)  # two batches of nulls, one of text
    assert table.scan() == 200
    notes = pa.Table.from_batches(table.batches(["note"])).column("note")  # one schema for every batch
    assert notes.type == pa.string() and notes.to_pylist() == [r["note"] for r in rows]


def test_messages_with_an_unknown_role_or_no_content_fail_their_row(sim, make_job, run_cli):
    """Roles and content are checked whatever the input format (here CSV, JSON text): not sent to be refused."""
    rows = [{"review_id": "good", "messages": json.dumps([{"role": "user", "content": "hi"}])},
            {"review_id": "role", "messages": json.dumps([{"role": "narrator", "content": "hi"}])},
            {"review_id": "nameless", "messages": json.dumps([{"content": "hi"}])},
            {"review_id": "empty", "messages": json.dumps([{"role": "user", "content": None}])},
            {"review_id": "text", "messages": json.dumps(["hi"])}]
    job = make_job(sim, rows=rows, prompt={"template": None, "messages_column": "messages"},
                   output={"keep_columns": []})
    code, _, err = run_cli("run", job)
    assert code == 1, err
    result = output_of(job).set_index("review_id")
    assert result.loc["good", "status"] == "ok" and sim.stats()["requests"] == 1
    failed = result.drop(index="good")
    assert set(failed["error_class"]) == {"bad_prompt"} and set(failed["attempts"]) == {0}
    assert 'message 1 has role "narrator"' in failed.loc["role", "error"]
    assert "message 1 has no 'role'" in failed.loc["nameless", "error"]
    assert "message 1 has no 'content'" in failed.loc["empty", "error"]
    assert "message 1 is str" in failed.loc["text", "error"]


@pytest.mark.parametrize("name", ["reviews.csv", "reviews.jsonl", "reviews.parquet"])
def test_an_input_path_that_is_a_folder_says_so(sim, make_job, run_cli, tmp_path, name):
    job = make_job(sim, rows=ROWS)
    job.write_text(job.read_text().replace("reviews.csv", name))
    (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / name).mkdir()
    refused_everywhere(run_cli, sim, job, f"{tmp_path / name}: a folder, not a file")


@pytest.mark.parametrize(("separator", "named"), [("\t", "tabs"), (";", "semicolons")])
def test_a_csv_separated_by_something_else_than_commas_says_so(sim, make_job, run_cli, tmp_path, separator, named):
    job = make_job(sim, rows=ROWS)
    write_lines(tmp_path / "reviews.csv", [f"review_id{separator}text", f"r1{separator}good"])
    refused_everywhere(run_cli, sim, job, "names column 'review_id', which is not in the input",
                       f"its header is one column holding {named}; batch reads CSV separated by commas")
