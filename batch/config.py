"""The job file: YAML in, a validated `JobSpec` out, or a one-line `ConfigError`."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from batch.errors import ConfigError

INPUT_FORMATS = (".csv", ".parquet", ".jsonl")
# The largest answer body read. A long answer of a thinking model (reasoning and content, each ~128k
# tokens at most, CJK escaped as \uXXXX) stays under 2 MB; a server sending more is broken, and reading
# it whole cost 2.5 GB of RSS at concurrency 2 (100 MB bodies).
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024


class Provider(BaseModel):
    base_url: str
    api_key_env: str | None
    key_required: bool


PROVIDERS: dict[str, Provider] = {
    "zhipu": Provider(base_url="https://open.bigmodel.cn/api/paas/v4/", api_key_env="ZHIPU_API_KEY", key_required=True),
    "openai": Provider(base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY", key_required=True),
    # Self-hosted servers (llama.cpp, vLLM) usually accept any key or none.
    "local": Provider(base_url="http://127.0.0.1:8080/v1", api_key_env="LOCAL_API_KEY", key_required=False),
}


class Strict(BaseModel):
    # A typo in a key must never be silently ignored.
    model_config = ConfigDict(extra="forbid")


class InputSpec(Strict):
    path: Path
    id_column: str | None = None


class PromptSpec(Strict):
    system: str | None = None
    template: str | None = None
    messages_column: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PromptSpec:
        if (self.template is None) == (self.messages_column is None):
            raise ValueError("set exactly one of 'template' or 'messages_column'")
        return self


class ModelSpec(Strict):
    provider: Literal["zhipu", "openai", "local"] = "zhipu"
    name: str
    base_url: str | None = None
    api_key_env: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _zhipu_ranges(self) -> ModelSpec:
        if self.provider != "zhipu":
            return self
        for name, (low, high) in ZHIPU_RANGES.items():
            value = self.params.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not low <= value <= high:
                hint = " (for greedy decoding set do_sample: false instead)" if name == "temperature" else ""
                raise ValueError(f"params.{name} {value} is outside Zhipu's range [{low}, {high}]{hint}")
        return self

    @property
    def resolved_base_url(self) -> str:
        return self.base_url or PROVIDERS[self.provider].base_url

    @property
    def resolved_api_key_env(self) -> str | None:
        return self.api_key_env or PROVIDERS[self.provider].api_key_env


ZHIPU_RANGES = {"temperature": (0.0, 1.0), "top_p": (0.01, 1.0)}


class PricingSpec(Strict):
    """CNY per million tokens; overrides the built-in table for this job's model."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(None, ge=0)


class BudgetSpec(Strict):
    max_cost: float | None = Field(None, gt=0)
    max_total_tokens: int | None = Field(None, gt=0)


class CacheSpec(Strict):
    path: Path  # an SQLite file of answers shared by jobs; relative to the job file


class LimitsSpec(Strict):
    concurrency: int = Field(8, ge=1, le=4096)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    timeout_s: float = Field(120, gt=0)
    max_response_bytes: int = Field(DEFAULT_MAX_RESPONSE_BYTES, ge=1024)


class RetrySpec(Strict):
    max_attempts: int = Field(6, ge=1, le=100)
    initial_backoff_s: float = Field(1, ge=0)
    max_backoff_s: float = Field(60, ge=0)


class OutputSpec(Strict):
    path: Path
    keep_columns: list[str] = Field(default_factory=list)
    parse_json: bool = False  # the reply is a JSON object: its top-level keys become columns
    json_columns: list[str] | None = None  # with parse_json: only these keys (default: every key seen)
    checkpoint_rows: int = Field(1000, ge=1)
    checkpoint_seconds: float = Field(10, gt=0)


class JobSpec(Strict):
    name: str
    input: InputSpec
    prompt: PromptSpec
    model: ModelSpec
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    output: OutputSpec
    pricing: PricingSpec | None = None
    budget: BudgetSpec | None = None
    cache: CacheSpec | None = None

    # Set by load_job, not by the file.
    job_path: Path = Field(default=Path("."), exclude=True)

    @property
    def checkpoint_dir(self) -> Path:
        out = self.output.path
        return out.with_name(out.stem + ".checkpoint")

    @property
    def id_column_out(self) -> str:
        return self.input.id_column or "row_id"


def load_job(path: str | Path) -> JobSpec:
    """Read, parse and validate a job file; relative paths become relative to the file."""
    job_path = Path(path)
    try:
        text = job_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{job_path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{job_path}: cannot read job file: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{job_path}:{where} invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{job_path}: a job file must be a YAML mapping of keys, got {type(raw).__name__}")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{job_path}: {describe_validation_error(exc)}") from None
    base = job_path.parent
    spec.input.path = _relative_to(base, spec.input.path)
    spec.output.path = _relative_to(base, spec.output.path)
    if spec.cache is not None:
        spec.cache.path = _relative_to(base, spec.cache.path)
    spec.job_path = job_path
    if spec.input.path.suffix.lower() not in INPUT_FORMATS:
        raise ConfigError(
            f"{job_path}: input.path: unsupported file type '{spec.input.path.suffix}' "
            f"(use one of {', '.join(INPUT_FORMATS)})"
        )
    return spec


def _relative_to(base: Path, path: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else Path(os.path.normpath(base / path))


def describe_validation_error(exc: ValidationError) -> str:
    """Pydantic's report, as one line that names each key at fault."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'{_did_you_mean(err['loc'])}")
        elif err["type"] == "missing":
            parts.append(f"missing key '{loc}'")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            where = f"{loc}: " if loc else ""
            message = err["msg"].removeprefix("Value error, ")
            parts.append(f"{where}{message}{shown}")
    return "; ".join(parts)


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f", did you mean '{close[0]}'?" if close else ""


def resolve_api_key(spec: JobSpec) -> str:
    """The key from the environment or a .env beside the job file or in the working directory."""
    var = spec.model.resolved_api_key_env
    provider = PROVIDERS[spec.model.provider]
    key = None
    if var:
        key = os.environ.get(var)
        if not key:
            for env_file in (spec.job_path.parent / ".env", Path(".env")):
                if env_file.is_file():
                    key = dotenv_values(env_file).get(var)
                    if key:
                        break
    if key:
        return key
    if provider.key_required or spec.model.api_key_env:
        raise ConfigError(
            f"{spec.job_path}: the API key variable {var} is not set: export {var}=... or put it in a .env file"
        )
    # The SDK refuses an empty key; keyless local servers ignore whatever we send.
    return "no-key"
