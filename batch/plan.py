"""The resolved job: what `preflight()` makes of a job file, typed, read by every stage after it.

`Settings` is what the job file alone determines (enough for `estimate`, `status` and `export`); `Plan` adds
what was checked against the file system and the environment (the key, the opened input). They are values:
built once by batch/preflight.py, never changed after, so the pool, the budget, the token limiter and
`estimate` cannot disagree about what a request may cost. The stages after the preflight read these values,
never the raw `JobSpec` (tests/test_resolved_once.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from batch.config import JobSpec
from batch.input.prompts import PromptBuilder
from batch.input.reader import InputTable
from batch.pricing import Pricer
from batch.providers import Provider
from batch.replies.schema import JsonOutput
from batch.shard import Shard
from batch.storage.base import Store
from batch.storage.locations import Location, store_at

# The files a checkpoint folder holds from its first run: a folder with one is some job's checkpoint.
CHECKPOINT_MARKERS = ("fingerprint.json", "wal.jsonl")
# A checkpoint's Batch API ledger (batch_api/ledger.py), in its store: one object per step, or the file an older batch
# appended the steps to. A checkpoint holding either has sent rows in batches, answered or not yet.
LEDGER_EVENTS_PREFIX = "ledger/"
LEDGER_NAME = "batches.jsonl"

Mode = Literal["online", "batch_api"]


@dataclass(frozen=True)
class Locations:
    """Where a job's files are: relative paths joined to the job file's folder (config.load_job)."""

    job_file: Path
    input: Location
    output: Location
    checkpoint_dir: Location  # beside the output, named after it: its objects (a URL with the output)
    # What needs a local disk (the write-ahead log, the run lock, the log, spooled files): checkpoint_dir itself, or,
    # with the checkpoint on a URL, output.local_dir (config.JobSpec.local_dir).
    local_dir: Path
    cache: Path  # the answer cache's file: cache.path, or the checkpoint's own
    cache_shared: bool  # cache.path given: other jobs may open it too (the checkpoint's own is locked by its run)

    def checkpoint_store(self) -> Store:
        """The store of the checkpoint's objects (batch.storage): its local folder, or its bucket and prefix."""
        return store_at(self.checkpoint_dir)


@dataclass(frozen=True)
class Limits:
    """limits: in the job file, with a streamed answer's default timeouts (config.answer_timeouts)."""

    concurrency: int
    requests_per_minute: float | None
    tokens_per_minute: float | None
    timeout_s: float  # the hard cap on a whole answer
    idle_timeout_s: float | None  # streamed only (None otherwise): the longest silence between chunks
    max_response_bytes: int
    shared: str | None  # a Redis URL: every process of the account keeps to these limits together (batch/shared/)
    shared_lease_s: float  # with shared: how long a slot is held for a process that stops renewing it


@dataclass(frozen=True)
class Retry:
    """retry: in the job file."""

    max_attempts: int
    initial_backoff_s: float
    max_backoff_s: float
    max_outage_s: float  # how long the endpoint may answer nothing before the run stops


@dataclass(frozen=True)
class BudgetLimits:
    """budget: in the job file (at least one of the two is set)."""

    max_cost: float | None
    max_total_tokens: int | None


@dataclass(frozen=True)
class BatchApiSettings:
    """batch_api: in the job file, each file size at most the provider's limit (config.check_job)."""

    max_requests_per_file: int
    max_bytes_per_file: int
    poll_interval_s: float


@dataclass(frozen=True)
class OutputSettings:
    """What shapes the final file beside the records: its id and kept columns, the reply columns, and how often
    the checkpoint writes a part."""

    id_column: str  # the ids' column in the output: input.id_column, or row_id for ids derived from row numbers
    keep_columns: tuple[str, ...]
    parse_json: bool  # output.parse_json, or implied by output.json_schema
    json_columns: tuple[str, ...] | None
    checkpoint_rows: int
    checkpoint_seconds: float
    checkpoint_lease_s: float  # a checkpoint on a URL: its lease's time to live (renewed every third of it)


@dataclass(frozen=True)
class Settings:
    """What the job file alone determines: enough for `estimate`, which needs no key and writes nothing."""

    # The job file as validated, for the caller who made the plan; no stage after the preflight reads it: they
    # read the typed values below.
    spec: JobSpec
    name: str  # the job's
    model: str  # model.name, as sent
    mode: Mode  # the job file's; a Plan's: the run's (--mode, or the job file's)
    stream: bool  # model.stream: answers read as server-sent events
    system: str | None  # prompt.system as written (the builder's system prompt may add the schema's note)
    input_id_column: str | None  # input.id_column; None: ids derived from the row numbers
    locations: Locations
    limits: Limits
    retry: Retry
    budget: BudgetLimits | None
    output: OutputSettings
    batch_api: BatchApiSettings
    provider: Provider  # the rules of the provider the job names
    body_params: dict[str, Any]  # model.params with extra_body merged in: the request body's fields besides messages
    max_tokens: int | None  # as sent, from params or extra_body (extra_body wins, as in the body)
    pricer: Pricer | None  # the job's pricing, or the built-in table's; None: unknown
    base_url: str
    api_key_env: str | None
    builder: PromptBuilder
    json_output: JsonOutput | None  # with parse_json: how replies are checked (and, with a schema, asked for)
    shards: int | None  # the job file's `shards: N`: the job runs as this many shards
    # The shard these settings are for (its rows, its checkpoint folder in locations, its share of limits and budget:
    # JobSpec.for_shard); None: the whole job.
    shard: Shard | None

    @property
    def schema(self) -> dict[str, Any] | None:
        """output.json_schema as read (None without one): it types the reply columns."""
        return self.json_output.schema if self.json_output else None


@dataclass(frozen=True)
class Plan(Settings):
    """Settings, checked against the file system and the environment: what `run` and `validate` need."""

    api_key: str
    proxy: str | None  # the proxy every request to base_url goes through, online and Batch API (batch/proxy.py)
    # What shapes the requests (checkpoint.guard.fingerprint): the run stores or compares it; the Batch API's job tag.
    fingerprint: dict[str, Any]
    table: InputTable  # opened and scanned: columns present, ids unique and non-empty
    rows: int
    # A run of the whole job whose N shards answered every row, all finished, and whose output is merged from them as
    # they are now (preflight.check_layout): N, and the run sends nothing. None otherwise.
    merged_shards: int | None = None
