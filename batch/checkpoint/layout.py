"""The one layout a job's checkpoint answers its rows in: unsharded (records at its root), or N shards (folders
shard=K-of-N). A run in another layout reads none of the answers there, so it would pay for their rows again.

What a checkpoint holds tells the layout once answers are written (preflight.checkpoint_layouts), but not while the
first run of a layout has its answers only in its write-ahead log, on its own host's disk: two runs of different
layouts started within one part's window each found nothing of the other and both paid for the same rows, and a
shard killed before its first part let a run of another layout answer its rows again. So the first run of a job
claims its layout before it sends anything: `_LAYOUT` at the job's checkpoint root, made by an exclusive create once
the run holds its lock (or lease), never replaced. Every later run, of any layout on any host, reads it in its
preflight; a run that loses the race to make it reads the winner's and stops, having sent nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from batch.shard import Shard
from batch.storage.base import AlreadyExists, marker_object
from batch.storage.locations import Location, object_at
from batch.wording import counted

LAYOUT_NAME = "_LAYOUT"


class LayoutTaken(Exception):
    """The checkpoint's layout was claimed by a run of another one."""

    def __init__(self, claimed: int | None) -> None:
        super().__init__(claimed)
        self.claimed = claimed


def read_layout(root: Location) -> tuple[bool, int | None]:
    """Whether the job's checkpoint `root` has its layout claimed, and the claim: N shards, or None (unsharded). A
    claim that cannot be read as one (no run of batch writes such) is no claim: what the checkpoint holds still
    tells."""
    store, key = object_at(root / LAYOUT_NAME)
    try:
        shards = marker_object(store.read_bytes(key)).get("shards", False)
    except (OSError, ValueError):  # NotFound among them: no claim
        return False, None
    if shards is None or (type(shards) is int and shards >= 1):
        return True, shards
    return False, None


def claim_layout(root: Location, count: int | None) -> None:
    """Claim the layout `count` (N shards, or None: unsharded) for the job's checkpoint `root`, or find it claimed
    for that layout already; LayoutTaken when another is. The caller holds its run's lock or lease."""
    store, key = object_at(root / LAYOUT_NAME)
    body = (json.dumps({"shards": count}) + "\n").encode()
    try:
        store.create(key, lambda sink: sink.write(body))
        return
    except AlreadyExists:
        claimed, shards = read_layout(root)
    except OSError:
        # An unsharded run that claimed the root first clears what killed writers left there (Store.clean_up),
        # which, on a local folder, is this create's file being written: the claim it made tells.
        claimed, shards = read_layout(root)
        if not claimed:
            raise
    if claimed and shards != count:
        raise LayoutTaken(shards)


def layout_words(layouts: Sequence[int | None]) -> str:
    """Layouts as a checkpoint holds them: 'answers of an unsharded run and of 4 shards (shard=K-of-4)'."""
    return "answers of " + " and of ".join("an unsharded run" if count is None else
                                           f"{counted(count, 'shard')} (shard=K-of-{count})" for count in layouts)


def layout_of_run(shard: Shard | None, count: int | None) -> str:
    """A run's layout as a refusal names it: unsharded, shard K/N, or N shards (`count`)."""
    return "unsharded" if count is None else shard.label if shard else counted(count, "shard")


def other_layout_refused(root: Location, held: Sequence[int | None], this: str, count: int | None) -> str:
    """The line refusing a run that is `this` (its layout `count`) of a checkpoint `root` holding the layouts
    `held`, and what to do."""
    if list(held) == [None]:
        todo = "run it unsharded (no --shard, --shards or shards: N)"
    elif len(held) == 1:
        todo = (f"run each shard to the end (`--shard K/{held[0]}`, or `--shards {held[0]}` with an array job's "
                f"index), then `batch merge`" + (" (a plain run is then a no-op)" if count is None else ""))
    else:
        todo = ("its answers in more than one layout are never merged into one output: `batch merge --shards N "
                "--partial` writes one layout's")
    return (f"{root} holds {layout_words(held)}, and this run is {this}: it would send their rows again and pay for "
            f"them twice; {todo}, or set a new output.path to start over")
