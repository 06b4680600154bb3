"""Every check `run` makes before it writes or sends anything, made once: `validate` is exactly this.

`preflight()` turns a job file into a `Plan` (batch/plan.py): every value derived from the validated
`JobSpec`, resolved once and typed (the locations, the limits, the retry and budget settings, the output
settings, the request body's params with `extra_body` merged in, the `max_tokens` that is sent, the price,
the endpoint, the key, the prompt builder, the input table). This is the only module that reads the job
file's keys: the pool, the budget, the token limiter, the Batch API and `estimate` all read these same
values, so they cannot disagree about what a request may cost. A job that fails here has not touched its
checkpoint folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values

from batch.checkpoint.final import is_current, merged_footer
from batch.checkpoint.finished import shard_state, why_unfinished
from batch.checkpoint.guard import FINGERPRINT_NAME, LOCK_NAME, compare_fingerprint, fingerprint
from batch.checkpoint.layout import layout_of_run, layout_words, other_layout_refused, read_layout
from batch.checkpoint.writer import WAL_NAME, Checkpoint, checkpoint_at, part_order
from batch.config import JobSpec, answer_timeouts, load_job
from batch.errors import ConfigError, UnreachableError, in_callers_words, read_reason
from batch.input.prompts import PromptBuilder
from batch.input.reader import InputTable
from batch.logs import LOG_NAME, keep_secret, redact
from batch.money.cache import check_answer_cache
from batch.plan import (
    CHECKPOINT_MARKERS,
    LEDGER_EVENTS_PREFIX,
    LEDGER_NAME,
    BatchApiSettings,
    BudgetLimits,
    Limits,
    Locations,
    OutputSettings,
    Plan,
    Retry,
    Settings,
)
from batch.pricing import Price, Pricer, pricer_for
from batch.providers import Provider
from batch.proxy import env_proxy
from batch.records import OUTPUT_FIELDS
from batch.replies.schema import json_output_for, openai_strict
from batch.shard import FOLDER, INDEX_VARIABLES, Shard, choose_shard
from batch.storage.base import Entry, StorageError, Store, is_unreachable
from batch.storage.locations import (
    STORAGE_SECRET_VARIABLES,
    Location,
    credentials_from,
    input_kind,
    is_url,
    object_exists,
    store_at,
)
from batch.wording import counted


def resolve(spec: JobSpec) -> Settings:
    """The values derived from a job file, with the checks that need nothing but the job file."""
    settings = settings_of(spec)
    if settings.provider.strict_schema:
        _check_own_strict_schema(spec, _merged_params(spec).get("response_format"))
    if spec.budget is not None:
        _check_budget(spec, settings.max_tokens, settings.pricer)
    _check_output_columns(spec)
    return settings


def settings_of(spec: JobSpec) -> Settings:
    """The values derived from a job file, each once, with only the checks deriving them makes (a schema or a
    template that cannot be read): what `status` and `export` read a job by, which refuse nothing a run would
    not (resolve adds the run's checks)."""
    json_output = json_output_for(spec)
    try:
        builder = PromptBuilder(spec.prompt, json_output.system_note if json_output else None)
    except ConfigError as exc:
        raise ConfigError(f"{spec.where('prompt.template')}: {exc}") from None
    body_params = _merged_params(spec)
    provider = spec.model.provider_rules
    if json_output is not None and json_output.response_format is not None:
        # A response_format in params is the job's own choice (e.g. strict: false), so it is kept.
        body_params.setdefault("response_format", json_output.response_format)
    max_tokens = body_params.get("max_tokens")  # a positive int when present: config checked both places
    if spec.model.stream:
        body_params.update(stream_params(provider, body_params.get("stream_options")))
    pricer = pricer_for(spec.model.name, Price(**spec.pricing.model_dump()) if spec.pricing else None)
    out = spec.output
    locations = Locations(spec.job_path, spec.input.path, out.path, spec.checkpoint_dir, spec.local_dir,
                          spec.cache_path, cache_shared=spec.cache is not None)
    output = OutputSettings(spec.id_column_out, tuple(out.keep_columns), out.parse_json,
                            tuple(out.json_columns) if out.json_columns is not None else None, out.checkpoint_rows,
                            out.checkpoint_seconds, out.checkpoint_lease_s)
    return Settings(
        spec, spec.name, spec.model.name, spec.mode, spec.model.stream, spec.prompt.system, spec.input.id_column,
        locations, _limits(spec), Retry(**spec.retry.model_dump()),
        BudgetLimits(**spec.budget.model_dump()) if spec.budget is not None else None, output,
        _batch_api(spec), provider, body_params, max_tokens, pricer,
        spec.model.base_url or provider.base_url, spec.model.api_key_env or provider.api_key_env, builder,
        json_output, spec.shards, spec.shard)


def _limits(spec: JobSpec) -> Limits:
    timeout, idle = answer_timeouts(spec)  # idle None without a stream: it never applies
    return Limits(**{**spec.limits.model_dump(), "timeout_s": timeout, "idle_timeout_s": idle})


def _batch_api(spec: JobSpec) -> BatchApiSettings:
    """batch_api: as written, a file size it leaves out the default or, where that is larger, the provider's limit
    (config.check_job refuses a size written above it)."""
    given, provider = spec.batch_api, spec.model.provider_rules

    def size(key: str, most: int) -> int:
        value: int = getattr(given, key)
        return value if key in given.model_fields_set else min(value, most)

    return BatchApiSettings(size("max_requests_per_file", provider.batch_max_requests),
                            size("max_bytes_per_file", provider.batch_max_bytes), given.poll_interval_s)


def _merged_params(spec: JobSpec) -> dict[str, Any]:
    """model.params with extra_body merged in (it wins): provider-only fields and OpenAI ones go the same way, as
    the SDK's create() has fixed kwargs."""
    body_params = dict(spec.model.params)
    body_params.update(body_params.pop("extra_body", None) or {})
    return body_params


def input_table(settings: Settings) -> InputTable:
    """The job's input, opened (its columns checked), not yet scanned."""
    return InputTable(settings.locations.input, settings.input_id_column, settings.builder.columns,
                      list(settings.output.keep_columns), messages_column=settings.builder.messages_column,
                      shard=settings.shard)


def _check_own_strict_schema(spec: JobSpec, response_format: Any) -> None:
    """A strict json_schema response_format written in params is sent as it is: OpenAI would refuse every request
    (400) if strict mode does not take it, so validate does, naming the first reason."""
    wrapper = response_format.get("json_schema") if isinstance(response_format, dict) else None
    schema = wrapper.get("schema") if isinstance(wrapper, dict) and wrapper.get("strict") is True else None
    if not isinstance(schema, dict):
        return
    made = openai_strict(schema)
    if made.blocker is None and not made.changes:
        return
    problem = f"it cannot take {made.blocker}" if made.blocker else f"it needs {made.changes[0]}"
    extra = spec.model.params.get("extra_body") or {}
    key = "model.params.extra_body.response_format" if "response_format" in extra else "model.params.response_format"
    raise ConfigError(f"{spec.where(key)}: {key}: OpenAI's strict mode refuses this schema ({problem}): "
                      "fix it, set strict: false, or leave response_format out and set output.json_schema, which "
                      "batch sends in the form strict mode takes")


def stream_params(provider: Provider, stream_options: Any) -> dict[str, Any]:
    """The body fields that ask for a stream with its usage: asked for in stream_options where the provider sends
    none unasked (the job's own stream_options are kept beside it)."""
    if provider.stream_usage_unasked:
        return {"stream": True}
    options = stream_options if isinstance(stream_options, dict) else {}
    return {"stream": True, "stream_options": {**options, "include_usage": True}}


def preflight(job: str | Path | JobSpec, force: bool = False, api_key: str | None = None,
              mode: str | None = None, shard: ShardAsk | None = None) -> Plan:
    """Every check a run makes before its lock, its first write and its first request; ConfigError at the first problem.

    `job` is a job file, or a JobSpec already checked (batch.api builds one from Python values). `force` (run
    --force) accepts a checkpoint made with other settings. `api_key` (the Python API's) is used instead of the
    environment's. `mode` is the run's (--mode; default: the job's): the answer cache is checked for an online
    run, the one that opens it. `shard`: what the command line and the environment say of shards (a job file's
    `shards: N` without an index to pick one is refused).
    """
    spec = job if isinstance(job, JobSpec) else load_job(job)
    ask = shard or ShardAsk()
    spec = shard_spec(spec, ask)
    settings = resolve(spec)
    _keep_storage_secrets(spec)
    _check_input_reachable(spec)
    check_output_path(spec)  # the output's store reachable too, after the checks that need no call
    _check_checkpoint_writable(spec)
    merged_shards = check_layout(spec, spec.shard.count if spec.shard else ask.count or spec.shards)
    if spec.cache is not None:
        _check_creatable(spec, "cache.path", spec.cache.path, "the answer cache")
        _check_writable(spec, "cache.path", spec.cache.path, "the answer cache")
    if (mode or spec.mode) == "online":
        check_answer_cache(spec.cache_path)
    api_key = usable_key(api_key, "api_key") if api_key else resolve_api_key(spec, settings.api_key_env)
    proxy = env_proxy(settings.base_url)
    if proxy is not None and urlsplit(proxy).password:
        keep_secret(urlsplit(proxy).password)
    if spec.limits.shared is not None:  # the run would send nothing until it answers
        from batch.shared.connection import check_reachable  # the Redis client's import (0.3 s) for this job alone

        check_reachable(spec.limits.shared, spec.where("limits.shared"))
    table = input_table(settings)
    shapes = fingerprint(spec)  # the run stores this one: the schema file as read here, as the run asks for it
    if not force:
        compare_fingerprint(settings.locations.checkpoint_dir, shapes, spec.job_path)
    # Bad ids or text fail here. The ids' hashes, in input order, are kept only to find the rows of a
    # previous run's records.
    rows = table.scan(keep_hashes=checkpoint_at(settings.locations).has_records())
    resolved = {field.name: getattr(settings, field.name) for field in fields(Settings)}
    return Plan(**{**resolved, "mode": mode or settings.mode}, api_key=api_key, proxy=proxy, fingerprint=shapes,
                table=table, rows=rows, merged_shards=merged_shards)


@dataclass(frozen=True)
class ShardAsk:
    """What a command was told of shards: --shard K/N, --shards N, the environment's index variables (the command
    line's; the Python API reads none), and whether a shard count with no index is a mistake (a run) or the whole
    job (validate, status)."""

    given: str | None = None
    count: int | None = None
    environ: Mapping[str, str] = field(default_factory=dict)
    need_index: bool = True


def shard_spec(spec: JobSpec, ask: ShardAsk) -> JobSpec:
    """`spec`, or the part of it the shard picked by `ask` runs (JobSpec.for_shard); ConfigError for a bad pick."""
    if spec.shard is not None:  # made for a shard already
        return spec
    shard = choose_shard(ask.given, ask.count, spec.shards, spec.where("shards"), ask.environ, ask.need_index)
    return spec if shard is None else spec.for_shard(shard)


def shard_count(settings: Settings, given: int | None = None) -> int | None:
    """How many shards the job runs as: --shards, the job file's `shards:`, or the shard folders its checkpoint
    holds (all of one count); None when it is not sharded. A checkpoint holding answers of other layouts than the one
    asked for (or, none asked for, of more than one) is refused, as a run in that layout would be (check_layout)."""
    at = settings.locations
    if given is not None and settings.shards is not None and given != settings.shards:
        raise ConfigError(f"--shards {given} and {at.job_file}: shards: {settings.shards} disagree on "
                          "the number of shards: give one count")
    layouts = checkpoint_layouts(at.checkpoint_dir, at.local_dir)
    count = given or settings.shards
    if count is not None:
        if layouts.answered and count not in layouts.answered:
            raise ConfigError(f"{at.checkpoint_dir} holds {layout_words(layouts.answered)}, none of "
                              f"{counted(count, 'shard')}: "
                              f"{_how_to_read(layouts.answered)}")
        return count
    held = layouts.answered or sorted(layouts.shards)
    if len(held) > 1:
        raise ConfigError(f"{at.checkpoint_dir} holds {layout_words(held)}: {_how_to_read(held)}")
    return held[0] if held else None


def _how_to_read(held: Sequence[int | None]) -> str:
    """How a command reads a checkpoint holding answers of the layouts `held`: one layout at a time, by its count."""
    ways = ["without --shards or shards: N" if count is None else f"with --shards {count}" for count in held]
    if len(ways) == 1:
        return f"read it {ways[0]}"
    return f"read one layout at a time, {' or '.join(ways)}; the answers of the others are left out of it"


def job_shards(spec: JobSpec, given: int | None = None) -> list[Settings] | None:
    """The settings of each shard of the whole job `spec` (shard_count: how many; `given`: --shards), or None for a
    job that is not split, or a `spec` made for one shard (JobSpec.for_shard), which is read as a job of its own.
    Every command that reads a job across its shards (merge, status, estimate, export, read_results) finds them here."""
    if spec.shard is not None:
        return None
    count = shard_count(settings_of(spec), given)
    return _shards_of(spec, count) if count else None


def _shards_of(spec: JobSpec, count: int) -> list[Settings]:
    return [settings_of(spec.for_shard(Shard(index, count))) for index in range(count)]


@dataclass(frozen=True)
class Layouts:
    """What a job's checkpoint folder holds, layout by layout: the answers of a run of the whole job (records, or
    Batch API batches, at its root), and its shard folders (shard=K-of-N) of each count N. A job's rows are answered
    in one layout: a run in another reads none of these answers, so it would send their rows again and pay twice."""

    unsharded: bool  # answers at the root
    shards: dict[int, bool]  # each count N of its shard folders: whether one of them holds answers

    @property
    def answered(self) -> list[int | None]:
        """The layouts holding answers: None for the unsharded one, N for N shards."""
        return ([None] if self.unsharded else []) + sorted(count for count, held in self.shards.items() if held)


def checkpoint_layouts(folder: Location, local_dir: Path) -> Layouts:
    """The layouts the job's checkpoint `folder` holds (`local_dir`: the whole job's local folder, where an unsharded
    run's write-ahead log is): one listing of its shard folders, one of its root."""
    store = store_at(folder)
    try:
        listed = store.list("shard=")
    except OSError:  # no checkpoint yet
        return Layouts(False, {})
    shards: dict[int, bool] = {}
    for entry in listed:
        name, _, key = entry.key.partition("/")
        if found := FOLDER.fullmatch(name):
            count = int(found[2])
            shards[count] = shards.get(count, False) or _holds_answers(key, entry.size)
    try:
        unsharded = (Checkpoint(local_dir, store=store).has_records()
                     or any(_holds_answers(entry.key, entry.size) for entry in _ledger_entries(store)))
    except OSError:
        unsharded = False
    claimed, count = read_layout(folder)  # a run of it sent, or was about to: its answers may be in no part yet
    if claimed:
        if count is None:
            unsharded = True
        else:
            shards[count] = True
    return Layouts(unsharded, shards)


def _ledger_entries(store: Store) -> list[Entry]:
    return [*store.list(LEDGER_EVENTS_PREFIX), *store.list(LEDGER_NAME)]


def _holds_answers(key: str, size: int) -> bool:
    """Whether the object `key` of a checkpoint (`size` bytes) holds answers, or rows sent for them: a part of
    records, a write-ahead log with something in it, a Batch API ledger's step."""
    return (part_order(key) is not None or key.startswith(LEDGER_EVENTS_PREFIX) or key == LEDGER_NAME
            or (key == WAL_NAME and size > 0))


def check_layout(spec: JobSpec, count: int | None) -> int | None:
    """A run of `spec` in the layout `count` (N shards, or None: unsharded) must be the one the job's checkpoint holds
    answers of, if any: a run in another reads none of them, so it would pay for their rows again and go past the
    job's budget. ConfigError naming what the checkpoint holds and what to do; or, for an unsharded run of a job
    whose N shards all finished and whose output is merged from them as they are now, N: the job is complete, and
    the run sends nothing (a cron that reruns the job keeps working)."""
    layouts = checkpoint_layouts(spec.job_checkpoint_dir, spec.job_local_dir)
    held = layouts.answered
    if not [layout for layout in held if layout != count]:
        return None
    if count is None and len(held) == 1 and _merged_and_current(spec, held[0]):  # type: ignore[arg-type]
        return held[0]
    raise ConfigError(other_layout_refused(spec.job_checkpoint_dir, held, layout_of_run(spec.shard, count), count))


def _merged_and_current(spec: JobSpec, count: int) -> bool:
    """Whether the job's `count` shards have all finished, none is running, and the job's output is the one `batch
    merge` writes from their records and the input as they are now (so no row of theirs is pending either)."""
    parts = _shards_of(spec, count)
    if any(why_unfinished(shard_state(part)) for part in parts):
        return False
    return is_current(spec.output.path, merged_footer(settings_of(spec), (checkpoint_at(part.locations)
                                                                          for part in parts)))


def validation_report(plan: Plan) -> str:
    columns = ", ".join(plan.builder.columns)
    part = f" for {plan.shard.label}" if plan.shard else ""
    # The whole of a job split into shards is checked, but no run can be it: say what a run needs (a run without it
    # is refused, and validate said "ok").
    runs = (f"; it runs as {counted(plan.shards, 'shard')}: each run needs --shard K/{plan.shards}, or "
            f"{' or '.join(INDEX_VARIABLES)} set" if plan.shard is None and plan.shards else "")
    done = f"; complete: {merged_words(plan.merged_shards)}, so a run sends nothing" if plan.merged_shards else ""
    return (f"{plan.locations.job_file}: ok: {counted(plan.rows, 'row')} in {plan.locations.input}{part}, "
            f"prompt columns {columns}, model {plan.model} at {plan.base_url}{runs}{done}")


def merged_words(count: int) -> str:
    """What a run of a job its `count` shards answered and merged (Plan.merged_shards) says it does."""
    return f"the job's shards (shard=K-of-{count}) have all finished and its output is merged from them"


def _check_output_columns(spec: JobSpec) -> None:
    """The id column and the kept input columns must not share a name with a column batch writes: one would silently
    replace the other in the final file (ids overwritten by statuses, say)."""
    if spec.input.id_column in OUTPUT_FIELDS:
        raise ConfigError(f"{spec.where('input.id_column')}: input.id_column: '{spec.input.id_column}' is also the "
                          f"name of a result column ({', '.join(OUTPUT_FIELDS)}), which would replace the ids in the "
                          "output; rename that input column")
    for column in spec.output.keep_columns:
        if column in OUTPUT_FIELDS:
            raise ConfigError(f"{spec.where('output.keep_columns')}: output.keep_columns: '{column}' is also the "
                              f"name of a result column; rename that input column, or leave it out of keep_columns")
        if column == spec.id_column_out and spec.input.id_column is None:
            raise ConfigError(f"{spec.where('output.keep_columns')}: output.keep_columns: '{column}' is the name of "
                              "the derived id column; rename that input column, or set input.id_column to it")


def _check_budget(spec: JobSpec, max_tokens: int | None, pricer: Pricer | None) -> None:
    assert spec.budget is not None
    if max_tokens is None:
        raise ConfigError(f"{spec.where('budget')}: budget needs model.params.max_tokens "
                          "(or model.params.extra_body.max_tokens), to bound what a request can cost")
    if spec.budget.max_cost is not None and pricer is None:
        raise ConfigError(f"{spec.where('budget.max_cost')}: budget.max_cost needs a price for model "
                          f"{spec.model.name}: add pricing: {{input: ..., output: ...}} (CNY per million tokens)")


def check_output_path(spec: JobSpec) -> None:
    """Refuse an output that would overwrite the input or the job file, or tangle with a checkpoint folder.

    Paths are compared resolved (symlinks, `..`), as the writes will land.
    """
    given = spec.output.path
    out = given.resolve()
    source = spec.input.path.resolve()
    where = f"{spec.where('output.path')}: output.path {given}"
    both_local = not is_url(out) and not is_url(source)
    if out == source or (both_local and out.exists() and source.exists() and os.path.samefile(out, source)):
        raise ConfigError(f"{where} is the input file {spec.input.path}: the results would overwrite it; "
                          "write them to another file")
    if out == spec.job_path.resolve():
        raise ConfigError(f"{where} is the job file: write the results to a .parquet file")
    if not is_url(out) and out.is_dir():
        raise ConfigError(f"{where} is a folder: name the Parquet file to write, e.g. {given / 'results.parquet'}")
    if given.suffix.lower() != ".parquet":
        raise ConfigError(f"{where}: the output is a Parquet file, so name it .parquet (e.g. "
                          f"{given.with_suffix('.parquet').name}); for CSV or JSONL, " + in_callers_words(
                              "`batch export` it once done", "write read_results(...) with to_csv or to_json"))
    if is_url(out):
        _check_output_reachable(spec, where)
        with _remote_failures(where, out):
            under = store_at(out).list()  # objects under it: what a bucket's console shows as a folder
        if under:
            raise ConfigError(f"{where} is a folder: name the Parquet file to write, e.g. {given / 'results.parquet'}")
    own = spec.checkpoint_dir.resolve()
    if own == source or own in source.parents:
        raise ConfigError(f"{where}: its checkpoint folder {spec.checkpoint_dir} would hold the input "
                          f"{spec.input.path}; put the output elsewhere")
    source_checkpoint = source.with_name(source.stem + ".checkpoint")  # the input may be another job's output
    for folder in out.parents:
        if folder == source_checkpoint or (folder.suffix == ".checkpoint" and _holds_a_checkpoint(folder)):
            raise ConfigError(f"{where} is inside the checkpoint folder {folder}, which batch manages; "
                              "put the output elsewhere")
    if not is_url(out):
        _check_creatable(spec, "output.path", given, "the output and its checkpoint folder")


def check_export_target(locations: Locations, target: Location) -> None:
    """Refuse an export that would overwrite the job's input, its job file, its output, or a file in a checkpoint
    folder (compared resolved, as for output.path)."""
    to = target.resolve()
    local = not is_url(to)
    keep = {"input": locations.input, "job file": locations.job_file, "output": locations.output}
    for what, path in keep.items():
        if to == path.resolve() or (local and to.exists() and not is_url(path) and path.exists()
                                    and os.path.samefile(to, path)):
            raise ConfigError(f"--to {target} is the job's {what} {path}: export to another file")
    if local and to.is_dir():
        raise ConfigError(f"--to {target} is a folder: name the file to write, e.g. {target / 'results.csv'}")
    for folder in to.parents:
        if folder == locations.checkpoint_dir.resolve() or (local and folder.suffix == ".checkpoint" and
                                                             _holds_a_checkpoint(folder)):
            raise ConfigError(f"--to {target} is inside the checkpoint folder {folder}, which batch manages; "
                              "export elsewhere")


def _holds_a_checkpoint(folder: Location) -> bool:
    if is_url(folder):  # a checkpoint on a bucket: its fingerprint (its log stays local)
        return object_exists(folder / CHECKPOINT_MARKERS[0])
    return any((folder / name).exists() for name in CHECKPOINT_MARKERS)


def _check_creatable(spec: JobSpec, key: str, path: Path, what: str) -> None:
    """The nearest existing folder above `path` must be a folder batch can write in: a file there, or a folder
    read-only or immutable, would stop the run later (the output's folder: only after every row was paid for)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{spec.where(key)}: {key} {path}: {parent} is a file, not a folder, "
                                  f"so {what} cannot be written there")
            _check_writable(spec, key, parent, what)
            return


def _check_writable(spec: JobSpec, key: str, path: Path, what: str) -> None:
    """`path`, if it exists, must be writable by this process: the run writes in it (os.access: a read-only mount,
    an immutable flag, the permissions, as they apply to this user, root included)."""
    if path.exists() and not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
        raise ConfigError(f"{spec.where(key)}: {key}: {path} cannot be written (read-only, immutable or not "
                          f"permitted), so {what} cannot be written there")


def _check_checkpoint_writable(spec: JobSpec) -> None:
    """An existing checkpoint folder (its local folder, with the checkpoint on a URL), and the files in it a run
    appends to or writes in place, must be writable: the run's first write (its log) would fail, or a later one."""
    folder = spec.local_dir
    key = "output.local_dir" if is_url(spec.checkpoint_dir) else "output.path"
    what = "the checkpoint" if key == "output.path" else "the checkpoint's local files (its log, its lock)"
    if key == "output.local_dir":
        _check_creatable(spec, key, folder / LOG_NAME, what)
    _check_writable(spec, key, folder, what)
    for name in (LOG_NAME, WAL_NAME, LOCK_NAME, spec.cache_path.name if spec.cache is None else None):
        if name is not None:
            _check_writable(spec, key, folder / name, what)


def check_storage_reachable(spec: JobSpec) -> None:
    """What the commands that only read a job (status, estimate, export, merge, read_results) check before reading
    its files, as a run's preflight does: its input and output, where on URLs, reachable with the environment's
    credentials and their buckets there; one line naming the key otherwise, its secrets masked."""
    _keep_storage_secrets(spec)
    _check_input_reachable(spec)
    if is_url(spec.output.path):
        _check_output_reachable(spec, f"{spec.where('output.path')}: output.path {spec.output.path}")


def _keep_storage_secrets(spec: JobSpec) -> None:
    """A job on URLs reads its credentials from the environment: mask them like the API key, before any error of a
    store's (which may quote a request) is told."""
    if is_url(spec.input.path) or is_url(spec.output.path):
        for name in STORAGE_SECRET_VARIABLES:
            if os.environ.get(name):
                keep_secret(os.environ[name])


def _check_input_reachable(spec: JobSpec) -> None:
    """An input on a URL: its scheme readable (its fsspec package installed), its bucket there and the credentials
    good. A missing file is InputTable's to tell."""
    url = spec.input.path
    if not is_url(url):
        return
    with _remote_failures(f"{spec.where('input.path')}: input.path {url}", url):
        input_kind(url)


def _check_output_reachable(spec: JobSpec, where: str) -> None:
    """The output and its checkpoint on a URL: a scheme batch can write (exclusive creates), the bucket there and the
    credentials good (one list of the checkpoint's fingerprint: nothing is written)."""
    with _remote_failures(where, spec.output.path):
        store_at(spec.checkpoint_dir).list(FINGERPRINT_NAME)


@contextlib.contextmanager
def _remote_failures(where: str, url: Location) -> Iterator[None]:
    """A store's or a filesystem's failure (a bad URL, no credentials, no such bucket) as one line naming the key;
    a server that did not answer is UnreachableError (a later run may find it up), anything else ConfigError."""
    try:
        yield
    except ValueError as exc:
        raise ConfigError(f"{where}: {redact(str(exc))}") from None
    except Exception as exc:  # botocore's credential and endpoint errors are no OSErrors
        reason = exc.strerror if isinstance(exc, StorageError) else (str(exc).splitlines() or [type(exc).__name__])[0]
        if is_unreachable(exc):
            raise UnreachableError(f"{where}: its store does not answer: {redact(str(reason))}; nothing was sent or "
                                   f"written: run again once it answers") from None
        raise ConfigError(f"{where}: cannot reach it: {redact(str(reason))}; the credentials come from "
                          f"{credentials_from(url)}, never from the job file") from None


def usable_key(key: str, source: str) -> str:
    """`key` without the blanks around it: a key read from a file ends in a line break, a pasted one may carry a
    space, and an HTTP header cannot hold either (the request would fail before it left, looking like an outage).
    A key that is blank, or holds a blank, a control or a non-ASCII character inside, is refused; the error names
    where the key came from (`source`), never the key."""
    cleaned = key.strip()
    if not cleaned:
        raise ConfigError(f"{source}: the API key is blank")
    for kind, found in (("a line break", lambda c: c in "\r\n"), ("a blank", str.isspace),
                        ("a control character", lambda c: not c.isprintable()),
                        ("a character that is not ASCII", lambda c: not c.isascii())):
        if any(map(found, cleaned)):  # the kind, not the character: an error never quotes a key
            raise ConfigError(f"{source}: the API key holds {kind} inside it, which no HTTP header can carry: "
                              "check that it is the whole key and nothing else")
    return cleaned


def resolve_api_key(spec: JobSpec, var: str | None) -> str:
    """The key from the environment or a .env beside the job file or in the working directory."""
    key = None
    if var:
        key, source = os.environ.get(var), f"the environment variable {var}"
        if not key:
            for env_file in (spec.job_path.parent / ".env", Path(".env")):
                if env_file.is_file():
                    try:
                        key, source = dotenv_values(env_file, encoding="utf-8").get(var), f"{env_file}: {var}"
                    except (OSError, UnicodeDecodeError) as exc:
                        raise ConfigError(f"{env_file}: cannot read the .env file: {read_reason(exc)}") from None
                    if key:
                        break
    if key:
        return usable_key(key, source)
    if spec.model.provider_rules.key_required or spec.model.api_key_env:
        raise ConfigError(
            f"{spec.job_path}: the API key variable {var} is not set: export {var}=... or put it in a .env file"
        )
    # The SDK refuses an empty key; keyless local servers ignore whatever we send.
    return "no-key"
