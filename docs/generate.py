"""The generated parts of README.md and docs/*.md: written from the code, never by hand (issue 25).

A page asks for one in a cog block (https://cog.readthedocs.io/), hidden from the rendered page by HTML comments:

    <!-- [[[cog import generate; cog.out(generate.cli_reference()) ]]] -->
    ... what the function returns, written by cog ...
    <!-- [[[end]]] -->

`python docs/generate.py` (`make docs`) writes every block again; `python docs/generate.py --check` fails when one
is out of date, which the drift test (tests/docs/) runs. This file lives in docs/ (left out of the site by
mkdocs.yml's exclude_docs), not in batch/: the runtime package ships the runtime only.

The example outputs come from running the real commands (`batch run`, `status`, `estimate`, `validate`) on the
repository's demo jobs against the simulator, once per process (some against a simulator set to misbehave:
slow, capped, failing); what changes from one run to the next (times, rates, ports, retry waits, process ids) is
written as a fixed stand-in, so writing the docs twice gives the same text.
"""

from __future__ import annotations

import argparse
import functools
import glob
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import types
import typing
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import annotated_types
import typing_extensions
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
# The files whose cog blocks `make docs` writes and the drift test checks, relative to ROOT.
COGGED = ("README.md", "docs/*.md", "docs/*/*.md")
# argparse wraps a usage line to the terminal's width: a fixed one, so the text is the same everywhere.
HELP_WIDTH = 100
# What the examples show for what changes from one run to the next.
SOME_TIME = "2026-12-07 10:00:00"
SOME_ISO_TIME = "2026-12-07T10:00:00+0000"
VARIES = "…"
# The port the demo's simulator listens on (make demo), shown for whichever port the examples' simulator took.
DEMO_PORT = 18080


# ---------------------------------------------------------------------------------------------- the command line

def cli_reference() -> str:
    """Every command of `batch`: what it does, its usage line and a table of its arguments (batch.cli's parser)."""
    from batch.cli import build_parser
    from batch.simulator.server import build_parser as simulator_parser

    parts = []
    for name, command, help_text in _commands(build_parser()):
        parts.append(f"### `batch {name}`\n\n{_sentence(help_text)}\n")
        if name == "simulate":  # its arguments are the simulator's own command line
            command = simulator_parser()
            parts.append("`batch simulate ARGS` is `python -m batch.simulator ARGS`: "
                         f"{_sentence(command.description or '')}\n")
        parts.append(f"```text\n{_usage(command)}\n```\n")
        parts.append(_arguments_table(command))
        if command.epilog:
            parts.append(f"{_sentence(command.epilog)}\n")
    return "\n".join(parts)


def simulator_options() -> str:
    """The simulator's command line (`python -m batch.simulator`, `batch simulate`): its arguments table."""
    from batch.simulator.server import build_parser as simulator_parser

    command = simulator_parser()
    return f"```text\n{_usage(command)}\n```\n\n{_arguments_table(command)}"


def _commands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help or "" for choice in subparsers._choices_actions}
    for name, command in subparsers.choices.items():
        yield name, command, helps[name]


def _usage(command: argparse.ArgumentParser) -> str:
    command.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=HELP_WIDTH)
    return command.format_usage().strip()


def _arguments_table(command: argparse.ArgumentParser) -> str:
    rows = ["| Argument | Default | Meaning |", "|---|---|---|"]
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        rows.append(f"| {_cell(_argument(action))} | {_cell(_default(action))} | {_cell(_help(action))} |")
    return "\n".join(rows) + "\n"


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    takes_value = action.nargs != 0
    if not takes_value:
        return ", ".join(f"`{option}`" for option in action.option_strings)
    if action.choices:
        value = "{" + ",".join(str(choice) for choice in action.choices) + "}"
    else:
        value = action.metavar or action.dest.upper()
    return ", ".join(f"`{option} {value}`" for option in action.option_strings)


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
        return ""
    if action.default is True:
        return "on"
    return f"`{action.default}`"


def _help(action: argparse.Action) -> str:
    if not action.help:
        raise ValueError(f"{'/'.join(action.option_strings) or action.dest}: an argument without help: give it one, "
                         "the docs are written from it")
    text = action.help % {"default": action.default, "prog": "batch"} if "%(" in action.help else action.help
    return _sentence(text)


# --------------------------------------------------------------------------------------------------- exit codes

def exit_codes() -> str:
    """The exit codes (batch.errors' EXIT_ constants), what each means, and the errors that end with it."""
    from batch import errors

    codes = {value: name for name, value in vars(errors).items() if name.startswith("EXIT_") and isinstance(value, int)}
    rows = ["| Code | Meaning | Raised as |", "|---|---|---|"]
    for code in sorted(codes):
        meaning = errors.EXIT_MEANINGS.get(code)
        if not meaning:
            raise ValueError(f"batch.errors.{codes[code]} has no meaning in EXIT_MEANINGS")
        # The errors batch.errors defines, not every subclass imported so far (batch.api's, a test's): the same table
        # whatever the process imported before.
        raised = [cls for cls in _subclasses(errors.BatchError) if cls.exit_code == code
                  and cls.__module__ == errors.__name__]
        as_what = "<br>".join(f"`{cls.__name__}`: {_first_sentence(cls.__doc__ or '')}" for cls in raised)
        rows.append(f"| {code} | {_cell(meaning)} | {_cell(as_what)} |")
    return "\n".join(rows) + "\n"


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


# -------------------------------------------------------------------------------------------------- the job file

def job_file_reference() -> str:
    """Every key of a job file (batch.config.JobSpec), section by section: its type, default, range and meaning."""
    from batch.config import JobSpec

    top = [(name, field) for name, field in _keys(JobSpec) if _section_of(field) is None]
    sections = [(name, field) for name, field in _keys(JobSpec) if _section_of(field) is not None]
    parts = ["Top-level keys:\n", _keys_table(top, prefix="")]
    for name, field in sections:
        section = _section_of(field)
        assert section is not None
        required = "required" if field.is_required() else "optional"
        parts.append(f"### `{name}`\n\n{field.description} This section is {required}.\n")
        parts.append(_keys_table(list(_keys(section)), prefix=f"{name}."))
    return "\n".join(parts)


def _keys(model: type[BaseModel]) -> Iterator[tuple[str, FieldInfo]]:
    for name, field in model.model_fields.items():
        if field.exclude:  # set by batch (JobSpec.job_path), not by the file
            continue
        if not field.description:
            raise ValueError(f"{model.__name__}.{name} has no description: add Field(..., description=...), the docs "
                             "are written from it")
        yield name, field


def _section_of(field: FieldInfo) -> type[BaseModel] | None:
    for candidate in (field.annotation, *typing.get_args(field.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _keys_table(keys: list[tuple[str, FieldInfo]], prefix: str) -> str:
    rows = ["| Key | Type | Default | Range | Meaning |", "|---|---|---|---|---|"]
    for name, field in keys:
        rows.append(f"| `{prefix}{name}` | {_cell(_type_of(field))} | {_cell(_default_of(field))} | "
                    f"{_cell(_range_of(field.metadata))} | {_cell(field.description or '')} |")
    return "\n".join(rows) + "\n"


def _type_of(field: FieldInfo) -> str:
    if _section_of(field) is not None:
        return "section"
    return _type_name(field.annotation, field.metadata)


def _type_name(annotation: Any, metadata: list[Any]) -> str:
    """A type as a job file's writer reads it: YAML's words, not Python's."""
    from batch import config

    named = {config._place: "path or URL", config._known_provider: "provider name",
             config._http_url: "http(s) URL", config._redis_url: "Redis URL", config._path_text: "path"}
    for item in metadata:
        function = getattr(item, "func", None)
        if function in named:
            return named[function]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *more = typing.get_args(annotation)
        return _type_name(inner, [*more, *metadata])
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(arg, []) for arg in typing.get_args(annotation) if arg is not type(None)]
        return " or ".join(dict.fromkeys(names))
    if origin is typing.Literal:
        return " or ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"list of {_type_name(item, [])}"
    if origin is dict or typing_extensions.is_typeddict(annotation):
        return "mapping"
    simple = {str: "text", int: "whole number", float: "number", bool: "`true` or `false`", Path: "path"}
    if annotation in simple:
        return simple[annotation]
    raise ValueError(f"no words for the type {annotation!r} in docs/generate.py's _type_name: add them")


def _default_of(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        made = field.default_factory()  # type: ignore[call-arg]
        return "" if isinstance(made, BaseModel) else f"`{made!r}`".replace("'", "")
    value = field.default
    if value is None or value is PydanticUndefined:
        return ""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _range_of(metadata: list[Any]) -> str:
    bounds = {type(item): item for item in metadata if isinstance(item, annotated_types.BaseMetadata)}
    low = bounds.get(annotated_types.Ge) or bounds.get(annotated_types.Gt)
    high = bounds.get(annotated_types.Le) or bounds.get(annotated_types.Lt)
    low_text = f"{'≥' if isinstance(low, annotated_types.Ge) else '>'} {_number(_bound(low))}" if low else ""
    high_text = f"{'≤' if isinstance(high, annotated_types.Le) else '<'} {_number(_bound(high))}" if high else ""
    if isinstance(low, annotated_types.Ge) and isinstance(high, annotated_types.Le):
        return f"{_number(low.ge)} to {_number(high.le)}"
    return ", ".join(text for text in (low_text, high_text) if text)


def _bound(item: Any) -> Any:
    return next(getattr(item, name) for name in ("ge", "gt", "le", "lt") if hasattr(item, name))


def _number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and abs(value) >= 10_000 else f"{value:g}"


# ------------------------------------------------------------------------------------------------------- prices

def priced_models() -> str:
    """The built-in price table (batch.pricing.PRICES), one row per model and tier, in CNY per million tokens."""
    from batch import pricing

    def cached(price: pricing.Price) -> str:
        return _price(price.cached_input) if price.cached_input is not None else "as input"

    # (tier, a prompt's and an answer's tokens in it): a pricer is a function, known by what it answers.
    tiers = ((f"prompt ≤ {pricing.SHORT_PROMPT_MAX:,} tokens, answer ≤ {pricing.SHORT_ANSWER_MAX:,}", 0, 0),
             (f"prompt ≤ {pricing.SHORT_PROMPT_MAX:,} tokens, answer > {pricing.SHORT_ANSWER_MAX:,}",
              0, pricing.SHORT_ANSWER_MAX + 1),
             (f"prompt > {pricing.SHORT_PROMPT_MAX:,} tokens", pricing.SHORT_PROMPT_MAX + 1, 0))
    rows = ["| Model | Tokens | Input | Cached input | Output |", "|---|---|---|---|---|"]
    for model, pricer in pricing.PRICES.items():
        prices = [(tier, pricer(prompt, completion)) for tier, prompt, completion in tiers]
        shown = [("all", prices[0][1])] if len({price for _, price in prices}) == 1 else prices
        for tier, price in shown:
            rows.append(f"| `{model}` | {tier} | {_price(price.input)} | {cached(price)} | {_price(price.output)} |")
    factor = pricing.BATCH_PRICE_FACTOR
    return ("\n".join(rows) + "\n\n"
            f"Prices in {pricing.CURRENCY} per million tokens, as of {pricing.PRICES_AS_OF} (`batch/pricing.py`). "
            f"Through the Batch API each costs {factor:g} times as much. A model not in the table costs "
            "\"unknown\", never 0: give its price in the job's `pricing:`.\n")


def _price(value: float) -> str:
    return f"{value:g}"


# ---------------------------------------------------------------------------------------------- example outputs

def demo_validate() -> str:
    """`batch validate jobs/demo.yaml`: the check of the job file, input and key, sending nothing."""
    return _example("demo_validate")


def demo_estimate() -> str:
    """`batch estimate jobs/demo.yaml` before the demo ran."""
    return _example("demo_estimate")


def demo_summary() -> str:
    """`batch run jobs/demo.yaml`: the demo's summary (what `make demo` prints)."""
    return _example("demo_run")


def demo_status() -> str:
    """`batch status jobs/demo.yaml` after the demo ran."""
    return _example("demo_status")


def demo_rerun() -> str:
    """`batch run jobs/demo.yaml` again: every row done before, nothing sent."""
    return _example("demo_rerun")


def failed_run_summary() -> str:
    """`batch run jobs/demo-failures.yaml -v`: the summary of a run whose rows fail, each with another class."""
    return _example("failures_run")


def verbose_lines() -> str:
    """The -v lines (stderr) of that run: each failed attempt and its retry, each failed row."""
    return _example("failures_run", streams=("stderr",))


def failed_status() -> str:
    """`batch status jobs/demo-failures.yaml` after that run: the failed rows by class."""
    return _example("failures_status")


def budget_stop() -> str:
    """`batch run jobs/demo-budget.yaml`: a run its budget stops (exit 5), the rows it could not pay for pending."""
    return _example("budget_run")


def budget_estimate() -> str:
    """`batch estimate jobs/demo-budget.yaml` after that run: what the job spent, what is left of its budget."""
    return _example("budget_estimate")


def batch_api_submit() -> str:
    """`batch run jobs/demo-batch.yaml`: the rows submitted in Batch API files, exit 6 while they are live."""
    return _example("batch_submit")


def batch_api_status() -> str:
    """`batch status jobs/demo-batch.yaml` after that run: each live batch as the run saw it."""
    return _example("batch_status")


def shard_run() -> str:
    """`batch run jobs/demo-shards.yaml --shard 0/3`: one shard's run, its summary naming it."""
    return _example("shards_run_0")


def shards_status() -> str:
    """`batch status jobs/demo-shards.yaml` with two of its three shards finished: each shard's state."""
    return _example("shards_status")


def merge_refused() -> str:
    """`batch merge jobs/demo-shards.yaml` while a shard has not finished: the one line refusing it (exit 2)."""
    return _example("shards_merge_refused", streams=("stderr",))


def merge_summary() -> str:
    """`batch merge jobs/demo-shards.yaml` once every shard has finished: the one output, the shards' sums."""
    return _example("shards_merge")


def progress_line() -> str:
    """A progress line of the demo (what stderr gets in place of a bar when it is not a terminal), run against a
    simulator that answers each request after 1 s: the first line once the first round of answers is in."""
    lines = run_examples()["progress_run"]["progress"].splitlines()
    # The demo sends 4 rows at once (its limits.concurrency), so their answers come together a second in; a line
    # before them, or after the next round, depends on the machine's speed, this one does not.
    line = next((line for line in lines if " progress 4/12 rows " in line), None)
    if line is None:
        raise RuntimeError("the demo's run against a slow simulator printed no progress line with 4 of 12 rows done:\n"
                           + "\n".join(lines))
    return f"```text\n{line}\n```\n"


def throttle_lines() -> str:
    """`batch run jobs/demo-throttle.yaml -v` against a simulator that takes 2 requests in flight: the refusal of the
    third, the limit it leads to, the refused row's retry (stderr)."""
    return _example("throttle_run", streams=("stderr",))


def throttle_run() -> str:
    """That run whole: its -v lines (stderr), then its summary with the requests refused (stdout)."""
    return _example("throttle_run", streams=("stderr", "stdout"))


def outage_stop() -> str:
    """`batch run jobs/demo-stops.yaml` against a simulator that fails every request with a 500: the outage's
    warning, the stop once retry.max_outage_s passed (stderr), and the summary, every row pending (stdout)."""
    return _example("outage_run", streams=("stderr", "stdout"))


def arrears_stop() -> str:
    """`batch run jobs/demo-stops.yaml` against a simulator that says the account is in arrears after 4 answers:
    the summary of a run the API stopped (stdout)."""
    return _example("arrears_run")


def indented(text: str, prefix: str = "  ") -> str:
    """`text` with each line but the empty ones after `prefix`: a generated block inside a list item."""
    return textwrap.indent(text, prefix)


# Each example command, run once, in this order, on a copy of EXAMPLE_FILES: its arguments and its exit code.
EXAMPLE_RUNS: dict[str, tuple[tuple[str, ...], int]] = {
    "demo_validate": (("validate", "jobs/demo.yaml"), 0),
    "demo_estimate": (("estimate", "jobs/demo.yaml"), 0),
    "demo_run": (("run", "jobs/demo.yaml"), 0),
    "demo_status": (("status", "jobs/demo.yaml"), 0),
    "demo_rerun": (("run", "jobs/demo.yaml"), 0),
    "failures_run": (("run", "jobs/demo-failures.yaml", "-v"), 1),
    "failures_status": (("status", "jobs/demo-failures.yaml"), 0),
    "budget_run": (("run", "jobs/demo-budget.yaml"), 5),
    "budget_estimate": (("estimate", "jobs/demo-budget.yaml"), 0),
    "batch_submit": (("run", "jobs/demo-batch.yaml"), 6),
    "batch_status": (("status", "jobs/demo-batch.yaml"), 0),
    "shards_run_0": (("run", "jobs/demo-shards.yaml", "--shard", "0/3"), 0),
    "shards_run_1": (("run", "jobs/demo-shards.yaml", "--shard", "1/3"), 0),
    "shards_status": (("status", "jobs/demo-shards.yaml"), 0),
    "shards_merge_refused": (("merge", "jobs/demo-shards.yaml"), 2),
    "shards_run_2": (("run", "jobs/demo-shards.yaml", "--shard", "2/3"), 0),
    "shards_merge": (("merge", "jobs/demo-shards.yaml"), 0),
    "progress_run": (("run", "jobs/demo.yaml", "--progress-interval", "0"), 0),
    "throttle_run": (("run", "jobs/demo-throttle.yaml", "-v"), 0),
    "outage_run": (("run", "jobs/demo-stops.yaml"), 3),
    "arrears_run": (("run", "jobs/demo-stops.yaml"), 3),
}
# The runs against a simulator set to misbehave, by run: the options of `batch simulate` that set it (shown in the
# command, and read by the simulator's own parser). The other runs have a simulator with the defaults.
EXAMPLE_SIMULATORS: dict[str, tuple[str, ...]] = {
    "progress_run": ("--latency-ms", "1000"),
    "throttle_run": ("--max-concurrency", "2", "--latency-ms", "1000"),
    "outage_run": ("--fail-after", "0", "--fail-status", "500", "--fail-code", "1200"),
    "arrears_run": ("--fail-after", "4"),  # then 429 with code 1113, the simulator's default failure
}
# The files the examples run on, copied to a folder of their own (relative paths as in the repository).
EXAMPLE_FILES = ("jobs/demo.yaml", "data/reviews.csv", "jobs/demo-failures.yaml", "data/failures.csv",
                 "jobs/demo-budget.yaml", "jobs/demo-batch.yaml", "jobs/demo-shards.yaml", "jobs/demo-throttle.yaml",
                 "jobs/demo-stops.yaml")


def _example(run: str, streams: tuple[str, ...] = ("stdout",)) -> str:
    """A run's command, as a user types it (under `batch simulate` with its options when its simulator misbehaves),
    and what it printed on these streams, in this order."""
    arguments, _code = EXAMPLE_RUNS[run]
    command = f"batch {' '.join(arguments)}"
    if run in EXAMPLE_SIMULATORS:
        command = f"batch simulate {' '.join(EXAMPLE_SIMULATORS[run])} -- {command}"
    printed = "\n".join(text for stream in streams if (text := run_examples()[run][stream]))
    return f"```text\n$ {command}\n{printed}\n```\n"


@functools.cache
def run_examples() -> dict[str, dict[str, str]]:
    """What each example command printed (stdout, stderr, and its progress lines apart), made the same from run to
    run (normalise): each run once, on a copy of the example files, against a simulator. The runs of one job file
    against one simulator's settings run in EXAMPLE_RUNS' order, in a folder and against a simulator of their own
    (in this process: a thread each), side by side with the others."""
    from batch.simulator import SimConfig, SimulatorThread
    from batch.simulator.server import build_parser as simulator_parser
    from batch.simulator.server import settings_of

    def run_in_turn(runs: list[str]) -> dict[str, dict[str, str]]:
        options = simulator_parser().parse_args(list(EXAMPLE_SIMULATORS.get(runs[0], ())))
        with tempfile.TemporaryDirectory(prefix="batch-docs-") as folder, \
                SimulatorThread(SimConfig(**settings_of(options))) as simulator:
            for file in EXAMPLE_FILES:
                (Path(folder) / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ROOT / file, Path(folder) / file)
            env = {**os.environ, "BATCH_SIMULATOR_PORT": str(simulator.port), "NO_PROXY": "127.0.0.1",
                   "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            outputs = {}
            for run in runs:
                arguments, code = EXAMPLE_RUNS[run]
                done = subprocess.run([sys.executable, "-m", "batch", *arguments], cwd=folder, env=env,
                                      capture_output=True, text=True, timeout=300)
                if done.returncode != code:
                    raise RuntimeError(f"batch {' '.join(arguments)} exited {done.returncode}, not {code}:\n"
                                       f"{done.stdout}{done.stderr}")
                # A progress line comes every --progress-interval seconds (5): a slow machine shows one, a fast one
                # none. They are kept apart, for the one example that shows one.
                progress = "".join(_PROGRESS_LINE.findall(done.stderr))
                outputs[run] = {"stdout": normalise(done.stdout, folder, simulator.port),
                                "stderr": normalise(_PROGRESS_LINE.sub("", done.stderr), folder, simulator.port),
                                "progress": normalise(progress, folder, simulator.port)}
            return outputs

    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for run, (arguments, _code) in EXAMPLE_RUNS.items():
        groups.setdefault((arguments[1], EXAMPLE_SIMULATORS.get(run, ())), []).append(run)
    with ThreadPoolExecutor(len(groups)) as pool:
        done_by_group = list(pool.map(run_in_turn, groups.values()))
    return {run: output for outputs in done_by_group for run, output in outputs.items()}


_PROGRESS_LINE = re.compile(r"^.* batch INFO progress .*\n?", re.MULTILINE)
_LOG_TIME = re.compile(r"\b\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\b")
_ISO_TIME = re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}\b")
_LOCAL_PORT = re.compile(r"\b127\.0\.0\.1:\d+\b")
# The simulator's Batch API ids (random, as a provider's are).
_BATCH_ID = re.compile(r"\bbatch_[0-9a-f]{24}\b")
# Figures measured by the clock: a run's time and rates, a retry's jittered wait.
_MEASURED = (
    re.compile(r"(?<=time: )\d+(\.\d+)? s"),
    re.compile(r"\d+(\.\d+)?(?= (requests|rows)/s)"),
    re.compile(r"(?<=retrying in )\d+(\.\d+)?(?= s)"),
    re.compile(r"(?<=nothing answered for )\d+(\.\d+)?(?= s)"),  # an outage's length so far
)
# A process id: of the run that holds a job's lock, say.
_PID = re.compile(r"(?<=\bpid )\d+")


def normalise(text: str, folder: str, port: int) -> str:
    """`text` with what differs from run to run replaced by fixed stand-ins: times, measured figures, the
    simulator's port and Batch API ids, process ids, the temporary folder."""
    text = text.replace(str(Path(folder).resolve()) + os.sep, "").replace(folder + os.sep, "")
    text = _LOG_TIME.sub(SOME_TIME, text)
    text = _ISO_TIME.sub(SOME_ISO_TIME, text)
    text = _LOCAL_PORT.sub(f"127.0.0.1:{DEMO_PORT}", text)
    text = _BATCH_ID.sub("batch_" + VARIES, text)
    text = _PID.sub(VARIES, text)
    for pattern in _MEASURED:
        text = pattern.sub(lambda match: VARIES + (" s" if match.group(0).endswith(" s") else ""), text)
    return text.rstrip("\n")


# --------------------------------------------------------------------------------------------------- the site

def docs_map(prefix: str = "") -> str:
    """Every page of the site but the home page, in mkdocs.yml's nav order, as a list of links with its title;
    `prefix` before each link (README.md's links start with docs/)."""
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    lines = []
    for section, page in _pages(nav):
        if page == "index.md":
            continue
        title = _title(ROOT / "docs" / page)
        lines.append(f"- [{title}]({prefix}{page})" + (f" ({section})" if section else ""))
    return "\n".join(lines) + "\n"


def _pages(nav: list[Any], section: str = "") -> Iterator[tuple[str, str]]:
    for entry in nav:
        if isinstance(entry, str):
            yield section, entry
        elif isinstance(entry, dict):
            for name, value in entry.items():
                if isinstance(value, list):
                    yield from _pages(value, name)
                else:
                    yield section, value


def _title(page: Path) -> str:
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    raise ValueError(f"{page} has no title (a first line '# ...')")


# ------------------------------------------------------------------------------------ the front page and guides

def job_file_section(section: str) -> str:
    """One section of the job file (`limits`, `retry`, ...): its keys' table, as in job_file_reference."""
    from batch.config import JobSpec

    field = JobSpec.model_fields[section]
    model = _section_of(field)
    if model is None:
        raise KeyError(f"the job file has no section {section!r}")
    return _keys_table(list(_keys(model)), prefix=f"{section}.")


def providers_tables() -> str:
    """The built-in providers (batch.providers.PROVIDERS): where each is and whose key it takes, then each rule in
    which they differ."""
    from batch.providers import PROVIDERS, ZHIPU_CODES

    providers = list(PROVIDERS.values())
    where = ["| `provider` | `base_url` | Key variable | Key required |", "|---|---|---|---|"]
    for provider in providers:
        required = "yes" if provider.key_required else "no; without one, a placeholder key is sent"
        where.append(f"| `{provider.name}` | `{provider.base_url}` | `{provider.api_key_env}` | {required} |")

    def usage(provider):
        return "sent unasked" if provider.stream_usage_unasked else "asked for with `stream_options.include_usage`"

    def schema(provider):
        form = "in the form OpenAI's strict mode takes" if provider.strict_schema else "as written"
        return f"`{provider.schema_via}`" + (f", {form}" if provider.schema_via == "response_format" else "")

    def dialect(provider):
        extra = ", `auto_delete_input_file`" if provider.batch_dialect.auto_delete_input_file else ""
        return f"`{provider.batch_dialect.endpoint}`{extra}"

    def files(provider):
        return f"{provider.batch_max_requests:,} requests, {provider.batch_max_bytes:,} bytes"

    def ranges(provider):
        return ", ".join(f"`{name}` [{low:g}, {high:g}]" for name, (low, high) in provider.param_ranges.items()) \
            or "none"

    def codes(provider):
        return "Zhipu's" if provider.codes is ZHIPU_CODES else "its own"

    rules = (("Streamed usage", usage), ("`output.schema_via` default", schema), ("Batch API dialect", dialect),
             ("Batch API file limits", files), ("`model.params` ranges", ranges), ("Business codes", codes))
    table = ["| Rule | " + " | ".join(f"`{p.name}`" for p in providers) + " |",
             "|---|" + "---|" * len(providers)]
    for name, rule in rules:
        table.append(f"| {name} | " + " | ".join(_cell(rule(p)) for p in providers) + " |")
    return "\n".join(where) + "\n\n" + "\n".join(table) + "\n"


def retry_failed_classes() -> str:
    """The failure classes `--retry-failed` sends again (batch.checkpoint.answered.RETRYABLE_LATER), as a list."""
    from batch.checkpoint.answered import RETRYABLE_LATER

    return ", ".join(f"`{error_class}`" for error_class in sorted(RETRYABLE_LATER)) + "\n"


# The one-line errors the docs show, each made by running batch on a small job of its own, in a folder of its own:
# the job file's lines after the first three (the input, the prompt, the model), the input's text, the commands run
# before (to make a checkpoint: `run --limit 0` sends nothing), the command, and its exit code.
_JOB_HEAD = ("name: reviews\n"
             "input: {path: reviews.csv, id_column: review_id}\n"
             "prompt: {template: \"Classify: {text}\"}\n")
_LOCAL_MODEL = "model: {provider: local, name: glm-4-flash, base_url: \"http://127.0.0.1:9/v1\"}\n"
_OUTPUT = "output: {path: out/reviews.parquet}\n"
_REVIEWS = "review_id,text\nr1,Love it!\nr2,Broke in a week.\n"
ERROR_CASES: dict[str, tuple[str, str, tuple[tuple[str, ...], ...], tuple[str, ...], int]] = {
    "unknown_key": (_LOCAL_MODEL + "limits:\n  concurency: 4\n" + _OUTPUT, _REVIEWS, (), ("validate",), 2),
    "wrong_type": (_LOCAL_MODEL + "limits:\n  concurrency: true\n" + _OUTPUT, _REVIEWS, (), ("validate",), 2),
    "out_of_range": (_LOCAL_MODEL + "limits:\n  concurrency: 5000\n" + _OUTPUT, _REVIEWS, (), ("validate",), 2),
    "duplicate_key": (_LOCAL_MODEL + _LOCAL_MODEL + _OUTPUT, _REVIEWS, (), ("validate",), 2),
    "provider_range": ("model: {provider: zhipu, name: glm-4-flash, params: {temperature: 1.5}}\n" + _OUTPUT,
                       _REVIEWS, (), ("validate",), 2),
    "missing_key": ("model: {provider: zhipu, name: glm-4-flash}\n" + _OUTPUT, _REVIEWS, (), ("validate",), 2),
    "open_quote": (_LOCAL_MODEL + _OUTPUT, "review_id,text\nr1,\"Love it!\nr2,Broke in a week.\n", (),
                   ("validate",), 2),
    "field_count": (_LOCAL_MODEL + _OUTPUT, "review_id,text\nr1,Love it!,5\nr2,Broke in a week.\n", (),
                    ("validate",), 2),
    "duplicate_id": (_LOCAL_MODEL + _OUTPUT, "review_id,text\nr1,Love it!\nr1,Broke in a week.\n", (),
                     ("validate",), 2),
    "settings_changed": (_LOCAL_MODEL + _OUTPUT, _REVIEWS, (("run", "--limit", "0"), ("edit",)), ("validate",), 2),
    "not_complete": (_LOCAL_MODEL + _OUTPUT, _REVIEWS, (("run", "--limit", "0"),),
                     ("export", "--format", "csv", "--to", "out/reviews.csv"), 2),
    # not an error: the warning a damaged write-ahead log gets (a line that is not a record), from status
    "damaged_wal": (_LOCAL_MODEL + _OUTPUT, _REVIEWS, (("run", "--limit", "0"), ("garble",)), ("status",), 0),
    # a second run while one is alive (its endpoint never answers: it retries, then waits the outage out)
    "run_locked": (_LOCAL_MODEL + _OUTPUT, _REVIEWS, (("alive",),), ("run",), 4),
}


def error_line(*cases: str) -> str:
    """What batch prints on stderr for each of these ERROR_CASES, in one text block."""
    lines = "\n".join(error_lines()[case] for case in cases)
    return f"```text\n{lines}\n```\n"


# Runs every case's commands in one process (one start-up, not one per command): its argument is the cases' folders
# and steps as JSON; it prints each case's last exit code and stderr as JSON.
_ERROR_DRIVER = """
import contextlib, io, json, os, subprocess, sys, time
from pathlib import Path
from batch.checkpoint.guard import RunLock
from batch.cli import main
cases = json.loads(sys.argv[1])
# ["alive"]: a run of the case's job in another process, holding its lock until the end. Each starts first, and
# starts up while the cases before its own run.
alive = {case: subprocess.Popen([sys.executable, "-m", "batch", "run", "job.yaml"], cwd=folder,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
         for case, (folder, steps) in cases.items() if ["alive"] in steps}
found = {}
for case, (folder, steps) in cases.items():
    os.chdir(folder)
    for step in steps:
        if step == ["alive"]:  # wait until that run holds the lock
            lock, deadline = RunLock(Path("out/reviews.checkpoint")), time.monotonic() + 120
            while lock.holder() is None:
                if alive[case].poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"{case}: the run meant to hold the lock ended or never took it")
                time.sleep(0.05)
            continue
        if step == ["edit"]:  # the template changed since the checkpoint was made
            with open("job.yaml", encoding="utf-8") as job:
                text = job.read()
            with open("job.yaml", "w", encoding="utf-8") as job:
                job.write(text.replace("Classify:", "Summarise:"))
            continue
        if step == ["garble"]:  # a line of the write-ahead log that is not a record
            with open("out/reviews.checkpoint/wal.jsonl", "a", encoding="utf-8") as wal:
                wal.write("{not a record\\n")
            continue
        said = io.StringIO()
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            code = main([step[0], "job.yaml", *step[1:]])
    found[case] = [code, said.getvalue()]
for run in alive.values():  # its folder is thrown away: it need not stop in good order
    run.kill()
    run.wait()
print(json.dumps(found))
"""


@functools.cache
def error_lines() -> dict[str, str]:
    """Every case of ERROR_CASES run, each in a folder of its own: what batch printed on stderr."""
    with tempfile.TemporaryDirectory(prefix="batch-docs-") as folder:
        cases = {}
        for case, (job_text, reviews, before, arguments, _code) in ERROR_CASES.items():
            (Path(folder) / case).mkdir()
            (Path(folder) / case / "job.yaml").write_text(_JOB_HEAD + job_text, encoding="utf-8")
            (Path(folder) / case / "reviews.csv").write_text(reviews, encoding="utf-8")
            cases[case] = [str(Path(folder) / case), [list(step) for step in (*before, arguments)]]
        env = {name: value for name, value in os.environ.items() if name not in ("ZHIPU_API_KEY", "OPENAI_API_KEY")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        done = subprocess.run([sys.executable, "-c", _ERROR_DRIVER, json.dumps(cases)], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"the error cases did not run:\n{done.stdout}{done.stderr}")
        found = {}
        for case, (code, said) in json.loads(done.stdout).items():
            if code != ERROR_CASES[case][4]:
                raise RuntimeError(f"{case}: batch exited {code}, not {ERROR_CASES[case][4]}:\n{said}")
            found[case] = normalise(said, cases[case][0], DEMO_PORT)
    return found


def simulator_port_taken() -> str:
    """What the simulator says when its port is taken (as `make demo` shows it), as a text block."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "batch.simulator", "--port", str(port)], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    text = normalise(done.stderr, tempfile.gettempdir(), port)
    return f"```text\n{text}\n```\n"


# The lines of README.md that are cog's own markers: the site's copy has their output only.
_COG_MARKER = re.compile(r"^.*\[\[\[(cog|end)\b.*$\n?", re.MULTILINE)


def readme_as_home() -> str:
    """README.md as the site's home page (docs/index.md): the same text, without its cog markers, its links into
    docs/ made relative to docs/ (on GitHub the README links docs/x.md; on the site that page is x.md)."""
    text = _COG_MARKER.sub("", (ROOT / "README.md").read_text(encoding="utf-8"))
    return re.sub(r"\]\(docs/", "](", text)


def business_codes() -> str:
    """Zhipu's business codes (batch.providers.ZHIPU_CODES, which every built-in provider judges by): the class each
    gives a failure, and what batch does about it."""
    from batch.providers import ZHIPU_CODES as codes

    def listed(numbers) -> str:
        return ", ".join(str(number) for number in sorted(numbers))

    def span(numbers: range) -> str:
        return str(numbers.start) if len(numbers) == 1 else f"{numbers.start}-{numbers[-1]}"

    rows = ["| Code | Class | What batch does |", "|---|---|---|",
            f"| {listed(codes.rate_limited)} | `rate_limited` | retried; a `Retry-After` on "
            f"{listed(codes.overloaded)} pauses every request |",
            f"| {listed(codes.server_error)} | `server_error` | retried |"]
    by_class: dict[str, list[int]] = {}
    for code, error_class in codes.row.items():
        by_class.setdefault(error_class, []).append(code)
    rows += [f"| {listed(numbers)} | `{error_class}` | the row fails |" for error_class, numbers in by_class.items()]
    job: dict[str, list[str]] = {}
    for numbers, error_class in codes.job:
        job.setdefault(error_class, []).append(span(numbers))
    rows += [f"| {', '.join(spans)} | `{error_class}` | the job stops (exit 3) |" for error_class, spans in job.items()]
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------------------ helpers

def _cell(text: str) -> str:
    """Text for a Markdown table's cell: its pipes escaped, on one line."""
    return " ".join(text.replace("|", "\\|").split())


def _sentence(text: str) -> str:
    """A help text as a sentence of the docs: as written (it may start with a name, `json: ...`), ended by a stop."""
    text = text.strip()
    return text if not text or text.endswith((".", "?", "!", "…")) else text + "."


def _first_sentence(text: str) -> str:
    text = " ".join(inspect.cleandoc(text).split())
    end = re.search(r"(?<=[.:;])\s", text)
    return text[:end.start()].rstrip(":;") + "." if end else text


def cogged_files(root: Path = ROOT) -> list[str]:
    """The files with cog blocks, relative to `root`."""
    return sorted({path for pattern in COGGED for path in glob.glob(pattern, root_dir=root)})


def cog(*options: str, root: Path = ROOT, files: list[str] | None = None) -> int:
    """cog over `files` (default: every cogged file) of `root`, this folder importable as `generate`; its exit
    status."""
    from cogapp import Cog

    here = os.getcwd()
    os.chdir(root)
    try:
        return Cog().main(["cog", *options, "-I", str(Path(__file__).parent), *(files or cogged_files(root))])
    finally:
        os.chdir(here)


def main(argv: list[str]) -> int:
    """`python docs/generate.py`: write every generated part again; `--check`: fail if one is out of date."""
    return cog("--check", "--diff") if argv == ["--check"] else cog("-r")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
