"""The resolved job: what `preflight()` makes of a job file, typed, read by every stage after it.

`Settings` is what the job file alone determines (enough for `estimate`); `Plan` adds what was checked
against the file system and the environment (the key, the opened input). They are values: built once
by batch/preflight.py, never changed after, so the pool, the budget, the token limiter and `estimate`
cannot disagree about what a request may cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batch.config import JobSpec
from batch.input.prompts import PromptBuilder
from batch.input.reader import InputTable
from batch.pricing import Pricer
from batch.providers import Provider
from batch.replies.schema import JsonOutput

# The files a checkpoint folder holds from its first run: a folder with one is some job's checkpoint.
CHECKPOINT_MARKERS = ("fingerprint.json", "wal.jsonl")


@dataclass(frozen=True)
class Settings:
    """What the job file alone determines: enough for `estimate`, which needs no key and writes nothing."""

    spec: JobSpec
    provider: Provider  # the rules of the provider the job names
    body_params: dict[str, Any]  # model.params with extra_body merged in: the request body's fields besides messages
    max_tokens: int | None  # as sent, from params or extra_body (extra_body wins, as in the body)
    pricer: Pricer | None  # the job's pricing, or the built-in table's; None: unknown
    base_url: str
    api_key_env: str | None
    builder: PromptBuilder
    json_output: JsonOutput | None  # with parse_json: how replies are checked (and, with a schema, asked for)


@dataclass(frozen=True)
class Plan(Settings):
    """Settings, checked against the file system and the environment: what `run` and `validate` need."""

    api_key: str
    table: InputTable  # opened and scanned: columns present, ids unique and non-empty
    rows: int
