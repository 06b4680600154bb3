"""A counted noun agrees with its number in every line batch prints or logs: "1 row", "2 rows" (batch/wording.py's
`counted`). Read off the code with `ast`, like tests/test_layers.py, and seen in what the commands print."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from batch.wording import counted, plural

PACKAGE = Path(__file__).resolve().parents[1] / "batch"

# The nouns batch counts in what it prints. A number written before one of them, in a literal string, reads
# "1 rows" when the number is 1: the count goes through `counted` instead.
COUNTED_NOUNS = ("rows", "answers", "attempts", "batches", "requests", "tokens", "files", "lines", "shards",
                 "records", "parts", "columns", "keys", "failures", "errors", "processes", "retries", "polls",
                 "values", "ids", "prompts", "messages", "results", "entries", "chunks", "characters", "bytes",
                 "times", "choices", "events", "digits", "levels", "seconds", "holders", "items")
NUMBER = "\x00"  # where a formatted value sits in the text read off a string
# Words that may stand between a count and its noun ("3 live batches", "2 Batch API request files").
BETWEEN = ("pending", "live", "Batch", "API", "request", "new", "more", "other", "unanswered", "prompt", "completion")
HARDCODED_PLURAL = re.compile(rf"(?:{NUMBER}|%d) (?:(?:{'|'.join(BETWEEN)}) ){{0,3}}(?:{'|'.join(COUNTED_NOUNS)})\b"
                              r"(?![/=])"  # a rate (rows/s) or a label (tokens=5) is not a count of the noun
                              r"|\((?:s|es)\)")  # nor "record(s)": it is always one or the other


def _formatted(node: ast.FormattedValue) -> str:
    """A formatted value as the check reads it: a count, unless it is a constant (ALL_CAPS, fixed above one) or
    a float (`:.1f`: a rate or a size, not a count of things)."""
    value = node.value
    spec = node.format_spec
    spec_text = "".join(part.value for part in spec.values if isinstance(part, ast.Constant)) if spec else ""
    if isinstance(value, ast.Name) and value.id.isupper() or spec_text.endswith(("f", "g", "%")):
        return "·"
    return NUMBER


def strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Each literal string of a module (f-strings with their values as NUMBER), with its line; docstrings left out."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)}
    found = []
    inside_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(part.value if isinstance(part, ast.Constant) else _formatted(part) for part in node.values)
            found.append((node.lineno, text))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and id(node) not in inside_fstrings):
            found.append((node.lineno, node.value))
    return found


def hardcoded_plurals(tree: ast.AST) -> list[tuple[int, str]]:
    return sorted((line, text) for line, text in strings(tree) if HARDCODED_PLURAL.search(text))


def test_no_count_is_printed_before_a_hardcoded_plural():
    """Every count batch prints (summary, status, estimate, merge, cancel, errors, log lines) goes through
    `counted`; the simulator is the tests' server, not batch's output."""
    found = [f"batch/{path.relative_to(PACKAGE).as_posix()} line {line}: {text!r}"
             for path in sorted(PACKAGE.rglob("*.py")) if "simulator" not in path.parts
             for line, text in hardcoded_plurals(ast.parse(path.read_text(encoding="utf-8")))]
    assert not found, "a count before a fixed plural (use batch.wording.counted):\n" + "\n".join(found)


def test_the_check_sees_what_it_looks_for():
    tree = ast.parse('log.info("%d rows in %s", n, where)\n'
                     'x = f"{n} Batch API batches"\n'
                     'y = f"{len(a)} line(s) are bad"\n'
                     'z = f"{counted(n, \'row\')} left, {rate:.1f} rows/s, {MAX_DEPTH} levels, ok={n} tokens={t}"\n'
                     'w = f"{n} of its rows, {folder} holds shards"\n'
                     'def f():\n    """3 rows: a docstring."""\n')
    assert [line for line, _ in hardcoded_plurals(tree)] == [1, 2, 3]


@given(st.integers(min_value=0, max_value=10**12), st.sampled_from(["row", "batch", "entry", "day", "file", "box"]))
def test_counted_is_singular_for_one_only(number, noun):
    text = counted(number, noun)
    assert text.startswith(f"{number} ")
    assert text.endswith(noun) == (number == 1)
    assert text == f"{number} {noun}" if number == 1 else text == f"{number} {plural(noun)}"


def test_plurals():
    assert [plural(noun) for noun in ("row", "batch", "entry", "day", "process", "box", "Batch API batch")] == [
        "rows", "batches", "entries", "days", "processes", "boxes", "Batch API batches"]
    assert counted(1, "child", "children") == "1 child" and counted(2, "child", "children") == "2 children"


# A count of one before a plural, or a plural verb after "1 <noun>": what the lines of a one-row job must not hold.
ONE_BEFORE_A_PLURAL = re.compile(rf"(?<![\d.])1 (?:(?:{'|'.join(BETWEEN)}) ){{0,3}}(?:{'|'.join(COUNTED_NOUNS)})"
                                 r"\b(?![/=])|(?<![\d.])1 [a-z]+ (?:are|have|sit)\b|\((?:s|es)\)")


def test_a_job_of_one_row_reads_in_the_singular(start_sim, make_job, run_cli):
    """Every command on a job of one row, failed after one attempt (-v says so), then the same row through the
    Batch API: summary, validate, estimate, status, export, cancel and the log lines."""
    sim = start_sim(batch_speed=0)
    job = make_job(sim, rows=[{"review_id": "r1", "text": "one [[error:400:1301]]"}])
    said = [run_cli("validate", job), run_cli("estimate", job), run_cli("run", job, "-v"), run_cli("status", job),
            run_cli("export", job, "--format", "csv", "--to", str(job.parent / "one.csv"))]
    assert "failed after 1 attempt:" in said[2][2]
    batch_job = make_job(sim, rows=[{"review_id": "r1", "text": "one"}], mode="batch_api",
                         output={"path": "batch/result.parquet"}, batch_api={"poll_interval_s": 0.05})
    said += [run_cli("run", batch_job, "-v"), run_cli("status", batch_job), run_cli("cancel", batch_job)]
    assert "1 Batch API batch still being worked on" in said[5][1]
    text = "\n".join(out + err for _, out, err in said)
    assert not ONE_BEFORE_A_PLURAL.findall(text), text
    for code, out, err in said:
        assert "Traceback" not in err and code in (0, 1, 6), out + err
