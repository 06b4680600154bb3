"""Settings are resolved once (docs/architecture.md): only the preflight reads the job file's keys; every stage after it
reads the typed values of the `Plan` (batch/plan.py). Read off the code with `ast`, like tests/test_layers.py."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "batch"

# The modules that may name the raw job file's type: it is made, resolved or fingerprinted there.
JOB_FILE_TYPE = {
    "config.py": "defines it",
    "plan.py": "Settings.spec: the job file as validated, kept for the caller who made the plan",
    "preflight.py": "resolves it into the Plan: the one reader of its keys",
    "replies/schema.py": "json_output_for, called by the preflight alone: errors name the schema's line",
    "checkpoint/guard.py": "fingerprint, taken by the preflight: what shapes the requests, from the whole job file",
    "commands/export.py": "export_output takes the job as loaded and resolves it first",
    "api.py": "builds the job file from Python values",
    "__init__.py": "the public name",
}


def spec_reads(tree: ast.AST) -> list[int]:
    """The line of each `<x>.spec` read in the code: a key of it (`<x>.spec.<key>`), or the whole of it."""
    return sorted(node.lineno for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and node.attr == "spec" and isinstance(node.ctx, ast.Load))


def names_job_spec(tree: ast.AST) -> bool:
    return any(isinstance(node, ast.Name) and node.id == "JobSpec" or
               isinstance(node, ast.alias) and node.name == "JobSpec" for node in ast.walk(tree))


def modules() -> dict[str, ast.AST]:
    return {path.relative_to(PACKAGE).as_posix(): ast.parse(path.read_text(encoding="utf-8"))
            for path in PACKAGE.rglob("*.py") if "simulator" not in path.parts}


def test_no_stage_reads_the_job_file_of_a_plan():
    """Not a key of it (`plan.spec.limits`), nor the whole of it handed on (`f(plan.spec)`): the Plan holds both the
    values and the fingerprint."""
    reads = [f"batch/{name} line {line}" for name, tree in modules().items() for line in spec_reads(tree)]
    assert not reads, f"read the Plan's typed values instead of its job file: {', '.join(sorted(reads))}"


def test_only_the_preflight_and_the_fingerprint_name_the_job_file_type():
    naming = sorted(name for name, tree in modules().items() if names_job_spec(tree) and name not in JOB_FILE_TYPE)
    assert not naming, f"these take the raw JobSpec; take the Plan's values (batch/plan.py) instead: {naming}"


def test_the_checks_see_what_they_look_for():
    """The checks above find what they look for: a key read, the whole job file handed on, the type named."""
    tree = ast.parse("from batch.config import JobSpec\n"
                     "def f(plan):\n"
                     "    return plan.spec.limits, \\\n"
                     "        g(plan.spec)\n")
    assert spec_reads(tree) == [3, 4] and names_job_spec(tree)
    assert not names_job_spec(ast.parse("from batch.plan import Plan\ndef f(spec: Plan):\n    spec.spec = 1\n"))
