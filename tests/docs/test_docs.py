"""The documentation cannot drift from the code (issue 25): every generated part of README.md and docs/*.md is what
docs/generate.py writes from the code now, and the site builds with --strict (no broken link or anchor)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import generate
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batch import errors, pricing
from batch.cli import build_parser
from batch.config import JobSpec

ROOT = generate.ROOT
MKDOCS = Path(sys.executable).with_name("mkdocs")


def test_every_generated_part_is_up_to_date(examples, capsys):
    status = generate.cog("--check", "--diff")
    assert status == 0, f"a generated part of the docs is out of date: run `make docs`\n{capsys.readouterr().out}"


def _page(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "docs" / "reference" / "cli.md"
    page.parent.mkdir(parents=True)
    page.write_text(text, encoding="utf-8")
    return page


def test_a_block_edited_by_hand_fails_the_check(tmp_path):
    text = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    _page(tmp_path, text)
    assert generate.cog("--check", root=tmp_path) == 0  # the copy as it is: up to date
    stale = text.replace("send at most N pending rows", "send at most N rows", 1)
    assert stale != text
    (tmp_path / "docs" / "reference" / "cli.md").write_text(stale, encoding="utf-8")
    assert generate.cog("--check", root=tmp_path) != 0


def _copy_of_the_code(tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    for folder in ("batch", "docs", "jobs", "data"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    return copy


def _check_in(copy: Path, page: str) -> subprocess.CompletedProcess[str]:
    """`cog --check` of one page of the copy, with the copy's batch imported (its folder first on the path)."""
    script = ("import sys; sys.path.insert(0, 'docs'); import generate; "
              f"sys.exit(generate.cog('--check', files=[{page!r}]))")
    env = {**os.environ, "PYTHONPATH": str(copy)}
    return subprocess.run([sys.executable, "-c", script], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize(("source", "before", "after", "page"), [
    # a flag's help
    ("batch/cli.py", 'help="send at most N pending rows (try a job cheaply)"', 'help="send at most N rows"',
     "docs/reference/cli.md"),
    # a flag
    ("batch/cli.py", 'command.add_argument("--wait", ', 'command.add_argument("--wait-all", ', "docs/reference/cli.md"),
    # a key's default
    ("batch/config.py", "concurrency: int = Field(8, ge=1, le=4096,", "concurrency: int = Field(9, ge=1, le=4096,",
     "docs/reference/job-file.md"),
    # a key
    ("batch/config.py", "    checkpoint_rows: int = Field(", "    checkpoint_lines: int = Field(",
     "docs/reference/job-file.md"),
    # an exit code's meaning
    ("batch/errors.py", 'EXIT_LOCKED: "Another run of the same job', 'EXIT_LOCKED: "Another run',
     "docs/reference/cli.md"),
])
def test_a_change_in_the_code_without_the_docs_fails_the_check(tmp_path, source, before, after, page):
    copy = _copy_of_the_code(tmp_path)
    assert _check_in(copy, page).returncode == 0, _check_in(copy, page).stdout  # the copy as it is: up to date
    code = (copy / source).read_text(encoding="utf-8")
    assert code.count(before) == 1
    (copy / source).write_text(code.replace(before, after), encoding="utf-8")
    checked = _check_in(copy, page)
    assert checked.returncode != 0
    assert page in checked.stdout + checked.stderr


def test_a_changed_example_output_fails_the_check(tmp_path, examples):
    """A page showing the demo's summary, then the summary's wording changed in the code: the check fails."""
    copy = _copy_of_the_code(tmp_path)
    page = copy / "docs" / "example.md"
    block = "<!-- [[[cog import generate; cog.out(generate.demo_summary()) ]]] -->\n"
    page.write_text(f"# Example\n\n{block}{generate.demo_summary()}<!-- [[[end]]] -->\n", encoding="utf-8")
    summary = copy / "batch" / "summary.py"
    summary.write_text(summary.read_text(encoding="utf-8").replace('f"  this run: ok', 'f"  this run: done'),
                       encoding="utf-8")
    checked = _check_in(copy, "docs/example.md")
    assert checked.returncode != 0
    assert "docs/example.md" in checked.stdout + checked.stderr


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MKDOCS), "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_the_site_builds_strict(tmp_path):
    built = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()
    assert not (tmp_path / "site" / "generate.py").exists()  # the generator is no page


@pytest.mark.parametrize(("link", "said"), [
    ("[a command](reference/cli.md#no-such-command)", "no-such-command"),
    ("[a page](no-such-page.md)", "no-such-page.md"),
])
def test_a_broken_link_or_anchor_fails_the_build(tmp_path, link, said):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text(encoding="utf-8") + f"\nSee {link}.\n", encoding="utf-8")
    built = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0
    assert said in built.stderr


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def test_the_cli_reference_has_every_command_and_option():
    reference = generate.cli_reference()
    for name, command, _help in generate._commands(build_parser()):
        assert f"### `batch {name}`" in reference
        for option in _options(command) - {"-h", "--help"}:
            assert f"`{option}" in reference, option


def test_an_argument_without_help_cannot_be_documented():
    parser = argparse.ArgumentParser(prog="batch x")
    parser.add_argument("--quiet", action="store_true")
    with pytest.raises(ValueError, match="--quiet: an argument without help"):
        generate._arguments_table(parser)


def test_the_exit_codes_are_every_code_the_code_defines():
    table = generate.exit_codes()
    codes = [value for name, value in vars(errors).items() if name.startswith("EXIT_") and isinstance(value, int)]
    for code in codes:
        assert re.search(rf"^\| {code} \| {re.escape(errors.EXIT_MEANINGS[code])} \|", table, re.MULTILINE), code


def _keys(model, prefix=""):
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        section = generate._section_of(field)
        if section is None:
            yield prefix + name, field
        else:
            yield from _keys(section, f"{prefix}{name}.")


def test_the_job_file_reference_has_every_key_with_its_default_and_description():
    reference = generate.job_file_reference()
    for key, field in _keys(JobSpec):
        row = next((line for line in reference.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        assert field.description and generate._cell(field.description) in row, key
        if not field.is_required() and field.default not in (None, False) and field.default_factory is None:
            assert f"`{field.default}`" in row, key
    assert "| `limits.concurrency` | whole number | `8` | 1 to 4096 |" in reference


def test_the_price_table_has_every_model_and_tier():
    table = generate.priced_models()
    for model, pricer in pricing.PRICES.items():
        rows = [line for line in table.splitlines() if line.startswith(f"| `{model}` |")]
        short = pricer(0, 0)
        assert f"| {short.input:g} |" in rows[0] and f"| {short.output:g} |" in rows[0], model
    assert len([line for line in table.splitlines() if line.startswith("| `glm-4.5` |")]) == 3  # a tiered price
    assert pricing.PRICES_AS_OF in table


def test_the_examples_show_what_the_commands_print(examples):
    assert "  this run: ok 12, failed 0, skipped (done before) 0" in examples["demo_run"]["stdout"]
    assert "  failures: bad_prompt 1, content_filter 1, prompt_too_long 1, server_error 1" in \
        examples["failures_run"]["stdout"]
    verbose = examples["failures_run"]["stderr"]
    assert "batch DEBUG row f05 failed after 3 attempts: server_error" in verbose
    assert "retrying in … s" in verbose
    assert "  failed: bad_prompt 1, content_filter 1, prompt_too_long 1, server_error 1" in \
        examples["failures_status"]["stdout"]
    everything = "\n".join(text for streams in examples.values() for text in streams.values())
    assert "batch-docs-" not in everything  # the temporary folder
    assert not re.search(r"127\.0\.0\.1:(?!18080\b)\d+", everything)
    assert not re.search(r"\d\d:\d\d:\d\d", everything.replace("10:00:00", ""))


def test_the_scale_out_examples_show_a_shard_a_refused_merge_and_the_merge(examples):
    assert "job demo-shards, shard 0/3 (glm-4-flash): 2 rows" in examples["shards_run_0"]["stdout"]
    assert "  shard 2/3: ok 0, failed 0, pending 4, not finished" in examples["shards_status"]["stdout"]
    assert "cannot merge yet: shard 2/3 (not finished)" in examples["shards_merge_refused"]["stderr"]
    merged = examples["shards_merge"]["stdout"]
    assert "job demo-shards: merged 3 shards into out/demo-shards.parquet" in merged
    assert "  rows: 12: ok 12, failed 0, pending 0" in merged


def test_the_money_and_batch_api_examples_show_what_their_pages_explain(examples):
    stopped = examples["budget_run"]["stdout"]
    assert "  all runs: ok 9, failed 0, pending 3" in stopped
    assert "  stopped: budget reached: spent 0.000205 of max_cost 0.000300 CNY" in stopped
    assert "  budget: max_cost 0.000300 CNY, 0.000095 left" in examples["budget_estimate"]["stdout"]
    submitted = examples["batch_submit"]["stdout"]
    assert "  3 Batch API batches still being worked on: run again later, or use --wait" in submitted
    assert "    batch batch_… (file 3): created, 2 rows, age 0 min" in submitted
    assert "  Batch API: 12 pending rows in 3 live batches" in examples["batch_status"]["stdout"]


def test_the_limits_examples_show_a_refusal_an_outage_and_an_account_in_arrears(examples):
    throttled = examples["throttle_run"]
    assert "batch DEBUG throttled (429) for a request sent as number 3 in flight: concurrency limit 8 -> 2" in \
        throttled["stderr"]
    assert "  time: … s, … requests/s, 13 requests, 1 throttled (429)" in throttled["stdout"]
    outage = examples["outage_run"]
    assert "batch WARNING the endpoint is not answering (5 attempts failed, nothing answered for … s; last: " \
        "server_error: HTTP 500 code 1200" in outage["stderr"]
    assert "  all runs: ok 0, failed 0, pending 12" in outage["stdout"]
    assert "  stopped: the endpoint is unreachable: nothing answered for … s (retry.max_outage_s 1)" in \
        outage["stdout"]
    arrears = examples["arrears_run"]["stdout"]
    assert "  all runs: ok 4, failed 0, pending 8" in arrears
    assert "  stopped: the API refused the job: account: HTTP 429 code 1113: " in arrears
    assert "batch INFO progress 4/12 rows (ok 4, failed 0, skipped 0), 223 tokens, … rows/s" in generate.progress_line()
    assert "another run of this job is alive (pid …); wait for it or stop it" in generate.error_line("run_locked")


def test_a_misbehaving_simulators_command_is_the_one_it_ran_with():
    """The command an example shows (`batch simulate OPTIONS -- batch run ...`) sets the simulator the example ran
    against: its options parse, each to a setting other than the default."""
    from batch.simulator import SimConfig
    from batch.simulator.server import build_parser as simulator_parser
    from batch.simulator.server import settings_of

    defaults = dataclasses.asdict(SimConfig())
    for run, options in generate.EXAMPLE_SIMULATORS.items():
        assert run in generate.EXAMPLE_RUNS, run
        settings = settings_of(simulator_parser().parse_args(list(options)))
        changed = {name for name, value in settings.items() if value != defaults[name]}
        assert len(changed) == len(options) // 2, (run, changed)


# What batch and its simulator print: a log line, an error, a summary's lines. Outside a cog block a page may show
# what the user types or writes (a command, a job file), never these: they are generated (docs/generate.py).
_PRINTED = re.compile(r"\bbatch (DEBUG|INFO|WARNING|ERROR) |^[ \t]*(batch: |(this run|all runs): ok \d|stopped: "
                      r"|job \S.*: \d+ rows|simulator[ :]|estimate for job )", re.MULTILINE)


def _blocks_outside_cog(text: str) -> list[str]:
    outside = re.sub(r"\[\[\[cog.*?\[\[\[end\]\]\]", "", text, flags=re.DOTALL)
    return re.findall(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", outside, flags=re.DOTALL | re.MULTILINE)


def test_no_page_shows_what_batch_prints_by_hand():
    copied = [(page, block) for page in generate.cogged_files() for block in
              _blocks_outside_cog((ROOT / page).read_text(encoding="utf-8")) if _PRINTED.search(block)]
    assert not copied, "a block shows what batch prints outside a cog block: generate it (docs/generate.py)\n" + \
        "\n".join(f"{page}: {block}" for page, block in copied)


@pytest.mark.parametrize("block", [
    "2026-12-07 02:43:26 batch INFO progress 4/12 rows (ok 4, failed 0, skipped 0), 223 tokens, 0.8 rows/s\n",
    "  stopped: the API refused the job: account: HTTP 429 code 1113\n",
    "batch: error: out/demo.checkpoint: another run of this job is alive (pid 26627); wait for it or stop it\n",
    "job demo (glm-4-flash): 12 rows\n  this run: ok 12, failed 0, skipped (done before) 0\n",
])
def test_a_block_of_output_copied_by_hand_is_found(block):
    page = f"# Page\n\n<!-- [[[cog x ]]] -->\n```text\n{block}```\n<!-- [[[end]]] -->\n\n  ```text\n  {block}  ```\n"
    found = _blocks_outside_cog(page)
    assert len(found) == 1 and _PRINTED.search(found[0])


def test_a_command_or_a_job_file_is_no_output():
    page = ("```sh\nbatch run jobs/mine.yaml --limit 5\n```\n\n"
            "```yaml\nname: reviews\noutput:\n  path: out.parquet\n```\n")
    assert not any(_PRINTED.search(block) for block in _blocks_outside_cog(page))


_TIMES = st.builds("{} {:02d}:{:02d}:{:02d}".format, st.sampled_from(["2026-12-07", "2031-01-31"]),
                   st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
_PIECES = st.one_of(_TIMES, st.integers(1, 65535).map("http://127.0.0.1:{}/v1".format),
                    st.floats(0, 1e4, allow_nan=False).map("time: {:.1f} s, 3 requests".format),
                    st.floats(0, 1e4, allow_nan=False).map("{:.2f} requests/s".format),
                    st.floats(0, 60, allow_nan=False).map("retrying in {:.2f} s".format),
                    st.binary(min_size=12, max_size=12).map(lambda id_: f"batch batch_{id_.hex()} (file 1)"),
                    st.integers(1, 4_194_304).map("alive (pid {})".format),
                    st.floats(0, 1e4, allow_nan=False).map("nothing answered for {:.1f} s".format),
                    st.text(max_size=20))


@given(st.lists(_PIECES, max_size=8).map(" ".join), st.integers(1, 65535))
def test_normalising_is_idempotent_and_leaves_nothing_that_varies(text, port):
    once = generate.normalise(text, "/tmp/batch-docs-x", port)
    assert generate.normalise(once, "/tmp/batch-docs-x", port) == once
    assert not re.search(r"127\.0\.0\.1:(?!18080\b)\d+", once)
    assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", once.replace(generate.SOME_TIME, ""))
    assert not re.search(r"batch_[0-9a-f]{24}", once)
    assert not re.search(r"pid \d|nothing answered for \d", once)


def test_the_exit_codes_table_is_the_same_whatever_was_imported_before():
    before = generate.exit_codes()

    class Elsewhere(errors.JobFatalError):
        """An error defined outside batch.errors (batch.api's, a test's)."""

    assert generate.exit_codes() == before


def test_every_simulator_setting_is_an_option_with_its_meaning():
    from batch.simulator import SimConfig
    from batch.simulator.server import build_parser as simulator_parser

    options = generate.simulator_options()
    by_option = {action.option_strings[0]: action for action in simulator_parser()._actions if action.option_strings}
    for field in dataclasses.fields(SimConfig):
        if field.name == "api_key":  # from --api-key-env
            continue
        option = "--" + field.name.replace("_", "-")
        assert by_option[option].help == field.metadata["help"], option
        assert f"`{option}" in options and generate._cell(field.metadata["help"]) in options, option
