"""Model output as data: a JSON reply's top-level keys become columns of the output."""

from __future__ import annotations

import json
import re
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


def reply_columns(results: pa.Table, wanted: list[str] | None, taken: set[str]) -> Any:
    """One column per top-level key (or per `wanted` key) of each ok row's reply, indexed by id.

    Nested values stay JSON text, so every column has one type; a key that clashes with a column
    already in the output gets a `json_` prefix.
    """
    import pandas as pd  # here, not at the top: it costs every run ~35 MB of memory

    ok = results.filter(pc.equal(results.column("status"), "ok"))
    parsed: dict[str, dict[str, Any]] = {}
    for row_id, text in zip(ok.column("id").to_pylist(), ok.column("response").to_pylist()):
        try:
            parsed[row_id] = parse_reply(text)
        except ValueError:
            continue  # an ok row from before parse_json was set: it simply gets nulls
    keys = wanted if wanted is not None else list(dict.fromkeys(k for reply in parsed.values() for k in reply))
    frame = pd.DataFrame(
        {key: _one_type([_cell(reply.get(key)) for reply in parsed.values()]) for key in keys},
        index=pd.Index(list(parsed), dtype=object))
    return frame.rename(columns={k: f"json_{k}" for k in keys if k in taken})


def _one_type(values: list[Any]) -> list[Any]:
    """A column whose replies disagree on the type (1 here, "1" there) becomes text, so Parquet can hold it."""
    kinds = {type(v) for v in values if v is not None}
    if len(kinds) <= 1 or kinds == {int, float}:
        return values
    return [None if v is None else (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)) for v in values]


def _cell(value: Any) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
