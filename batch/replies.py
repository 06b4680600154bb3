"""Model output as data: a JSON reply's top-level keys become columns of the output, a window of rows at a time."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

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

    Nested values stay JSON text, and a key whose replies disagree on the type (1 here, "1" there)
    becomes text, so every column has one type; a key that clashes with a column already in the
    output gets a `json_` prefix. The keys and their types are found first, in one pass over the
    checkpoint's last records, so no window needs the replies of another.
    """

    def __init__(self, replies: Iterable[pa.Table], wanted: list[str] | None, taken: set[str]) -> None:
        """`replies`: the status and response of each id's last record, in write order (Checkpoint.chosen_records)."""
        kinds: dict[str, set[type]] = {key: set() for key in wanted or []}
        held: dict[str, int] = dict.fromkeys(kinds, 0)  # replies holding a value for the key
        parsed = 0
        for table in replies:
            for reply in _parsed(table):
                parsed += 1
                for key in wanted if wanted is not None else reply:
                    value = _cell(reply.get(key))
                    kinds.setdefault(key, set())
                    if value is not None:
                        kinds[key].add(type(value))
                        held[key] = held.get(key, 0) + 1
        self.keys = list(kinds)
        self.names = [f"json_{key}" if key in taken else key for key in self.keys]
        self.as_text = {key for key, found in kinds.items() if len(found) > 1 and found != {int, float}}
        self.types = [_arrow_type(kinds[key], held.get(key, 0) < parsed, key in self.as_text) for key in self.keys]

    def columns(self, answers: pa.Table) -> list[tuple[str, pa.Array]]:
        """The reply columns of a window of rows, from their records' status and response (nulls where none)."""
        replies = _parsed(answers, keep_rows=True)
        found = []
        for key, name, type_ in zip(self.keys, self.names, self.types):
            values = [None if reply is None else _cell(reply.get(key)) for reply in replies]
            if key in self.as_text:
                values = _as_text(values)
            found.append((name, pa.array(values, type=type_, from_pandas=True)))  # a NaN reads as null
        return found


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
