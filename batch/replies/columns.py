"""Model output as data: a JSON reply's top-level keys become columns of the output, a window of rows at a time."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batch.wording import counted

log = logging.getLogger("batch")
JSON_PREFIX = "json_"  # a reply key named like a column the output has already is written as json_KEY (column_names)
# The field metadata of a string column (or struct field, or list item) that holds each value's JSON text (a string
# in quotes, so 5 and "5" differ) rather than the strings themselves: where values of several JSON types meet.
JSON_TEXT = {"batch": "json"}
MAX_DEPTH = 100  # JSON nesting a reply may have: deeper, the validator and writers would exhaust Python's stack
INT64_RANGE = range(-(2**63), 2**63)
EXACT_FLOAT_INTS = range(-(2**53), 2**53 + 1)  # the integers every float64 holds exactly

# Models asked for JSON still wrap it in a Markdown code fence now and then: backticks or tildes, three or more, with
# any info string (json, JSON, " json", jsonc, ...) or none; the closing fence is the opening one's characters.
FENCE = re.compile(r"\A\s*(?P<fence>`{3,}|~{3,})(?:[^\n`]*\n|[ \t]*[A-Za-z][\w.+-]*)?(?P<body>.*?)(?P=fence)[`~]*\s*\Z",
                   re.DOTALL)
# How a JSON text spells a lone surrogate: an escape of one half of a pair (a whole pair reads as one character),
# or the half itself in a text that did not come from UTF-8. No UTF-8 file can hold one.
LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
MAY_HOLD_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")


def parse_reply(text: str | None) -> dict[str, Any]:
    """The reply's JSON object; ValueError (with a short reason) when it is not one that every column can keep."""
    if text is None or not text.strip():
        raise ValueError("the reply is empty")
    fenced = FENCE.match(text)
    body = fenced.group("body") if fenced else text
    try:
        value = json.loads(body, parse_constant=_not_json_constant, parse_float=_float64)
    except NotKept as exc:
        raise ValueError(f"the reply {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"the reply is not JSON: {json_error_at(exc, f'character {exc.pos}')}") from None
    except RecursionError:  # the parser's own limit, near 1,000 levels
        raise ValueError(f"the reply nests deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # the only other: Python reads no integer of more digits than sys.get_int_max_str_digits()
        raise ValueError(f"the reply holds an integer of more than {counted(sys.get_int_max_str_digits(), 'digit')}"
                         ) from None
    if not isinstance(value, dict):
        raise ValueError(f"the reply is JSON but not an object (a {type(value).__name__})")
    _check_keepable(value, body)
    return value


class NotKept(ValueError):
    """A number in the reply that no column can keep as JSON wrote it."""


def _not_json_constant(name: str) -> float:
    """Python's json reads NaN, Infinity and -Infinity; JSON has no such values (RFC 8259)."""
    raise NotKept(f"is not JSON: {name}")


def _float64(literal: str) -> float:
    """A JSON number with a fraction or exponent, as float64; one beyond its range (1e400) would read as infinity,
    which is not the reply's value and not JSON: refused, as an integer too long for Python is."""
    value = float(literal)
    if math.isinf(value):
        raise NotKept(f"holds a number beyond float64's range ({literal[:40]})")
    return value


def json_error_at(exc: json.JSONDecodeError, where: str) -> str:
    """What json says is wrong and where, once ("Unterminated string starting at character 31": that message ends
    in "at" already)."""
    return f"{exc.msg.removesuffix(' at')} at {where}"


def _check_keepable(reply: dict[str, Any], text: str) -> None:
    """ValueError when `reply` (parsed from `text`) nests deeper than MAX_DEPTH or holds a lone surrogate in a key
    or a string. The walk runs only when `text` could hold either: a reply is checked as it arrives."""
    deep = text.count("{") + text.count("[") > MAX_DEPTH
    if not deep and MAY_HOLD_SURROGATE.search(text) is None:
        return
    stack: list[tuple[Any, int]] = [(reply, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"the reply nests deeper than {MAX_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            for text_in_it in (key, item):
                if isinstance(text_in_it, str) and (lone := LONE_SURROGATE.search(text_in_it)):
                    raise ValueError(f"the reply holds a lone surrogate ({json.dumps(lone.group())}), "
                                     "which is not text: no file can keep it")
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))


class ReplyColumns:
    """One column per top-level key (or per `wanted` key) of the ok rows' replies, built a window of rows at a time.

    With a `schema` (output.json_schema), the keys it names come first, typed by it (schema_field: nested objects
    and arrays as structs and lists where it fixes their shape); keys it does not name (when it allows them) are
    found in the replies and typed by their values (inferred_field). Every value is kept exactly: a column whose
    type cannot hold one of its values exactly (an integer beyond int64, or beyond what float64 holds exactly in a
    number column) is JSON text instead. A key that clashes with a column already in the output gets a `json_`
    prefix, as many as it takes to name no other column. The keys and their types are found first, in one pass over
    the checkpoint's last records, so no window needs the replies of another.
    """

    def __init__(self, replies: Iterable[pa.Table], wanted: list[str] | None, taken: set[str],
                 schema: dict[str, Any] | None = None) -> None:
        """`replies`: the status and response of each id's last record, in write order (Checkpoint.kept_records)."""
        typed = column_fields(schema) if schema is not None else {}
        kinds: dict[str, set[str]] = {key: set() for key in (wanted if wanted is not None else typed)}
        too_wide: set[str] = set()  # typed keys with a value their type cannot hold exactly
        open_keys = wanted is None and (schema is None or allows_other_keys(schema))
        for table in replies:
            for reply in _parsed(table):
                for key in wanted if wanted is not None else (reply if open_keys else typed):
                    value = reply.get(key)
                    if key in typed:
                        if key not in too_wide and not _fits_exactly(value, typed[key]):
                            too_wide.add(key)
                    else:
                        kinds.setdefault(key, set()).add(value_kind(value))
        for key in too_wide:
            log.warning("output.json_schema: key %r holds a value its type (%s) cannot hold exactly (an integer "
                        "too large for it): its column is JSON text", key, typed[key].type)
        self.keys = list(kinds)
        names = column_names(self.keys, taken)
        self.fields = [json_text_field(name) if key in too_wide else
                       typed[key].with_name(name) if key in typed else inferred_field(name, kinds[key])
                       for key, name in zip(self.keys, names)]
        self.typed = {key for key in self.keys if key in typed and key not in too_wide}
        self._misfits_told: set[str] = set()

    @property
    def names(self) -> list[str]:
        return [field.name for field in self.fields]

    def columns(self, answers: pa.Table) -> list[tuple[str, pa.Array]]:
        """The reply columns of a window of rows, from their records' status and response (nulls where none)."""
        replies = _parsed(answers, keep_rows=True)
        found = []
        for key, field in zip(self.keys, self.fields):
            values = [None if reply is None else reply.get(key) for reply in replies]
            values = self._fitted(key, values, field) if key in self.typed else [fit(v, field) for v in values]
            found.append((field.name, pa.array(values, type=field.type, from_pandas=True)))  # a NaN reads as null
        return found

    def _fitted(self, key: str, values: list[Any], field: pa.Field) -> list[Any]:
        """The values as the schema types them; one that does not fit (a reply checked against an earlier schema,
        resumed with --force) is null, and said once: its reply is in the response column."""
        fitted = []
        for value in values:
            try:
                fitted.append(fit(value, field))
            except Misfit:
                fitted.append(None)
                if key not in self._misfits_told:
                    self._misfits_told.add(key)
                    log.warning("output.json_schema: a value of key %r does not have the schema's type (%s): left "
                                "null in its column (the response column has the whole reply)", key, field.type)
        return fitted


def column_names(keys: list[str], taken: set[str]) -> list[str]:
    """The column of each reply key: the key itself, or for one that clashes with a column in `taken`, the key with
    `json_` prefixes until it names neither such a column nor another key's."""
    used = set(taken) | {key for key in keys if key not in taken}
    names = []
    for key in keys:
        name = key
        if key in taken:
            name = JSON_PREFIX + key
            while name in used:
                name = JSON_PREFIX + name
            used.add(name)
        names.append(name)
    return names


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


# -- the type of a column the replies' values give -------------------------------------------------
def value_kind(value: Any) -> str:
    """What a value needs of its column: its JSON type, integers split by the Arrow types that hold them exactly."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer" if value in EXACT_FLOAT_INTS else "int64" if value in INT64_RANGE else "wide"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "json"  # an object or an array: JSON text


KIND_TYPES = {"boolean": pa.bool_(), "string": pa.string(), "integer": pa.int64(), "int64": pa.int64(),
              "number": pa.float64()}


def inferred_field(name: str, kinds: set[str]) -> pa.Field:
    """A column of values of these kinds: their common type, where one holds them all exactly (integers and
    numbers: float64, when every integer is one float64 holds exactly); JSON text otherwise."""
    kinds = kinds - {"null"}
    if not kinds:
        return pa.field(name, pa.null())
    if kinds <= {"integer", "int64"}:
        return pa.field(name, pa.int64())
    if kinds <= {"integer", "number"}:
        return pa.field(name, pa.float64())
    if len(kinds) == 1 and next(iter(kinds)) in KIND_TYPES:
        return pa.field(name, KIND_TYPES[next(iter(kinds))])
    return json_text_field(name)


def json_text_field(name: str) -> pa.Field:
    return pa.field(name, pa.string(), metadata=JSON_TEXT)


def holds_json_text(field: pa.Field) -> bool:
    return field.metadata is not None and all(field.metadata.get(key.encode()) == value.encode()
                                              for key, value in JSON_TEXT.items())


def json_text(value: Any) -> str | None:
    """A value's JSON text (None stays null): exact, a big integer's digits included."""
    return None if value is None else json.dumps(value, ensure_ascii=False)


# -- the columns output.json_schema gives ---------------------------------------------------------
class Misfit(ValueError):
    """A value that does not have its column's type (a reply checked against another schema)."""


class TooWide(ValueError):
    """A value of its column's JSON type that the column's Arrow type cannot hold exactly (an integer beyond int64)."""


def column_fields(schema: dict[str, Any]) -> dict[str, pa.Field]:
    """The column of each top-level key the schema names, in its order."""
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    return {key: schema_field(key, sub) for key, sub in properties.items()}


def allows_other_keys(schema: dict[str, Any]) -> bool:
    """Whether a reply may hold keys the schema does not name."""
    return schema.get("additionalProperties", True) is not False or bool(schema.get("patternProperties"))


def arrow_type(schema: Any) -> pa.DataType:
    """The Arrow type of a value the schema describes (schema_field)."""
    return schema_field("", schema).type


def schema_field(name: str, schema: Any) -> pa.Field:
    """The field of a value the schema describes: integer, number, boolean and string (enum and const too) as
    themselves; an object as a struct and an array as a list where the schema fixes their shape (an object's
    properties with additionalProperties false, an array's items); JSON text otherwise (a union, an open object)."""
    if not isinstance(schema, dict):
        return json_text_field(name)
    schema = _without_null_branch(schema)
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        return inferred_field(name, {value_kind(v) for v in values}) if isinstance(values, list) and values \
            else json_text_field(name)
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = set(kind) - {"null"}
        kind = next(iter(kinds)) if len(kinds) == 1 else ("number" if kinds == {"integer", "number"} else None)
    if kind is None and "properties" in schema:
        kind = "object"
    if kind in SIMPLE_TYPES:
        return pa.field(name, SIMPLE_TYPES[kind])
    if kind == "object" and isinstance(schema.get("properties"), dict) and schema["properties"] \
            and not allows_other_keys(schema):
        return pa.field(name, pa.struct([schema_field(key, sub) for key, sub in schema["properties"].items()]))
    if kind == "array" and isinstance(schema.get("items"), dict) and "prefixItems" not in schema:
        return pa.field(name, pa.list_(schema_field("item", schema["items"])))
    return json_text_field(name)


SIMPLE_TYPES = {"integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_(), "string": pa.string()}


def _without_null_branch(schema: dict[str, Any]) -> dict[str, Any]:
    """`anyOf: [X, {type: null}]` (an optional value, as pydantic writes it) is X."""
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list):
            kept = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
            return kept[0] if len(kept) == 1 and isinstance(kept[0], dict) else {}
    return schema


def fit(value: Any, field: pa.Field) -> Any:
    """`value` (from a reply's JSON) as `field` holds it: JSON text in a JSON text field, a dict of a struct's
    fields, a list of the items; Misfit when it has another JSON type, TooWide when the type cannot hold it exactly."""
    if value is None:
        return None
    if holds_json_text(field):
        return json_text(value)
    type_ = field.type
    if pa.types.is_string(type_):
        if isinstance(value, str):
            return value
    elif pa.types.is_boolean(type_):
        if isinstance(value, bool):
            return value
    elif pa.types.is_integer(type_):
        # JSON Schema's integer is a number with no fraction: 2.0 is one.
        whole = value if isinstance(value, int) and not isinstance(value, bool) else \
            int(value) if isinstance(value, float) and value.is_integer() else None
        if whole is not None:
            if whole not in INT64_RANGE:
                raise TooWide(f"{value!r} is beyond int64")
            return whole
    elif pa.types.is_floating(type_):
        if isinstance(value, float):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            if value not in EXACT_FLOAT_INTS:
                raise TooWide(f"{value!r} is beyond what float64 holds exactly")
            return float(value)
    elif pa.types.is_struct(type_):
        if isinstance(value, dict):
            return {child.name: fit(value.get(child.name), child) for child in type_}
    elif pa.types.is_list(type_):
        if isinstance(value, list):
            return [fit(item, type_.value_field) for item in value]
    raise Misfit(f"{value!r} is not {type_}")


def _fits_exactly(value: Any, field: pa.Field) -> bool:
    """Whether `field`'s type holds `value` exactly; a value of another JSON type (Misfit) is left null, not widened."""
    try:
        fit(value, field)
    except TooWide:
        return False
    except Misfit:
        pass
    return True
