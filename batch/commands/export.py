"""`batch export`: the job's final Parquet table as CSV, JSONL or Parquet, streamed by record batches.

The copy is written as one whole object (batch.storage), so the target is either the previous file or the whole
new one, never half of it. It never overwrites the job's input, output or job file, or a checkpoint's files.
"""

from __future__ import annotations

import base64
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batch.checkpoint.finished import shard_state
from batch.commands.shards import (
    ShardsReading,
    read_shards,
    why_waiting,
    write_shard_rows,
)
from batch.commands.status import read_job
from batch.config import JobSpec
from batch.errors import ConfigError
from batch.plan import Settings
from batch.preflight import check_export_target, job_shards, settings_of
from batch.storage.locations import Location, is_url, location, object_at
from batch.wording import counted

FORMATS = ("csv", "jsonl", "parquet")


def export_output(spec: JobSpec, fmt: Literal["csv", "jsonl", "parquet"], to: Location | str,
                  shards: int | None = None) -> int:
    """Write the final output table to `to` in `fmt`; returns the number of rows written. A job split into shards
    (`shards`: --shards) exports its merged output; `spec` made for one shard, that shard's rows."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r} (use one of {', '.join(FORMATS)})")
    settings = settings_of(spec)
    to = _target(to)
    if settings.shard is not None:
        return _export_shard(settings, fmt, to)
    source, job_file = settings.locations.output, settings.locations.job_file
    parts = job_shards(spec, shards)
    if parts is not None:
        _check_merged(settings, read_shards(settings, parts))
    else:
        job_now = read_job(settings)  # the rule read_results has: a final file older than the input or records is stale
        if job_now.pending:
            raise ConfigError(f"{source}: the job is not complete: {counted(job_now.pending, 'row')} pending "
                              f"(see `batch status {job_file}`; `batch run` answers them)")
        if not job_now.final_is_current:
            raise ConfigError(f"{source}: the final output is missing, or not the one batch made from the job's "
                              f"records, input and output settings as they are now: `batch run {job_file}` writes it "
                              "again, sending nothing")
    check_export_target(settings.locations, to)
    return export_file(source, fmt, to)


def _target(to: Location | str) -> Location:
    """Where --to names: a local path, or a URL's object (a URL ending in "/" names a folder: refused)."""
    try:
        found = location(to)
    except ValueError as exc:
        raise ConfigError(f"--to {exc}") from None
    if is_url(found) and str(to).endswith("/"):
        raise ConfigError(f"--to {to} is a folder: name the file to write, e.g. {found / 'results.csv'}")
    return found


def _check_merged(whole: Settings, shards: ShardsReading) -> None:
    """A job split into shards is exported from its merged output, once every shard has finished and it is merged
    from their records as they are now: a ConfigError naming what is missing otherwise."""
    source, job_file = whole.locations.output, whole.locations.job_file
    count = len(shards.parts)
    if shards.unfinished:
        raise ConfigError(f"{source}: cannot export the job's output yet: {', '.join(shards.unfinished)}: run "
                          f"each to the end (`batch run {job_file} --shard K/{count}`), then `batch merge {job_file}` "
                          f"writes the output to export (`--shard K/{count}` exports one completed shard's rows)")
    if not shards.merged_is_current:
        raise ConfigError(f"{source}: every shard has finished, but the output is missing or not merged from their "
                          f"records as they are now: `batch merge {job_file}` writes it, sending nothing")


def _export_shard(part: Settings, fmt: Literal["csv", "jsonl", "parquet"], to: Location) -> int:
    """Shard `part`'s rows alone, once it has finished (a shard writes no output of its own: they are written from
    its checkpoint to a file of the export's own first)."""
    label, job_file = part.shard.label, part.locations.job_file  # type: ignore[union-attr]
    why = why_waiting(shard_state(part), read_job(part).pending)
    if why:
        raise ConfigError(f"{job_file}: cannot export {label} yet ({why}): it can be once `batch run {job_file} "
                          f"--shard {part.shard.index}/{part.shard.count}` has run it to the end")  # type: ignore[union-attr]
    check_export_target(part.locations, to)
    with tempfile.TemporaryDirectory(prefix="batch-export-") as folder:
        rows = Path(folder) / "shard.parquet"
        try:
            write_shard_rows(part, rows)
        except OSError as exc:
            raise ConfigError(f"{to}: cannot export {label}: {exc.strerror or exc}") from None
        return export_file(rows, fmt, to)


def export_file(source: Path, fmt: Literal["csv", "jsonl", "parquet"], to: Location) -> int:
    """Write the Parquet table `source` to `to` in `fmt`, as one whole object; returns the number of rows written."""
    sources, source_key = object_at(source)
    try:
        target, target_key = object_at(to)
    except ValueError as exc:  # a scheme batch does not write to, or its library not installed
        raise ConfigError(f"--to {exc}") from None
    rows = 0

    def write(sink: BinaryIO) -> None:
        nonlocal rows
        with sources.open_read(source_key) as stream, pq.ParquetFile(stream) as table:
            rows = _WRITERS[fmt](table, sink)

    try:
        target.replace(target_key, write)
    except OSError as exc:
        raise ConfigError(f"{to}: cannot write the export: {exc.strerror or exc}") from None
    except ValueError as exc:  # a store refusing the bucket (OSS with versioning on)
        raise ConfigError(f"--to {exc}") from None
    except pa.ArrowException as exc:  # a type the format cannot hold, or a damaged output file
        raise ConfigError(f"{to}: cannot export {source} as {fmt}: {exc}") from None
    return rows


def _write_parquet(source: pq.ParquetFile, sink: BinaryIO) -> int:
    rows = 0
    with pq.ParquetWriter(sink, source.schema_arrow) as writer:
        for batch in source.iter_batches():
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def _write_csv(source: pq.ParquetFile, sink: BinaryIO) -> int:
    rows = 0
    schema = pa.schema([_csv_field(field) for field in source.schema_arrow])
    with pacsv.CSVWriter(sink, schema) as writer:
        for batch in source.iter_batches():
            writer.write_batch(pa.RecordBatch.from_arrays(
                [_csv_column(column) for column in batch.columns], schema=schema))
            rows += batch.num_rows
    return rows


def _write_jsonl(source: pq.ParquetFile, sink: BinaryIO) -> int:
    rows = 0
    for batch in source.iter_batches():
        lines = (json.dumps({key: _finite(value) for key, value in record.items()}, ensure_ascii=False,
                            default=_json_default) + "\n" for record in batch.to_pylist())
        sink.write("".join(lines).encode("utf-8"))
        rows += batch.num_rows
    return rows


_WRITERS: dict[str, Callable[[pq.ParquetFile, BinaryIO], int]] = {
    "csv": _write_csv, "jsonl": _write_jsonl, "parquet": _write_parquet}


def _csv_type(type_: pa.DataType) -> pa.DataType:
    """CSV cannot hold lists or structs: those columns are written as JSON text."""
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    return pa.string() if pa.types.is_nested(type_) else type_


def _csv_field(field: pa.Field) -> pa.Field:
    return pa.field(field.name, _csv_type(field.type))


def _csv_column(column: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if not pa.types.is_nested(column.type):
        return column
    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=_json_default)
                     for v in column.to_pylist()], pa.string())


def _finite(value: Any) -> Any:
    """NaN and infinity are not JSON: they are written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)  # Decimal, timedelta and the like
