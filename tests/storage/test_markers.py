"""The markers batch writes in a checkpoint (a lease, a shard's _SUCCESS, the checkpoint's layout) are read whatever
their object holds: a damaged or foreign one is taken as damaged, never raised (a JSON nested past the parser's depth
raised RecursionError, an internal error from every command reading it)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batch.checkpoint.finished import read_finished
from batch.checkpoint.layout import LAYOUT_NAME, read_layout
from batch.shard import SUCCESS_NAME
from batch.storage.base import marker_object
from batch.storage.lease import LEASE_KEY, read_lease
from batch.storage.local import LocalStore

DEEP = b"[" * 100_000 + b"]" * 100_000
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3))
ANY_BYTES = st.one_of(st.binary(), st.just(DEEP), st.just(b'{"a":' * 5_000 + b"1" + b"}" * 5_000),
                      JSON_VALUES.map(lambda value: json.dumps(value).encode()),
                      st.dictionaries(st.sampled_from(["shards", "holder", "epoch", "expires_at", "ok"]), JSON_VALUES)
                      .map(lambda value: json.dumps(value).encode()))


@given(data=ANY_BYTES)
def test_a_marker_is_an_object_or_a_value_error(data):
    try:
        found = marker_object(data)
    except ValueError:
        return
    assert isinstance(found, dict)


@pytest.mark.parametrize("name", [LAYOUT_NAME, SUCCESS_NAME, LEASE_KEY])
@given(data=ANY_BYTES)
def test_whatever_a_marker_holds_its_reader_answers(name, data):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / name).write_bytes(data)
        if name == LAYOUT_NAME:
            claimed, shards = read_layout(root)
            assert not claimed or shards is None or (type(shards) is int and shards >= 1)
        elif name == SUCCESS_NAME:
            assert isinstance(read_finished(root), dict)
        else:
            state, _ = read_lease(LocalStore(root))
            assert isinstance(state.holder, str) and type(state.epoch) is int
