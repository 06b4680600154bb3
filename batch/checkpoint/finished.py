"""A shard's `_SUCCESS` marker: the shard ended with no row pending, and these were its counts.

`batch merge` joins the shards' records only once every shard has one. It is made with an exclusive create
(the storage seam's `create`: S3's If-None-Match), never a rename, so on an object store two holders of one
shard cannot both believe they made it.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from batch.checkpoint.guard import RunLock
from batch.shard import SUCCESS_NAME
from batch.storage.base import AlreadyExists, NotFound, marker_object
from batch.storage.locations import Location, object_at

if TYPE_CHECKING:
    from batch.plan import Settings


def mark_finished(folder: Location, counts: dict[str, Any]) -> None:
    """Note in the shard's checkpoint `folder` that it ended with nothing pending, with its `counts`. A marker left
    by an earlier run with other counts (a --retry-failed run since) is replaced: the caller holds the run lock."""
    marker = {**counts, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    body = (json.dumps(marker, ensure_ascii=False, indent=2) + "\n").encode()
    store, key = object_at(folder / SUCCESS_NAME)
    try:
        store.create(key, lambda sink: sink.write(body))
    except AlreadyExists:
        before = read_finished(folder) or {}
        if {k: before.get(k) for k in counts} != counts:
            store.replace(key, lambda sink: sink.write(body))


def read_finished(folder: Location) -> dict[str, Any] | None:
    """The shard's marker ({} when unreadable), or None when it has not finished."""
    store, key = object_at(folder / SUCCESS_NAME)
    try:
        return marker_object(store.read_bytes(key))
    except NotFound:
        return None
    except (OSError, ValueError):
        return {}


def shard_state(part: Settings) -> dict[str, Any]:
    """Whether a shard has finished (its _SUCCESS marker) and whether a run of it is alive (its run lock held)."""
    at = part.locations
    return {"finished": read_finished(at.checkpoint_dir) is not None,
            "running_pid": RunLock(at.local_dir).holder() if at.local_dir.is_dir() else None}


def why_unfinished(state: dict[str, Any]) -> str | None:
    """Why a merge waits for a shard in `state` (shard_state), or None: it has finished and no run of it is alive."""
    if not state["running_pid"] and state["finished"]:
        return None
    return f"running, pid {state['running_pid']}" if state["running_pid"] else "not finished"
