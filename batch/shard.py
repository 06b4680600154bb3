"""One job as N shards: which rows are shard K's, which shard a process is, and the shard's own folder.

A row belongs to shard `crc32(id) % N`: CRC-32 of the id's UTF-8 bytes, the same in every process, on every
host and Python version (Python's own `hash()` of a string is salted per process, so two pods would split the
rows two different ways). The shard a process runs comes from `--shard K/N`, or, so that one command line serves
every pod of an array job, from the engine's index variable with the count from `--shards N` or the job file's
`shards: N`. Every mistake is a ConfigError (exit 2) raised before anything is written or sent.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.errors import ConfigError

# The variables an array-job engine sets to the index of each of its tasks, in the order they are read:
# Kubernetes Indexed Jobs, then Slurm job arrays (submitted as --array=0-(N-1)).
INDEX_VARIABLES = ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID")
# A shard's folder inside the job's checkpoint folder: shard=K-of-N.
FOLDER = re.compile(r"shard=(\d+)-of-(\d+)")
# The marker a shard writes once it ended with no row pending: `batch merge` waits for one from every shard.
SUCCESS_NAME = "_SUCCESS"
# The most shards a job splits into: Kubernetes' own bound on an Indexed Job's parallelism (10^5,
# kubernetes/kubernetes#98812). A count beyond it is a typo, and status and merge walk every shard's folder.
MOST_SHARDS = 100_000


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0 <= index < count)."""

    index: int
    count: int

    @property
    def folder(self) -> str:
        """Its checkpoint folder's name, inside the job's checkpoint folder."""
        return f"shard={self.index}-of-{self.count}"

    @property
    def label(self) -> str:
        """As log lines, summaries and errors name it."""
        return f"shard {self.index}/{self.count}"

    def selects(self, ids: pa.Array) -> np.ndarray:
        """Which of `ids` (text) are this shard's rows, as a boolean mask."""
        return shard_of(ids, self.count) == self.index


def shard_of(ids: pa.Array | pa.ChunkedArray, count: int) -> np.ndarray:
    """The shard (0 .. count-1) of each of `ids`: crc32 of its UTF-8 bytes, modulo `count`."""
    return (crc32_each(ids) % count).astype(np.int64)


def _crc32_table() -> np.ndarray:
    """The table of the reflected CRC-32 (polynomial 0xEDB88320) that zlib.crc32 computes, one entry per byte."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0xEDB88320), table >> 1).astype(np.uint32)
    return table


_CRC32_TABLE = _crc32_table()
# Past this many bytes a text's CRC is left to zlib: the table walk below costs about 7 ns per byte of each text, a
# zlib call from Python about 0.3 us per text (measured over 65,536 texts): the walk wins for ids (12-byte ids:
# 0.04 s per million against 0.10 s) and loses for prompts of a hundred bytes.
_LONGEST_WALKED = 32


def crc32_each(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """zlib.crc32 of each text's UTF-8 bytes (null: of no bytes), as uint32, without a Python call per text
    (but per text longer than _LONGEST_WALKED bytes).

    A shard asks this of every id of the input (its rows are found among all of them), on every start. Here the
    standard table-driven CRC steps all texts through their first byte, then their second, ...: sorted longest
    first, the texts still going at byte j are a prefix of them, and every step is one vectorised update of it."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    binary = pc.fill_null(texts.cast(pa.large_binary()), b"")
    offsets = np.frombuffer(binary.buffers()[1], np.int64)[binary.offset:binary.offset + len(binary) + 1]
    data = binary.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    crc = np.full(len(binary), 0xFFFFFFFF, np.uint32)
    walked = np.flatnonzero(lengths <= _LONGEST_WALKED)
    by_length = walked[np.argsort(-lengths[walked], kind="stable")]
    going = np.bincount(lengths[walked], minlength=1)[::-1].cumsum()[::-1]  # going[j]: ids of j bytes or more
    state, first = crc[by_length], starts[by_length]
    for position in range(1, len(going)):
        ahead = int(going[position])
        byte = data[first[:ahead] + (position - 1)]
        state[:ahead] = _CRC32_TABLE[(state[:ahead] ^ byte) & 0xFF] ^ (state[:ahead] >> 8)
    crc[by_length] = state ^ np.uint32(0xFFFFFFFF)
    long = np.flatnonzero(lengths > _LONGEST_WALKED)
    if len(long):
        crc[long] = np.fromiter(map(zlib.crc32, binary.take(pa.array(long)).to_pylist()), np.uint32, len(long))
    return crc


def parse_shard(text: str, source: str = "--shard") -> Shard:
    """`K/N` (0 <= K < N) as a Shard; a ConfigError naming `source` and what is wrong otherwise."""
    found = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if found is None:
        raise ConfigError(f"{source} {text!r}: a shard is K/N, shard K of N, K from 0 to N-1 (e.g. 0/4)")
    return _checked(int(found[1]), int(found[2]), source, text)


def check_count(count: int, source: str) -> int:
    """A shard count from 1 to MOST_SHARDS, or a ConfigError naming `source`."""
    if not 1 <= count <= MOST_SHARDS:
        raise ConfigError(f"{source}: the shard count must be from 1 to {MOST_SHARDS:,}, not {count:,}")
    return count


def _checked(index: int, count: int, source: str, text: str) -> Shard:
    check_count(count, f"{source} {text!r}")
    if index >= count:
        raise ConfigError(f"{source} {text!r}: shard {index} of {count} does not exist: "
                          f"shards are numbered 0 to {count - 1}")
    return Shard(index, count)


def choose_shard(given: str | None, count: int | None, job_count: int | None, job_count_where: str,
                 environ: Mapping[str, str], need_index: bool = True) -> Shard | None:
    """The shard this process runs, or None for the whole job.

    `given`: --shard K/N. `count`: --shards N. `job_count`: the job file's `shards: N`, at `job_count_where`.
    Without --shard the index comes from the first of INDEX_VARIABLES set in `environ`; a count without any index
    is a mistake when `need_index` (a run), and the whole job otherwise (validate, status). Every count given
    must agree: two different counts split the rows two ways, and rows would be lost or answered twice.
    """
    counts = [(f"--shards {count}", check_count(count, f"--shards {count}"))] if count is not None else []
    if job_count is not None:
        counts.append((f"{job_count_where}: shards: {job_count}", job_count))
    if given is not None:
        shard = parse_shard(given)
        counts.insert(0, (f"--shard {given}", shard.count))
    else:
        shard = None
    for (first, first_count), (other, other_count) in zip(counts, counts[1:]):
        if first_count != other_count:
            raise ConfigError(f"{first} and {other} disagree on the number of shards: give one count")
    if shard is not None:
        return shard
    variable = next((name for name in INDEX_VARIABLES if environ.get(name, "").strip()), None)
    if variable is None:
        if counts and need_index:
            raise ConfigError(f"{counts[0][0]} splits the job into shards, but this process is none of them: pass "
                              f"--shard K/{counts[0][1]}, or set {' or '.join(INDEX_VARIABLES)} (an array job does)")
        return None
    text = environ[variable].strip()
    if not counts:
        raise ConfigError(f"{variable}={text} names a shard, but the job has no shard count: set shards: N in the "
                          "job file or pass --shards N (or unset the variable to run the whole job)")
    if not text.isdigit():
        raise ConfigError(f"{variable}={text!r}: a shard index is a whole number from 0 to {counts[0][1] - 1}")
    return _checked(int(text), counts[0][1], variable, text)
