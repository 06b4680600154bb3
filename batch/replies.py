"""Model output as data: a JSON reply's top-level keys become columns of the output, a window of rows at a time."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger("batch")
TEXT = pa.string()  # a string column, and JSON text
JSON_PREFIX = "json_"  # a reply key named like a column the output has already is written as json_KEY

# Models asked for JSON still wrap it in a Markdown fence now and then.
FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def parse_reply(text: str | None) -> dict[str, Any]:
    """The reply's JSON object; ValueError (with a short reason) when it is not one."""
    if text is None or not text.strip():
        raise ValueError("the reply is empty")
    fenced = FENCE.match(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the reply is not JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(value, dict):
        raise ValueError(f"the reply is JSON but not an object (a {type(value).__name__})")
    return value


class ReplyColumns:
    """One column per top-level key (or per `wanted` key) of the ok rows' replies, built a window of rows at a time.

    With a `schema` (output.json_schema), the keys it names come first, typed by it (batch.schema.arrow_type:
    nested objects and arrays as structs and lists where it fixes their shape); keys it does not name (when it
    allows them) are found in the replies. Those are typed by their values: nested values stay JSON text, and a
    key whose replies disagree on the type (1 here, "1" there) becomes text, so every column has one type. A key
    that clashes with a column already in the output gets a `json_` prefix. The keys and their types are found
    first, in one pass over the checkpoint's last records, so no window needs the replies of another.
    """

    def __init__(self, replies: Iterable[pa.Table], wanted: list[str] | None, taken: set[str],
                 schema: dict[str, Any] | None = None) -> None:
        """`replies`: the status and response of each id's last record, in write order (Checkpoint.chosen_records)."""
        typed = column_types(schema) if schema is not None else {}
        kinds: dict[str, set[type]] = {key: set() for key in (wanted if wanted is not None else typed)}
        held: dict[str, int] = dict.fromkeys(kinds, 0)  # replies holding a value for the key
        parsed = 0
        if any(key not in typed for key in kinds) or (wanted is None and (schema is None or allows_other_keys(schema))):
            for table in replies:
                for reply in _parsed(table):
                    parsed += 1
                    for key in wanted if wanted is not None else reply:
                        if key in typed:
                            continue
                        value = _cell(reply.get(key))
                        kinds.setdefault(key, set())
                        if value is not None:
                            kinds[key].add(type(value))
                            held[key] = held.get(key, 0) + 1
        self.keys = list(kinds)
        self.names = [JSON_PREFIX + key if key in taken else key for key in self.keys]
        self.as_text = {key for key, found in kinds.items()
                        if key not in typed and len(found) > 1 and found != {int, float}}
        self.types = [typed[key] if key in typed else
                      _arrow_type(kinds[key], held.get(key, 0) < parsed, key in self.as_text) for key in self.keys]
        self.typed = {key for key in self.keys if key in typed}
        self._misfits_told: set[str] = set()

    def columns(self, answers: pa.Table) -> list[tuple[str, pa.Array]]:
        """The reply columns of a window of rows, from their records' status and response (nulls where none)."""
        replies = _parsed(answers, keep_rows=True)
        found = []
        for key, name, type_ in zip(self.keys, self.names, self.types):
            values = [None if reply is None else reply.get(key) for reply in replies]
            if key in self.typed:
                values = self._fitted(key, values, type_)
            else:
                values = [_cell(value) for value in values]
                if key in self.as_text:
                    values = _as_text(values)
            found.append((name, pa.array(values, type=type_, from_pandas=True)))  # a NaN reads as null
        return found

    def _fitted(self, key: str, values: list[Any], type_: pa.DataType) -> list[Any]:
        """The values as the schema types them; one that does not fit (a reply checked against an earlier schema,
        resumed with --force) is null, and said once: its reply is in the response column."""
        fitted = []
        for value in values:
            try:
                fitted.append(fit(value, type_))
            except Misfit:
                fitted.append(None)
                if key not in self._misfits_told:
                    self._misfits_told.add(key)
                    log.warning("output.json_schema: a value of key %r does not have the schema's type (%s): left "
                                "null in its column (the response column has the whole reply)", key, type_)
        return fitted


def _parsed(table: pa.Table, keep_rows: bool = False) -> list[dict[str, Any] | None]:
    """Each ok record's reply, parsed; a reply that is not a JSON object (an ok row from before parse_json was
    set) gives nothing. `keep_rows`: one entry per record, None where there is no reply."""
    replies: list[dict[str, Any] | None] = []
    ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_pylist()
    for is_ok, text in zip(ok, table.column("response").to_pylist()):
        reply = None
        if is_ok:
            try:
                reply = parse_reply(text)
            except ValueError:
                pass
        if reply is not None or keep_rows:
            replies.append(reply)
    return replies


def _arrow_type(kinds: set[type], missing: bool, as_text: bool) -> pa.DataType:
    """The column's type, as the replies' values give it: an integer column with a gap is a float column."""
    if as_text or kinds == {str}:
        return pa.string()
    if not kinds:
        return pa.null()
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int} and not missing:
        return pa.int64()
    return pa.float64()


def _as_text(values: list[Any]) -> list[Any]:
    return [None if v is None else (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)) for v in values]


def _cell(value: Any) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value


# -- the columns output.json_schema gives ---------------------------------------------------------
class Misfit(ValueError):
    """A value that does not have its column's type (a reply checked against another schema)."""


def column_types(schema: dict[str, Any]) -> dict[str, pa.DataType]:
    """The Arrow type of each top-level key the schema names, in its order."""
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    return {key: arrow_type(sub) for key, sub in properties.items()}


def allows_other_keys(schema: dict[str, Any]) -> bool:
    """Whether a reply may hold keys the schema does not name."""
    return schema.get("additionalProperties", True) is not False or bool(schema.get("patternProperties"))


def arrow_type(schema: Any) -> pa.DataType:
    """The Arrow type of a value the schema describes: integer, number, boolean and string (enum and const too) as
    themselves; an object as a struct and an array as a list where the schema fixes their shape (an object's
    properties with additionalProperties false, an array's items); JSON text otherwise."""
    if not isinstance(schema, dict):
        return TEXT
    schema = _without_null_branch(schema)
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        return _type_of_values(values) if isinstance(values, list) else TEXT
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = set(kind) - {"null"}
        kind = next(iter(kinds)) if len(kinds) == 1 else ("number" if kinds == {"integer", "number"} else None)
    if kind is None and "properties" in schema:
        kind = "object"
    if kind in SIMPLE_TYPES:
        return SIMPLE_TYPES[kind]
    if kind == "object" and isinstance(schema.get("properties"), dict) and schema["properties"] \
            and not allows_other_keys(schema):
        return pa.struct([(key, arrow_type(sub)) for key, sub in schema["properties"].items()])
    if kind == "array" and isinstance(schema.get("items"), dict) and "prefixItems" not in schema:
        return pa.list_(arrow_type(schema["items"]))
    return TEXT


SIMPLE_TYPES = {"integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_(), "string": pa.string()}


def _without_null_branch(schema: dict[str, Any]) -> dict[str, Any]:
    """`anyOf: [X, {type: null}]` (an optional value, as pydantic writes it) is X."""
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list):
            kept = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
            return kept[0] if len(kept) == 1 and isinstance(kept[0], dict) else {}
    return schema


def _type_of_values(values: list[Any]) -> pa.DataType:
    kinds = {type(value) for value in values if value is not None}
    if kinds == {str}:
        return pa.string()
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64()
    if kinds and kinds <= {int, float}:
        return pa.float64()
    return TEXT


INT64_RANGE = range(-(2**63), 2**63)


def fit(value: Any, type_: pa.DataType) -> Any:
    """`value` (from a reply's JSON) as `type_` holds it: text for a string column (JSON text for a value that is
    not a string), a dict of the struct's fields, a list of the items; Misfit when it has another type."""
    if value is None:
        return None
    if pa.types.is_string(type_):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if pa.types.is_boolean(type_):
        if isinstance(value, bool):
            return value
    elif pa.types.is_integer(type_):
        # JSON Schema's integer is a number with no fraction: 2.0 is one.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer() \
                and int(value) in INT64_RANGE:
            return int(value)
    elif pa.types.is_floating(type_):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif pa.types.is_struct(type_):
        if isinstance(value, dict):
            return {field.name: fit(value.get(field.name), field.type) for field in type_}
    elif pa.types.is_list(type_):
        if isinstance(value, list):
            return [fit(item, type_.value_type) for item in value]
    raise Misfit(f"{value!r} is not {type_}")
