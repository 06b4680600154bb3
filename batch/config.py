"""The job file: YAML in, a validated `JobSpec` out, or a one-line `ConfigError` naming the key and its line.

Values are strict: a YAML `true` is not a concurrency of 1, and a quoted "3" is not a number (a whole
number is still a fine float). A key written twice is an error, not "the last one wins".
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal, cast, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from batch.errors import ConfigError, read_reason
from batch.providers import DEFAULT_PROVIDER, PROVIDERS, Provider, SchemaVia
from batch.shard import MOST_SHARDS, Shard
from batch.storage.locations import Location, is_url, location
from batch.wording import counted

INPUT_FORMATS = (".csv", ".parquet", ".jsonl")
# The largest answer body read. A long answer of a thinking model (reasoning and content, each ~128k
# tokens at most, CJK escaped as \uXXXX) stays under 2 MB; a server sending more is broken, and reading
# it whole cost 2.5 GB of RSS at concurrency 2 (100 MB bodies).
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024
# A streamed answer's limits unless the job sets them. The longest silence between chunks (and before the
# first) is what tells a stalled stream; the hard cap on the whole answer is only a safety net, far above
# the non-streamed 120 s, so a thinking model that streams for minutes is not cut.
DEFAULT_IDLE_TIMEOUT_S = 60.0
DEFAULT_STREAM_TIMEOUT_S = 1800.0


# Values are YAML 1.1's (keys are the text written: _JobLoader): a name written as yes, on or 2024 is not text.
YAML_QUOTE_HINT = "quote it: YAML reads an unquoted yes, no, on, off, true, false, null or number as such"


class Strict(BaseModel):
    # A typo in a key must never be silently ignored, nor a value of the wrong type coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


_ENVIRONMENT_REFERENCE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _from_environment(value: str) -> str:
    """`${NAME}` and `${NAME:-default}` replaced as a shell does, from the environment: one job file for a server
    whose address varies (`make demo SIM_PORT=18081`)."""

    def variable(reference: re.Match[str]) -> str:
        name, default = reference.group(1), reference.group(2)
        if os.environ.get(name):
            return os.environ[name]
        if default is not None:
            return default
        raise ValueError(f"names the environment variable {name}, which is not set: export {name}=..., or give "
                         f"a default, as in ${{{name}:-...}}")

    return _ENVIRONMENT_REFERENCE.sub(variable, value)


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host, like https://open.bigmodel.cn/api/paas/v4/")
    return value


REDIS_SCHEMES = ("redis", "rediss")


def _redis_url(value: str) -> str:
    """A Redis server's URL as limits.shared takes it: redis:// (rediss:// for TLS), a host, a port, a database
    number. What is wrong is said without the URL, whose password must not be shown."""
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = -1
    db = parts.path.removeprefix("/")
    if parts.scheme not in REDIS_SCHEMES or not parts.hostname or port == -1 or (db and not db.isdigit()) \
            or parts.query or parts.fragment:
        raise ValueError("must be a Redis URL: redis://HOST:PORT/DB, with :PASSWORD@ before the host if the "
                         "server asks for one (rediss:// for TLS)")
    return value


# A URL's password (scheme://user:PASSWORD@host), masked wherever a job file's value is quoted back.
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+(?=@)", re.IGNORECASE)


def mask_url_password(text: str) -> str:
    return _URL_PASSWORD.sub(r"\1***", text)


def _path_text(value: Any) -> Any:
    if not isinstance(value, str | os.PathLike):
        raise ValueError("must be a file path, written as text")
    return value


def _each_once(names: list[str] | None) -> list[str] | None:
    """A list of keys, each named once: a key named twice would be two columns of one name."""
    seen: set[str] = set()
    for name in names or []:
        if name in seen:
            raise ValueError(f"names the key {name!r} twice: name each key once")
        seen.add(name)
    return names


def _schema_or_path(value: Any) -> Any:
    """A JSON Schema is a mapping, or the text of a .json file's path: a clear line for anything else (true, a list,
    a number), rather than one error per member of the union."""
    if value is not None and not isinstance(value, dict | str | os.PathLike):
        raise ValueError("must be a JSON Schema written as a mapping (type: object, properties: ...) or the path of "
                         f"a .json file, not a {_yaml_type(value)}")
    if isinstance(value, str) and is_mapping_text(value):
        raise ValueError("is a schema written as text in a string, and a string here is a .json file's path: write "
                         "the schema as a mapping (unquoted, indented under json_schema), or save it to a .json file")
    return value


def is_mapping_text(text: str) -> bool:
    """Whether `text` reads as a JSON or YAML mapping (`{"type": "object"}`, `type: object`): no file's path does."""
    try:
        return isinstance(yaml.load(text, _JobLoader), dict)  # JSON is YAML, bar tabs and other rare corners
    except yaml.YAMLError:
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False


def _yaml_type(value: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", list: "list"}.get(type(value), type(value).__name__)


def _text_keys(value: Any, where: str) -> None:
    """Every mapping key in `value` is text: JSON's keys are, so a YAML `2024:` or `on:` is read as the text written
    (_JobLoader), and a Python job (batch.api) must write them so too."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: the key {key!r} is a {_yaml_type(key)}; JSON keys are text: write '{key}'")
            _text_keys(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _text_keys(item, f"{where}.{index}")


Name = Annotated[str, AfterValidator(_not_blank)]
FilePath = Annotated[Path, BeforeValidator(_path_text), Field(strict=False)]  # written as text in YAML


def _place(value: Any) -> Location:
    return location(_path_text(value))


# A local path, or a URL (s3://bucket/key, gs://, az://, oss://, file:///path; batch.storage.locations): input.path and
# output.path.
Place = Annotated[Any, PlainValidator(_place), PlainSerializer(str, return_type=str, when_used="json")]
# A positive whole number: -16, 0, 2.5 or "16" would be sent to the API as they are. null means unset.
MaxTokens = Annotated[int, Field(strict=True, gt=0)] | None


class ExtraBody(TypedDict, total=False):
    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    max_tokens: MaxTokens


class Params(TypedDict, total=False):
    """The request body's extra fields: any key goes, but the ones batch relies on are checked."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    max_tokens: MaxTokens
    extra_body: ExtraBody | None


class InputSpec(Strict):
    path: Place = Field(description=(
        "The input table: .csv (UTF-8 with a header row, every column read as text), .parquet or .jsonl (one JSON "
        "object per line); a local path (relative to the job file) or a URL (s3://, file://, or any scheme whose "
        "fsspec package is installed). It is streamed, never loaded whole."))
    id_column: Name | None = Field(None, description=(
        "A column holding a unique, non-empty id per row: the key a rerun resumes by (blanks around it trimmed). "
        "Empty or duplicate ids are refused before any request. Without one, each row's id (row_id) is derived from "
        "its prompt."))


class PromptSpec(Strict):
    system: str | None = Field(None, description="A system message put before every row's messages.")
    template: Name | None = Field(None, description=(
        "The user message, its {column} placeholders filled from the row ({{ and }} are literal braces). A row with "
        "an empty value in a placeholder's column fails as bad_prompt, without a request. Set this or "
        "messages_column."))
    messages_column: Name | None = Field(None, description=(
        "Instead of template: a column holding each row's whole message list, a JSON list of "
        "{\"role\": ..., \"content\": ...} objects (a JSON string, or in Parquet and JSONL a real list). A row whose "
        "value is empty or not such a list fails as bad_prompt, without a request."))

    @model_validator(mode="after")
    def _one_source(self) -> PromptSpec:
        if (self.template is None) == (self.messages_column is None):
            raise ValueError("set exactly one of 'template' or 'messages_column'")
        return self


def _known_provider(value: Any) -> str:
    """A provider's name (batch.providers.PROVIDERS), read when the job is: the registry is the one list."""
    if isinstance(value, str) and value in PROVIDERS:
        return value
    names = [repr(name) for name in PROVIDERS]
    expected = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})


ProviderName = Annotated[str, PlainValidator(_known_provider)]


class ModelSpec(Strict):
    provider: ProviderName = Field(DEFAULT_PROVIDER, description=(
        "Whose rules apply (batch.providers.PROVIDERS): the default base_url and key variable, how a JSON Schema is "
        "asked for, the Batch API's dialect and file limits, the ranges of params."))
    name: Name = Field(description="The model name sent to the API, e.g. glm-4-flash; it also picks the price.")
    base_url: Annotated[str, AfterValidator(_from_environment), AfterValidator(_http_url)] | None = Field(
        None, description=(
            "The API's base URL, ending before /chat/completions (default: the provider's). ${NAME} in it is the "
            "environment variable NAME, ${NAME:-default} the default when NAME is unset or empty; an unset variable "
            "without a default is refused."))
    api_key_env: Name | None = Field(None, description=(
        "The environment variable holding the API key (default: the provider's). Setting it makes the key "
        "required, even for the local provider."))
    # read the answer as server-sent events: ttft_s recorded, limits.idle_timeout_s applies
    stream: bool = Field(False, description=(
        "Ask for the answer as a stream of server-sent events and put it together as it comes: the same answer, "
        "usage and cost, plus ttft_s (the time to its first token). limits.idle_timeout_s applies, and "
        "limits.timeout_s defaults to 1800. Set here, not in params."))
    params: Params = Field(default_factory=lambda: Params(), description=(
        "Extra fields of the request body, sent as they are (temperature, max_tokens, top_p, stop, "
        "response_format, ...); the keys of an extra_body mapping inside it are merged into the body too. "
        "max_tokens, here or in extra_body, must be a whole number above 0. The provider's ranges apply (zhipu: "
        "temperature 0 to 1, top_p 0.01 to 1)."))

    @model_validator(mode="after")
    def _keys_are_text(self) -> ModelSpec:
        _text_keys(dict(self.params), "params")  # the request body's: JSON's keys are text
        return self

    @model_validator(mode="after")
    def _stream_by_its_key(self) -> ModelSpec:
        # A stream must be read as one: sent through params, its events would be taken for a malformed answer.
        for where, params in (("params", self.params), ("params.extra_body", self.params.get("extra_body") or {})):
            if "stream" in params:
                raise ValueError(f"{where}.stream: set model.stream: true (or false) instead, so the answer is "
                                 "read as the stream it is")
        return self

    @property
    def provider_rules(self) -> Provider:
        """The rules of the provider the job names (batch.providers)."""
        return PROVIDERS[self.provider]

    @model_validator(mode="after")
    def _provider_ranges(self) -> ModelSpec:
        provider = self.provider_rules
        for name, (low, high) in provider.param_ranges.items():
            value = self.params.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not low <= value <= high:
                hint = " (for greedy decoding set do_sample: false instead)" if name == "temperature" else ""
                raise ValueError(f"params.{name} {value} is outside {provider.label}'s range [{low}, {high}]{hint}")
        return self


class PricingSpec(Strict):
    """CNY per million tokens; overrides the built-in table for this job's model."""

    input: float = Field(ge=0, description="The price of a million prompt tokens, in CNY.")
    output: float = Field(ge=0, description="The price of a million completion tokens, in CNY.")
    cached_input: float | None = Field(None, ge=0, description=(
        "The price of a million prompt tokens served from the provider's context cache, in CNY (default: as "
        "input)."))


class BudgetSpec(Strict):
    max_cost: float | None = Field(None, gt=0, description=(
        "The most the whole job (all its runs together) may cost, in CNY. Each request's worst case (its prompt at "
        "one token per byte, an answer of max_tokens) is held before it is sent, so the budget is never crossed; "
        "when a request does not fit even with nothing in flight, the run stops with exit 5. Needs max_tokens and "
        "a known price."))
    max_total_tokens: int | None = Field(None, gt=0, description=(
        "The same, counted in tokens (prompt + completion of every answer). Needs max_tokens."))


class CacheSpec(Strict):
    path: FilePath = Field(description=(
        "An SQLite file of answers keyed by request (endpoint, model, params, messages), shared between jobs: a "
        "request asked before is answered from it, free, and its row marked cache_hit. Relative to the job file."))


class LimitsSpec(Strict):
    concurrency: int = Field(8, ge=1, le=4096, description=(
        "The most requests in flight at once: a ceiling, under which batch finds the server's own limit from its "
        "429 answers (batch/online/limits.py)."))
    requests_per_minute: float | None = Field(None, gt=0, description=(
        "A cap on requests per minute, spread evenly over the minute."))
    tokens_per_minute: float | None = Field(None, gt=0, description=(
        "A cap on tokens per minute, each request counted as its estimated prompt tokens plus max_tokens."))
    # the hard cap on a whole answer (streamed: DEFAULT_STREAM_TIMEOUT_S)
    timeout_s: float = Field(120, gt=0, description=(
        "The most one request may take, from sending it to the end of its answer, in seconds; a timeout is "
        f"retried. With model.stream the default is {DEFAULT_STREAM_TIMEOUT_S:g}."))
    # streamed only: the longest silence between chunks
    idle_timeout_s: float | None = Field(None, gt=0, description=(
        "With model.stream only (refused without it): the longest silence before the answer begins and between "
        f"its chunks, in seconds; a stream silent longer is a timeout, retried. Default {DEFAULT_IDLE_TIMEOUT_S:g} "
        "(at most timeout_s); never above timeout_s."))
    max_response_bytes: int = Field(DEFAULT_MAX_RESPONSE_BYTES, ge=1024, description=(
        "The largest answer body read (8 MiB by default); a longer answer is a bad_response, retried."))
    # redis://[:PASSWORD@]HOST[:PORT][/DB]: every process of the account shares these limits there (batch/shared/).
    shared: Annotated[str, AfterValidator(_from_environment), AfterValidator(_redis_url)] | None = Field(
        None, description=(
            "A Redis server's URL, redis://[:PASSWORD@]HOST[:PORT][/DB] (rediss:// for TLS; ${NAME} is read from "
            "the environment): every "
            "process using the same endpoint, key and model (a job's shards, several jobs on one key) keeps to "
            "these limits, and a job's shards to its budget, together through that Redis server."))
    # How long a process killed without a word keeps its in-flight slots in limits.shared: renewed every third of it.
    shared_lease_s: float = Field(30, ge=0.3, le=3600, description=(
        "With limits.shared only: how long a request's slot is held for a process that stops renewing it (renewed "
        "every third of it), in seconds: a process killed without a word gives its slots back within this."))

    @model_validator(mode="after")
    def _lease_needs_shared(self) -> LimitsSpec:
        if "shared_lease_s" in self.model_fields_set and self.shared is None \
                and self.shared_lease_s != type(self).model_fields["shared_lease_s"].default:
            raise ValueError("shared_lease_s is the lease of a slot in limits.shared: set shared too")
        return self


class RetrySpec(Strict):
    max_attempts: int = Field(6, ge=1, le=100, description="Attempts per row, the first one included.")
    initial_backoff_s: float = Field(1, ge=0, description=(
        "The first wait before a retry, in seconds (at most max_backoff_s); the wait grows exponentially, with "
        "jitter. A server's Retry-After replaces it for its request (capped at 600 s)."))
    max_backoff_s: float = Field(60, ge=0, description="The longest wait between two attempts of a row, in seconds.")
    # how long the endpoint may answer nothing before the run stops (exit 3)
    max_outage_s: float = Field(300, gt=0, description=(
        "How long the endpoint may answer nothing before the run stops (exit 3, the rows not answered still "
        "pending), in seconds. Meanwhile batch sends one probe request at a time."))


class OutputSpec(Strict):
    path: Place = Field(description=(
        "The final Parquet file (named .parquet; batch export writes CSV or JSONL from it), a local path (relative "
        "to the job file) or an s3://, gs://, az:// or oss:// URL. The checkpoint folder goes beside it, named after "
        "it (.checkpoint)."))
    keep_columns: list[str] = Field(default_factory=list, description=(
        "Input columns copied into the output, after the id column."))
    parse_json: bool = Field(False, description=(
        "The reply is a JSON object: its top-level keys become columns. A reply that does not parse is asked again, "
        "up to json_attempts requests; then the row fails as bad_json."))
    json_columns: Annotated[list[str] | None, AfterValidator(_each_once)] = Field(None, description=(
        "With parse_json: only these keys become columns, each named once (default: every key seen)."))
    # A JSON Schema the reply must match (a mapping, or a .json file relative to the job file): implies parse_json.
    json_schema: Annotated[dict[str, Any] | FilePath | None, BeforeValidator(_schema_or_path)] = Field(
        None, description=(
            "A JSON Schema the reply must match: a mapping written here, or the path of a .json file (relative to "
            "the job file). It implies parse_json, types the columns, and is checked before anything is sent; a "
            "reply that does not match is asked again like one that does not parse."))
    # How the schema is asked for; default: the provider's (batch.providers.Provider.schema_via).
    schema_via: SchemaVia | None = Field(None, description=(
        "How json_schema is asked for (default: the provider's): prompt (response_format json_object and the schema "
        "in the system prompt) or response_format (a json_schema response_format, strict)."))
    # Requests per row for a reply that parses and matches: a bad one is asked again at once, up to this many in all.
    json_attempts: int = Field(3, ge=1, le=20, description=(
        "With parse_json or json_schema: requests per row for a reply that parses (and matches), the first one "
        "included; each is held against the budget like a new request."))
    checkpoint_rows: int = Field(1000, ge=1, description=(
        "Compact the write-ahead log into a Parquet part of the checkpoint after this many results, ..."))
    checkpoint_seconds: float = Field(10, gt=0, description=(
        "... or after this many seconds, whichever comes first."))
    checkpoint_lease_s: float = Field(30, ge=1, le=3600, description=(
        "With the checkpoint on a URL (object storage): how long the checkpoint's lease (`_LEASE`) lasts unless its "
        "run renews it, in seconds; the run renews it every third of this. A run that stops renewing (killed, or "
        "cut off from the store) loses the checkpoint to the next run after this long, with the next epoch; a "
        "shorter lease lets a restart take over sooner, and costs a store request every third of it. The hosts' "
        "clocks must agree to well within it."))
    # With the output on a URL, the local folder of what cannot live in an object store (the write-ahead log, the
    # run lock, the log, files being built); by default one in the system's temp folder named after the output.
    local_dir: FilePath | None = Field(None, description=(
        "With output.path on a URL only: the local folder of what an object store cannot hold (the write-ahead "
        "log, the run lock, batch.log, files being built); relative to the job file. Default: a folder in the "
        "system's temp folder named after the output."))

    @model_validator(mode="after")
    def _keys_are_text(self) -> OutputSpec:
        if isinstance(self.json_schema, dict):  # its property names are columns and JSON keys: text
            _text_keys(self.json_schema, "json_schema")
        return self

    @model_validator(mode="after")
    def _schema_implies_parse_json(self) -> OutputSpec:
        if self.json_schema is not None:
            if "parse_json" in self.model_fields_set and not self.parse_json:
                raise ValueError("json_schema needs the reply parsed as JSON: remove parse_json: false")
            self.parse_json = True
        elif self.schema_via is not None:
            raise ValueError("schema_via says how output.json_schema is sent: set json_schema too")
        # Its default, written out (a JobSpec dumped and validated again), is no mistake.
        if self.json_attempts != type(self).model_fields["json_attempts"].default and not self.parse_json:
            raise ValueError("json_attempts is for replies parsed as JSON: set parse_json: true or a json_schema")
        if self.json_columns is not None and not self.parse_json:  # else ignored: no reply is parsed for its keys
            raise ValueError("json_columns picks keys of replies parsed as JSON: set parse_json: true or a json_schema")
        return self


# A Batch API input file's size unless the job sets it: the provider's limits (Provider.batch_max_requests and
# batch_max_bytes), or these where they are larger (100 MB: a file that fits Zhipu's fits OpenAI's).
BATCH_REQUESTS = 50_000
BATCH_BYTES = 100_000_000


class BatchApiSpec(Strict):
    """`mode: batch_api`: the rows go to the provider's Batch API in files of at most these sizes (each at most
    the provider's limit: check_job refuses a larger one, and the preflight lowers a default above it)."""

    max_requests_per_file: int = Field(BATCH_REQUESTS, ge=1, description=(
        "Rows per Batch API input file, at most the provider's limit (default: this, or the provider's limit where "
        "lower)."))
    max_bytes_per_file: int = Field(BATCH_BYTES, ge=4096, description=(
        "Bytes per Batch API input file, at most the provider's limit (default: this, or the provider's limit where "
        "lower). A row whose request alone is larger fails as bad_request."))
    # Polls start at a second and double up to this; a run without --wait polls each batch once.
    poll_interval_s: float = Field(60, gt=0, description=(
        "With --wait: the longest wait between two polls of the job's batches, in seconds (the first comes after "
        "1 s, then the wait doubles up to this); a run without --wait polls each batch once."))


class JobSpec(Strict):
    """A job file, validated: every key typed and ranged, each error naming its key and line (load_job)."""

    name: Name = Field(description="The job's name, shown in the log and the summary.")
    input: InputSpec = Field(description="The table whose rows are sent.")
    prompt: PromptSpec = Field(description="How each row becomes the messages of its request.")
    model: ModelSpec = Field(description="Where the requests go and what they ask for.")
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="How fast requests are sent, and how long "
                                                                       "an answer may take.")
    retry: RetrySpec = Field(default_factory=RetrySpec, description="How a failed request is retried.")
    output: OutputSpec = Field(description="Where the answers go, and how a reply becomes columns.")
    pricing: PricingSpec | None = Field(None, description=(
        "This job's model's price, for a model the built-in table (batch/pricing.py) does not know or whose price "
        "changed: it replaces the table's."))
    budget: BudgetSpec | None = Field(None, description="The most the whole job may spend.")
    cache: CacheSpec | None = Field(None, description=(
        "An answer cache shared between jobs (default: each checkpoint has its own)."))
    mode: Literal["online", "batch_api"] = Field("online", description=(
        "How the rows are sent: online, one request per row, as fast as the limits allow; or batch_api, to the "
        "provider's Batch API in files (half price, answers within 24 h). run --mode overrides it for one run."))
    batch_api: BatchApiSpec = Field(default_factory=BatchApiSpec, description="The Batch API's files and polls.")
    # The job runs as this many shards (batch/shard.py), each its own process: `batch merge` joins their records.
    shards: int | None = Field(None, ge=1, le=MOST_SHARDS, description=(
        "Run the job as this many shards, each a process of its own (its shard: --shard K/N, or the index "
        "JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID gives it); batch merge joins their records."))

    # Set by load_job, not by the file.
    job_path: Path = Field(default=Path("."), exclude=True)
    _lines: dict[tuple[str, ...], int] = PrivateAttr(default_factory=dict)
    # What a relative path is relative to, as errors say it: the job file's folder (load_job joins them to it), or,
    # for a job given as Python values (a JobSpec, a mapping, run_frame), the working directory.
    _paths_relative_to: str = PrivateAttr(default="the working directory")
    # Set by for_shard: this spec is one shard's part of the job.
    _shard: Shard | None = PrivateAttr(default=None)

    @property
    def job_checkpoint_dir(self) -> Location:
        """The job's checkpoint folder, beside the output (a URL with it): its shards' folders sit inside it."""
        out = self.output.path
        return out.with_name(out.stem + ".checkpoint")

    @property
    def checkpoint_dir(self) -> Location:
        """Where this spec's checkpoint objects are (parts, ledger, fingerprint): the job's, beside the output (a URL
        with it), or a shard's inside it (CHECKPOINT/shard=K-of-N)."""
        return self.job_checkpoint_dir / self._shard.folder if self._shard else self.job_checkpoint_dir

    @property
    def shard(self) -> Shard | None:
        return self._shard

    def for_shard(self, shard: Shard) -> JobSpec:
        """Shard `shard`'s part of this job: its rows (the reader selects them), its own checkpoint folder, and a
        static share of the job's limits, so the shards together never go past them: concurrency / N in flight (at
        least 1), requests and tokens per minute / N, budget / N (a share that leaves a shard nothing is refused).
        With limits.shared, every shard takes from the job's whole limits and budget in Redis instead: nothing split."""
        part = self.model_copy(deep=True)
        part._shard = shard
        n = shard.count
        if part.limits.shared is not None:
            return part
        limits = part.limits
        limits.concurrency = max(1, limits.concurrency // n)
        if limits.requests_per_minute is not None:
            limits.requests_per_minute /= n
        if limits.tokens_per_minute is not None:
            limits.tokens_per_minute /= n
        if part.budget is not None:
            if part.budget.max_cost is not None:
                part.budget.max_cost /= n
            if part.budget.max_total_tokens is not None:
                if part.budget.max_total_tokens < n:
                    raise ConfigError(f"{self.where('budget.max_total_tokens')}: budget.max_total_tokens "
                                      f"{part.budget.max_total_tokens} split over {counted(n, 'shard')} leaves some "
                                      "shard no token at all: raise it or run fewer shards")
                part.budget.max_total_tokens //= n
        return part

    @property
    def local_dir(self) -> Path:
        """The local folder of what needs a local disk (the write-ahead log, the run lock, the log, spooled files, the
        default answer cache): the checkpoint folder itself, or, with the checkpoint on a URL, output.local_dir."""
        return self._local_dir(self._shard)

    @property
    def job_local_dir(self) -> Path:
        """The local folder of a run of the whole job (not a shard's), whichever part of it this spec is for: where
        an unsharded run's write-ahead log is."""
        return self._local_dir(None)

    def _local_dir(self, shard: Shard | None) -> Path:
        """The whole job's local folder, or `shard`'s inside it (LOCAL/shard=K-of-N), as its objects are in the job's
        checkpoint: what names the folder (its run lock's error, its batch.log) names the shard."""
        folder = self.job_checkpoint_dir
        if not is_url(folder):
            job_folder = cast(Path, folder)
        elif self.output.local_dir is not None:
            job_folder = self.output.local_dir
        else:
            named = hashlib.sha256(str(folder).encode("utf-8")).hexdigest()[:16]
            job_folder = Path(tempfile.gettempdir()) / f"batch-{self.output.path.stem}-{named}"
        return job_folder / shard.folder if shard else job_folder

    @property
    def cache_path(self) -> Path:
        """The answer cache's file: cache.path, shared by jobs, or the checkpoint's own (a local SQLite file)."""
        return self.cache.path if self.cache else self.local_dir / "answers.sqlite"

    @property
    def id_column_out(self) -> str:
        return self.input.id_column or "row_id"

    @property
    def paths_relative_to(self) -> str:
        """What a relative path in this job is relative to, in words: "the job file" or "the working directory"."""
        return self._paths_relative_to

    def where(self, key: str | tuple[str, ...]) -> str:
        """The job file and the line of `key` (dotted, or as its parts when a part may hold a dot), or of its nearest
        parent written in the file."""
        line = _line_of(self._lines, tuple(key.split(".")) if isinstance(key, str) else key)
        return f"{self.job_path} line {line}" if line is not None else str(self.job_path)


def dump_job(values: dict[str, Any]) -> str:
    """A job file's YAML text that loads back as `values`. Readable (non-ASCII text as it is), except where PyYAML's
    readable form does not load back the same: it writes U+0085 (NEL) inside a single-quoted scalar, which
    YAML reads as a line break, so a schema key or template holding one would come back changed; then every
    non-ASCII character is written as an escape."""
    text = yaml.safe_dump(values, allow_unicode=True, sort_keys=False)
    if yaml.safe_load(text) != values:
        text = yaml.safe_dump(values, allow_unicode=False, sort_keys=False)
    return text


def load_job(path: str | Path) -> JobSpec:
    """Read, parse and validate a job file; relative paths become relative to the file."""
    job_path = Path(path)
    try:
        text = job_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{job_path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{job_path}: cannot read job file: {read_reason(exc)}") from None
    raw, lines = _parse_yaml(job_path, text)
    if not isinstance(raw, dict):
        raise ConfigError(f"{job_path}: a job file must be a YAML mapping of keys, got {type(raw).__name__}")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, job_path, lines)) from None
    base = job_path.parent
    spec.input.path = _relative_to(base, spec.input.path)
    spec.output.path = _relative_to(base, spec.output.path)
    if spec.output.local_dir is not None:
        spec.output.local_dir = _relative_to(base, spec.output.local_dir)
    if spec.cache is not None:
        spec.cache.path = _relative_to(base, spec.cache.path)
    if isinstance(spec.output.json_schema, Path):
        spec.output.json_schema = _relative_to(base, spec.output.json_schema)
    spec.job_path = job_path
    spec._lines = lines
    spec._paths_relative_to = "the job file"
    check_job(spec)
    return spec


def check_job(spec: JobSpec) -> None:
    """The checks that span keys, which a JobSpec built in Python needs as much as a job file."""
    if spec.input.path.suffix.lower() not in INPUT_FORMATS:
        raise ConfigError(
            f"{spec.where('input.path')}: input.path: unsupported file type '{spec.input.path.suffix}' "
            f"(use one of {', '.join(INPUT_FORMATS)})"
        )
    if spec.retry.initial_backoff_s > spec.retry.max_backoff_s:
        raise ConfigError(f"{spec.where('retry.initial_backoff_s')}: retry.initial_backoff_s: "
                          f"{spec.retry.initial_backoff_s:g} is above retry.max_backoff_s {spec.retry.max_backoff_s:g}")
    _check_batch_file_limits(spec)
    _check_stream_limits(spec)


def _check_batch_file_limits(spec: JobSpec) -> None:
    """A Batch API file at most as large as the provider takes: a size the job sets above the provider's limit is
    refused (one it leaves out is resolved by the preflight: the default or, where that is larger, the limit)."""
    provider = spec.model.provider_rules
    for key, most, unit in (("max_requests_per_file", provider.batch_max_requests, "requests"),
                            ("max_bytes_per_file", provider.batch_max_bytes, "bytes")):
        value = getattr(spec.batch_api, key)
        if key in spec.batch_api.model_fields_set and value > most:
            raise ConfigError(f"{spec.where(f'batch_api.{key}')}: batch_api.{key}: {value} is above the "
                              f"{provider.name} Batch API's limit of {most} {unit} per file")


def answer_timeouts(spec: JobSpec) -> tuple[float, float | None]:
    """The cap on a whole answer and the longest silence in a streamed one (None: not streamed), as a run keeps to
    them: what the job sets, else a streamed answer's defaults (DEFAULT_STREAM_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S).
    Computed, never written into the job: a default filled in would read as set (a later change of model.stream
    would then be refused, and a second check would see other values than the first)."""
    limits = spec.limits
    if not spec.model.stream:
        return limits.timeout_s, None
    timeout = limits.timeout_s if "timeout_s" in limits.model_fields_set else DEFAULT_STREAM_TIMEOUT_S
    idle = limits.idle_timeout_s if limits.idle_timeout_s is not None else min(DEFAULT_IDLE_TIMEOUT_S, timeout)
    return timeout, idle


def _check_stream_limits(spec: JobSpec) -> None:
    """Refuse an idle timeout that could never apply: without a stream, or above the cap on the whole answer."""
    limits = spec.limits
    if not spec.model.stream:
        if limits.idle_timeout_s is not None:
            raise ConfigError(f"{spec.where('limits.idle_timeout_s')}: limits.idle_timeout_s applies to streamed "
                              "answers only: set model.stream: true, or use limits.timeout_s")
        return
    timeout, idle = answer_timeouts(spec)
    if idle is not None and idle > timeout:
        raise ConfigError(f"{spec.where('limits.idle_timeout_s')}: limits.idle_timeout_s {idle:g} "
                          f"is above limits.timeout_s {timeout:g}, the cap on the whole answer: it could "
                          "never apply")


class _JobLoader(yaml.SafeLoader):
    """YAML's safe loader, with every mapping key the text written: a job file's keys are names (of settings,
    request fields, a schema's properties), and JSON's keys are text. Plain YAML 1.1 reads `on:`, `yes:`, `null:`,
    `2024:` and `1.5:` as a boolean, null or a number, which would reach the request as "true", "null" or "2024"
    and the columns as something else again; and `1.5:` and `1.50:` would be one key, the last silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # merge keys (`<<: *defaults`) first: theirs are keys as well
        node.value = [(_as_text(key), value) for key, value in node.value]
        return super().construct_mapping(node, deep=deep)


def _as_text(key: yaml.Node) -> yaml.Node:
    if not isinstance(key, yaml.ScalarNode):
        return key  # a list or mapping as a key: refused by the constructor, naming its line
    return yaml.ScalarNode("tag:yaml.org,2002:str", key.value, key.start_mark, key.end_mark, key.style)


def _parse_yaml(job_path: Path, text: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """The document, and the line of every key in it (by key path); a key written twice is refused."""
    loader = _JobLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[tuple[str, ...], int] = {}
        if node is not None:
            _key_lines(job_path, node, (), lines, set())
        return (loader.construct_document(node) if node is not None else None), lines
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{job_path}:{where} invalid YAML: {problem}") from None
    finally:
        loader.dispose()


def _key_lines(job_path: Path, node: yaml.Node, path: tuple[str, ...], lines: dict[tuple[str, ...], int],
               seen: set[int]) -> None:
    if id(node) in seen:  # an alias back into its own anchor: the structure is recursive
        return
    seen = seen | {id(node)}
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, str(index))] = item.start_mark.line + 1
            _key_lines(job_path, item, (*path, str(index)), lines, seen)
    if not isinstance(node, yaml.MappingNode):
        return
    for key, value in node.value:
        # A merged mapping (`<<: *defaults`) may repeat keys written here: those win, so they are no duplicates.
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        where = (*path, key.value)
        line = key.start_mark.line + 1
        if where in lines:
            raise ConfigError(f"{job_path} line {line}: {'.'.join(where)}: duplicate key "
                              f"(first written at line {lines[where]}); write each key once")
        lines[where] = line
        _key_lines(job_path, value, where, lines, seen)


def _line_of(lines: dict[tuple[str, ...], int], key: tuple[str, ...]) -> int | None:
    """The line of `key`, or of its nearest parent written in the file (a missing key has none of its own)."""
    for end in range(len(key), 0, -1):
        if key[:end] in lines:
            return lines[key[:end]]
    return None


def _relative_to(base: Path, path: Location) -> Location:
    if is_url(path):
        return path
    path = path.expanduser()
    return path if path.is_absolute() else Path(os.path.normpath(base / path))


def describe_validation_error(exc: ValidationError, job_path: Path, lines: dict[tuple[str, ...], int]) -> str:
    """Pydantic's report, as one line that names each key at fault and its line in the job file."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            text = f"unknown key '{loc}'{_did_you_mean(err['loc'])}"
        elif err["type"] == "missing":
            text = f"missing key '{loc}'"
        else:
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) else mask_url_password(f" (got {got!r})")
            where = f"{loc}: " if loc else ""
            message = err["msg"].removeprefix("Value error, ")
            text = f"{where}{message}{shown}"
            if err["type"] == "string_type" and (got is None or isinstance(got, bool | int | float)):
                text += f"; {YAML_QUOTE_HINT}"
        parts.append((_line_of(lines, tuple(str(p) for p in err["loc"])), text))
    head = f"{job_path} line {parts[0][0]}" if parts[0][0] else str(job_path)
    texts = [parts[0][1], *(f"line {line}: {text}" if line else text for line, text in parts[1:])]
    return f"{head}: " + "; ".join(texts)


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        # An optional section (budget, pricing, cache) is `Spec | None`.
        found = [t for t in (annotation, *get_args(annotation)) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not found:
            return ""
        model = found[0]
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f", did you mean '{close[0]}'?" if close else ""
