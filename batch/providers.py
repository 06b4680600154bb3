"""The providers a job can name (`model.provider`): each one `Provider` value holding every rule in which providers
differ, in the one registry `PROVIDERS`. The rest of batch asks the job's provider, never which provider it is; so
adding a provider is adding one value here.

A leaf: it imports nothing of batch, so the job spec, the failures, the schema and the Batch API can all read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal
from urllib.parse import urlsplit

SchemaVia = Literal["prompt", "response_format"]


@dataclass(frozen=True)
class BusinessCodes:
    """What the business code in an error body (`{"error": {"code": "1113", ...}}`) means. A server that has them
    puts the meaning there, and its HTTP status alone misleads: Zhipu's 1113 (arrears) and 1304 (daily quota)
    arrive as 429, which a client trusting the status would retry forever."""

    rate_limited: frozenset[int]
    """Slow down: retried after a pause, also when the status says otherwise (a 200 carrying one)."""
    overloaded: frozenset[int]
    """Rate limits said to every caller (the model is overloaded), not to this one: their Retry-After pauses every
    request, where another rate limit's delays only its own (batch.online.limits.pool_pause)."""
    server_error: frozenset[int]
    """The server's fault, whatever the status: retried."""
    row: Mapping[int, str]
    """The row's own fault, by the error class its record gets: it fails at once, the other rows go on."""
    job: tuple[tuple[range, str], ...]
    """Every row would fail the same way (key, account, quota, model): the run stops, by the error class."""


# Zhipu's codes (../shared/zhipu-api-notes.md). Local servers and gateways in front of GLM answer with them too, and
# OpenAI's codes are words that never read as these numbers: every built-in provider judges by this table.
ZHIPU_CODES = BusinessCodes(
    rate_limited=frozenset({1302, 1303, 1305, 1312}),
    overloaded=frozenset({1305}),
    server_error=frozenset({1200, 1230, 1234}),
    row=MappingProxyType({1210: "bad_request", 1213: "bad_request", 1214: "bad_request", 1215: "bad_request",
                          1261: "prompt_too_long", 1301: "content_filter"}),
    job=((range(1000, 1006), "auth"), (range(1110, 1122), "account"), (range(1211, 1213), "model_not_found"),
         (range(1220, 1223), "permission"), (range(1304, 1305), "quota"), (range(1308, 1312), "quota"),
         (range(1313, 1314), "quota")),
)


@dataclass(frozen=True)
class BatchDialect:
    """How a provider's Batch API is spoken: the files and batches calls are the same, these differ."""

    endpoint: str
    """The endpoint each request line (`url`) and the batch name: Zhipu's are /v4/..., OpenAI's /v1/..."""
    auto_delete_input_file: bool
    """Ask the provider to delete the input file once its batch has read it (a field of Zhipu's create only): it
    counts against the provider's cap of files kept until then."""
    base_path_suffix: str | None = None
    """A base URL whose path ends so speaks this dialect, whatever the job's provider (a gateway in front of
    Zhipu, or the simulator, set up as provider local or openai); None: only its own provider's."""


ZHIPU_BATCHES = BatchDialect("/v4/chat/completions", auto_delete_input_file=True, base_path_suffix="/paas/v4")
OPENAI_BATCHES = BatchDialect("/v1/chat/completions", auto_delete_input_file=False)


@dataclass(frozen=True)
class Provider:
    """One provider's rules. Each field is one way providers differ."""

    name: str
    """What `model.provider` says."""
    label: str
    """How messages name it (`params.temperature 1.5 is outside Zhipu's range`)."""
    base_url: str
    """Where its chat completions and Batch API live when `model.base_url` is not set."""
    api_key_env: str
    """The environment variable (or .env line) its key is read from when `model.api_key_env` is not set."""
    key_required: bool
    """Whether a run without a key is refused before any request: hosted APIs want one, self-hosted servers
    (llama.cpp, vLLM) usually accept any key or none."""
    stream_usage_unasked: bool
    """Whether a stream ends with its usage without being asked: Zhipu sends it in the last chunk, OpenAI-style
    servers only when `stream_options.include_usage` asks (so batch asks them)."""
    schema_via: SchemaVia
    """How `output.json_schema` is asked for unless `output.schema_via` says: Zhipu documents only
    response_format json_object, and its hosts answer 200 to a json_schema format they then ignore, so the schema
    goes into the system prompt; servers that enforce a schema (OpenAI, vLLM, llama.cpp's server) take it as
    response_format."""
    strict_schema: bool
    """Whether a `strict: true` json_schema response_format must be in OpenAI's strict-mode subset of JSON Schema
    (batch.schema.openai_strict): the job's schema is sent in that form, and one written in params is checked."""
    batch_dialect: BatchDialect
    """How its Batch API's lines and batches are written (see batch_dialect_for: a base URL may choose another)."""
    batch_max_requests: int
    """Its Batch API's most request lines in one input file."""
    batch_max_bytes: int
    """Its Batch API's largest input file, in bytes."""
    codes: BusinessCodes = ZHIPU_CODES
    """The business codes its error bodies carry, and what each means."""
    param_ranges: Mapping[str, tuple[float, float]] = field(default_factory=lambda: MappingProxyType({}))
    """model.params values it refuses outside these ranges (every request would fail): checked before any."""


ZHIPU = Provider(
    name="zhipu", label="Zhipu", base_url="https://open.bigmodel.cn/api/paas/v4/", api_key_env="ZHIPU_API_KEY",
    key_required=True, stream_usage_unasked=True, schema_via="prompt", strict_schema=False,
    batch_dialect=ZHIPU_BATCHES, batch_max_requests=50_000, batch_max_bytes=100_000_000,
    param_ranges=MappingProxyType({"temperature": (0.0, 1.0), "top_p": (0.01, 1.0)}),
)
OPENAI = Provider(
    name="openai", label="OpenAI", base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY",
    key_required=True, stream_usage_unasked=False, schema_via="response_format", strict_schema=True,
    batch_dialect=OPENAI_BATCHES, batch_max_requests=50_000, batch_max_bytes=200_000_000,
)
LOCAL = Provider(
    name="local", label="the local server", base_url="http://127.0.0.1:8080/v1", api_key_env="LOCAL_API_KEY",
    key_required=False, stream_usage_unasked=False, schema_via="response_format", strict_schema=False,
    batch_dialect=OPENAI_BATCHES, batch_max_requests=50_000, batch_max_bytes=200_000_000,
)

# The providers a job may name, by name.
PROVIDERS: dict[str, Provider] = {provider.name: provider for provider in (ZHIPU, OPENAI, LOCAL)}
DEFAULT_PROVIDER = ZHIPU.name


def batch_dialect_for(provider: Provider, base_url: str) -> BatchDialect:
    """The Batch API dialect spoken at `base_url`: a known provider's, when the URL's path is its (a Zhipu gateway
    named as provider local), else the job's provider's own."""
    path = urlsplit(base_url).path.rstrip("/")
    for known in PROVIDERS.values():
        suffix = known.batch_dialect.base_path_suffix
        if suffix is not None and path.endswith(suffix):
            return known.batch_dialect
    return provider.batch_dialect
