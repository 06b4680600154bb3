"""Structured output: the job's JSON Schema, how it is asked for, each reply checked against it, and the Arrow type
of each column it gives.

The checks are python-jsonschema's: the long-standing reference validator for Python, covering every draft
from 3 to 2020-12 (the draft read from the schema's `$schema`), with errors that carry their JSON path. The schema
itself is checked against its draft's meta-schema before anything is sent, and each reply against the schema as it
arrives. A reply that fails is asked again (batch.online); the row's error is the validator's most relevant error
(`best_match`) with its JSON path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from batch.config import YAML_QUOTE_HINT, JobSpec
from batch.errors import ConfigError, read_reason
from batch.input.prompts import estimate_tokens, prompt_token_bound, system_text
from batch.replies.columns import json_error_at, parse_reply

# The two ways a schema is asked for (SchemaVia); which one a provider takes unless the job says: Provider.schema_via.
VIA_PROMPT, VIA_RESPONSE_FORMAT = "prompt", "response_format"
SCHEMA_NOTE = "Answer with one JSON object and nothing else. It must match this JSON Schema:"
SCHEMA_NAME = "output"  # response_format.json_schema.name: OpenAI wants one ([a-zA-Z0-9_-]{1,64})
log = logging.getLogger("batch")
MAX_ERROR_CHARS = 300  # a validation message quotes the value at fault, which may be the whole reply


@dataclass(frozen=True)
class JsonOutput:
    """What a parse_json job checks of each reply (and, with a schema, what it sends to ask for it)."""

    attempts: int  # requests per row for a reply that passes: output.json_attempts
    schema: dict[str, Any] | None = None  # as sent, and as the columns are typed: see openai_strict
    via: str | None = None  # VIA_PROMPT or VIA_RESPONSE_FORMAT, with a schema
    validator: Validator | None = None  # of the schema, or for OpenAI's strict mode the one it was made from
    strict: bool = True  # response_format's strict: false only for a schema OpenAI's strict mode cannot express

    def judge(self, record: dict[str, Any], max_tokens: int | None) -> None:
        """An answered row's record made a failed `bad_json` one when its reply is not the JSON asked for, with the
        reason and why the reply is what it is (cut at max_tokens, a tool called instead): online and Batch API
        answers alike. The answer is kept: it was paid for, and is there to read."""
        problem = self.problem(record["response"])
        if problem is None:
            return
        if record["finish_reason"] == "length":
            cap = f"max_tokens {max_tokens}: raise it" if max_tokens else "the server's length limit"
            problem += f" (the answer was cut at {cap})"
        elif record.get("tool_calls") is not None:
            problem += " (the model called a tool instead: its calls are in tool_calls)"
        record.update(status="failed", error_class="bad_json", error=problem)

    def problem(self, text: str | None) -> str | None:
        """Why the reply is not the JSON asked for (its first problem), or None when it is."""
        try:
            reply = parse_reply(text)
        except ValueError as exc:
            return str(exc)
        if self.validator is None:
            return None
        try:
            error = best_match(self.validator.iter_errors(reply))
        except RecursionError:  # a recursive schema ($ref) the validator follows a few frames per level
            return "the reply nests too deep to check against output.json_schema"
        if error is None:
            return None
        message = error.message
        if len(message) > MAX_ERROR_CHARS:
            message = message[:MAX_ERROR_CHARS] + "..."
        return f"the reply does not match output.json_schema at {error.json_path}: {message}"

    @property
    def system_note(self) -> str | None:
        """The text added to the system prompt, when the schema is asked for there."""
        if self.via != VIA_PROMPT:
            return None
        return f"{SCHEMA_NOTE}\n```json\n{json.dumps(self.schema, ensure_ascii=False, indent=2)}\n```"

    @property
    def response_format(self) -> dict[str, Any] | None:
        if self.schema is None:
            return None
        if self.via == VIA_PROMPT:
            return {"type": "json_object"}
        return {"type": "json_schema",
                "json_schema": {"name": SCHEMA_NAME, "schema": self.schema, "strict": self.strict}}

    def unsent_tokens(self) -> tuple[int, int]:
        """What the schema costs beside the messages, as (estimate_tokens, prompt_token_bound) of a message: sent
        as response_format, it is not in them, yet the server writes it into the prompt. (0, 0) when it is."""
        if self.via != VIA_RESPONSE_FORMAT:
            return 0, 0
        schema = [{"role": "system", "content": json.dumps(self.schema, ensure_ascii=False)}]
        return estimate_tokens(schema), prompt_token_bound(schema) - prompt_token_bound([])

    def extra_tokens(self, system: str | None) -> int:
        """estimate_tokens of what the schema adds to a row's prompt beside the job's `system` prompt, wherever
        it is sent."""
        note = self.system_note
        if note is None:
            return self.unsent_tokens()[0]
        before = estimate_tokens([{"content": system}]) if system else 0
        return estimate_tokens([{"content": system_text(system, note)}]) - before


def json_output_for(spec: JobSpec) -> JsonOutput | None:
    """The job's JsonOutput (None without parse_json): its schema read and checked; ConfigError naming the key."""
    out = spec.output
    if not out.parse_json:
        return None
    if out.json_schema is None:
        return JsonOutput(out.json_attempts)
    where = f"{spec.where('output.json_schema')}: output.json_schema"
    if isinstance(out.json_schema, Path):
        schema = _read_schema_file(where, out.json_schema, spec.paths_relative_to)
        where = f"{where} {out.json_schema}"
    else:
        schema = out.json_schema
    checker = validator_for(schema, default=Draft202012Validator)
    try:
        checker.check_schema(schema)
    except SchemaError as exc:
        raise ConfigError(_schema_error(spec, where, exc, inline=not isinstance(out.json_schema, Path))) from None
    kinds = schema.get("type", "object")
    if "object" not in (kinds if isinstance(kinds, list) else [kinds]):
        raise ConfigError(f"{where}: the reply is a JSON object, so the schema's type must be object (got {kinds!r})")
    _check_references(where, schema)
    provider = spec.model.provider_rules
    via, strict = out.schema_via or provider.schema_via, True
    if via == VIA_RESPONSE_FORMAT and provider.strict_schema:
        made = openai_strict(schema)
        if made.blocker is None:
            return JsonOutput(out.json_attempts, made.schema, via, checker(made.checked))
        strict = False
        log.warning("%s: sent with strict: false, as OpenAI's strict mode cannot express it (%s); each reply is "
                    "still checked against it", where, made.blocker)
    return JsonOutput(out.json_attempts, schema, via, checker(schema), strict)


# -- OpenAI's strict mode ---------------------------------------------------------------------------
# OpenAI answers 400 to a `strict: true` schema outside the subset it documents (Structured Outputs, "Supported
# schemas"): every object with additionalProperties false and every property in `required`, recursively; the root an
# object, not anyOf; every value typed (STRICT_TYPED_BY); none of the keywords below, and formats from its list.
# These change which keys or items a reply may have: a schema with one is sent with strict: false.
STRICT_REFUSED_KEYWORDS = (
    "allOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "patternProperties",
    "unevaluatedProperties", "unevaluatedItems", "prefixItems",
)
# These only narrow the values a reply may hold: they are left out of what is sent and checked by batch (a reply
# that breaks one is asked again), as pydantic-ai's OpenAI transformer does; so is a format not in STRICT_FORMATS.
STRICT_CHECKED_BY_BATCH = (
    "minLength", "maxLength", "uniqueItems", "minProperties", "maxProperties", "propertyNames", "contains",
    "minContains", "maxContains",
)
STRICT_TYPED_BY = ("type", "enum", "const", "anyOf", "oneOf", "$ref", "properties")  # without one: any value at all
STRICT_FORMATS = ("date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid")
NULL = {"type": "null"}


@dataclass
class StrictSchema:
    """A schema as OpenAI's strict mode takes it (openai_strict): `schema`, to send, and `checked`, the same with the
    constraints strict mode refuses kept (STRICT_CHECKED_BY_BATCH, oneOf), for batch to check each reply against;
    the changes made, with their JSON paths. Or, when no change can make it fit without changing which keys or
    items a reply may have, `blocker`, the first reason why (and the schema as it was)."""

    schema: dict[str, Any]
    checked: dict[str, Any]
    changes: list[str]
    blocker: str | None = None


def openai_strict(schema: dict[str, Any]) -> StrictSchema:
    """`schema` made to fit OpenAI's strict mode, accepting the same replies but for two things strict mode makes
    every reply do: an object has no keys beyond its properties (additionalProperties false where it was left
    unset), and an optional key is there, null when it has no value (listed in `required`, null allowed)."""
    sent = _Strictened(loosen=True)
    try:
        return StrictSchema(sent.node(schema, "$", root=True),
                            _Strictened(loosen=False).node(schema, "$", root=True), sent.changes)
    except _NotStrict as exc:
        return StrictSchema(schema, schema, [], str(exc))


class _NotStrict(Exception):
    pass


class _Strictened:
    """One walk of openai_strict. `loosen`: the schema to send (without the constraints batch checks itself)."""

    def __init__(self, loosen: bool) -> None:
        self.loosen = loosen
        self.changes: list[str] = []

    def node(self, node: Any, path: str, root: bool = False) -> Any:
        if not isinstance(node, dict):
            return node
        for keyword in STRICT_REFUSED_KEYWORDS:
            if keyword in node:
                raise _NotStrict(f"{keyword} at {path}")
        if not root and not any(key in node for key in STRICT_TYPED_BY):
            raise _NotStrict(f"a value of any type at {path} (it says neither type, enum, const, anyOf nor $ref)")
        if "oneOf" in node and "anyOf" in node:
            raise _NotStrict(f"both oneOf and anyOf at {path}")
        node = dict(node)
        if self.loosen:
            self._loosen(node, path)
        if root:
            if "anyOf" in node or "oneOf" in node or node.get("type", "object") != "object":
                kind = "anyOf" if "anyOf" in node or "oneOf" in node else node["type"]
                raise _NotStrict(f"a root that is not type: object alone ({kind})")
            if "type" not in node:
                node["type"] = "object"
                self.changes.append(f"{path}: type: object")
        for key in ("$defs", "definitions"):
            if isinstance(node.get(key), dict):
                node[key] = {name: self.node(sub, f"{path}.{key}.{name}") for name, sub in node[key].items()}
        if isinstance(node.get("items"), dict):
            node["items"] = self.node(node["items"], f"{path}.items")
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                node[key] = [self.node(sub, f"{path}.{key}[{i}]") for i, sub in enumerate(node[key])]
        kinds = node.get("type")
        if kinds == "object" or (isinstance(kinds, list) and "object" in kinds) or "properties" in node:
            self._object(node, path)
        return node

    def _loosen(self, node: dict[str, Any], path: str) -> None:
        """Leave out what strict mode refuses but batch checks: a narrower value is asked again, not refused. And a
        $ref with keywords beside it (a description) goes inside an anyOf, which strict mode takes them beside."""
        if "$ref" in node and len(node) > 1 and "anyOf" not in node and "oneOf" not in node:
            node["anyOf"] = [{"$ref": node.pop("$ref")}]
            self.changes.append(f"{path}: $ref inside anyOf, alone")
        for keyword in (*STRICT_CHECKED_BY_BATCH, "format"):
            if keyword in node and (keyword != "format" or node["format"] not in STRICT_FORMATS):
                del node[keyword]
                self.changes.append(f"{path}: no {keyword} (batch checks it)")
        if "oneOf" in node:  # the same branches; that exactly one matches is batch's to check
            node["anyOf"] = node.pop("oneOf")
            self.changes.append(f"{path}: anyOf for oneOf (batch checks it)")

    def _object(self, node: dict[str, Any], path: str) -> None:
        more = node.get("additionalProperties")
        properties = node.get("properties")
        if more is None and not isinstance(properties, dict):
            raise _NotStrict(f"an object whose keys are not fixed at {path} (it has no properties)")
        if more is None:
            node["additionalProperties"] = False
            self.changes.append(f"{path}: additionalProperties: false")
        elif more is not False:
            raise _NotStrict(f"additionalProperties {json.dumps(more)} at {path}: strict mode allows no other keys")
        properties = properties if isinstance(properties, dict) else {}
        required = node.get("required") if isinstance(node.get("required"), list) else []
        node["properties"] = {name: self.node(sub, f"{path}.properties.{name}") for name, sub in properties.items()}
        for name in properties:
            if name not in required:
                node["properties"][name] = _nullable(node["properties"][name])
                self.changes.append(f"{path}.properties.{name}: required, and may be null")
        node["required"] = list(properties)


def _nullable(node: Any) -> Any:
    """`node`, accepting null too (an optional key, as strict mode asks for it)."""
    if not isinstance(node, dict) or node in ({}, NULL):
        return node
    kinds = node.get("type")
    branches = node.get("anyOf")
    if kinds == "null" or (isinstance(kinds, list) and "null" in kinds) or \
            (isinstance(branches, list) and NULL in branches):
        return node
    if "const" in node or "enum" in node or "$ref" in node:
        return {"anyOf": [node, NULL]}
    if isinstance(kinds, str):
        return {**node, "type": [kinds, "null"]}
    if isinstance(branches, list):
        return {**node, "anyOf": [*branches, NULL]}
    return {"anyOf": [node, NULL]}


def _schema_error(spec: JobSpec, where: str, exc: SchemaError, inline: bool) -> str:
    """An invalid schema's one line, at the line of the key at fault when the schema is written in the job file."""
    if not exc.path:
        return f"{where} is not a valid JSON Schema: {exc.message}"
    if inline:
        at = spec.where(("output", "json_schema", *map(str, exc.path)))
        where = f"{at}: output.json_schema"
    text = f"{where} is not a valid JSON Schema at {exc.json_path}: {exc.message}"
    if inline and (exc.instance is None or isinstance(exc.instance, bool | int | float)):
        # required: [on] is [True] in YAML; keys are read as written, values are YAML's.
        text += f" ({YAML_QUOTE_HINT})"
    return text


def _read_schema_file(where: str, path: Path, relative_to: str) -> dict[str, Any]:
    """The schema in the file at `path`; `relative_to` says, in words, what a relative path was given against."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM (Windows editors) is not an error
    except FileNotFoundError:
        raise ConfigError(f"{where}: {path} not found (a relative path is relative to {relative_to})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read {path}: {read_reason(exc)}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: {path} is not JSON: {json_error_at(exc, f'line {exc.lineno}')}") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{where}: {path} holds a JSON {type(schema).__name__}, not a schema (a JSON object)")
    return schema


def _check_references(where: str, schema: dict[str, Any]) -> None:
    """Every $ref must point into the schema itself: nothing is fetched, and one that does not resolve would
    otherwise fail at the first reply that reaches it."""
    for ref in _references(schema):
        if not ref.startswith("#"):
            raise ConfigError(f"{where}: $ref {ref!r}: only references within the schema (#/...) are supported")
        node: Any = schema
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ConfigError(f"{where}: $ref {ref!r} points at nothing in the schema")


def _references(node: Any) -> list[str]:
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            found.append(node["$ref"])
        for value in node.values():
            found.extend(_references(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_references(value))
    return found
