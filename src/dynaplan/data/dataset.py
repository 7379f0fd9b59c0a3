"""Parquet shards of step records on disk: deterministic atomic writes, reading, the dataset hash.

The same table always gives the same bytes (fixed writer options, no timestamps, fixed row
groups), so a dataset's hash is a function of its params. This module must not generate data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dynaplan.data.schema import STEP_SCHEMA

SHARD_SUFFIX = ".parquet"
MANIFEST = "manifest.json"
ROW_GROUP_ROWS = 4096
# Every option that affects the bytes is pinned here; pyarrow writes no timestamp, and
# `created_by` names the library version only.
_WRITE_OPTIONS = dict(
    compression="zstd",
    compression_level=3,
    use_dictionary=True,
    write_statistics=True,
    row_group_size=ROW_GROUP_ROWS,
    data_page_size=1 << 20,
    version="2.6",
    data_page_version="1.0",
    store_schema=True,
)


def write_shard(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write a table as Parquet, atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, **_WRITE_OPTIONS)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(data: object, path: str | os.PathLike[str]) -> Path:
    """JSON with sorted keys, written to a temp file then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def write_csv_atomic(rows: list[dict], path: str | os.PathLike[str]) -> Path:
    """Rows of dicts (same keys) as CSV, written to a temp file then renamed over `path`."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def shard_paths(folder: str | os.PathLike[str]) -> list[Path]:
    """The shard files of a dataset folder, sorted by name (temp files are hidden and skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {folder} (run the generate stage first)")
    return sorted(p for p in folder.glob(f"*{SHARD_SUFFIX}") if not p.name.startswith("."))


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def dataset_digest(shards: list[tuple[str, str]]) -> str:
    """Hash of a dataset from its `(logical shard name, shard sha256)` pairs, order-independent."""
    digest = hashlib.sha256()
    for name, sha in sorted(shards):
        digest.update(f"{name}\0{sha}\n".encode())
    return digest.hexdigest()


def read_table(folder: str | os.PathLike[str], columns: list[str] | None = None) -> pa.Table:
    """All shards of a dataset folder as one table, in shard-name order, with the step schema."""
    paths = shard_paths(folder)
    if not paths:
        raise FileNotFoundError(f"no {SHARD_SUFFIX} shards in {folder}")
    tables = [pq.read_table(p, columns=columns) for p in paths]
    table = pa.concat_tables(tables)
    if columns is None and table.schema != STEP_SCHEMA:
        raise ValueError(f"{folder}: shards do not have the step schema:\n{table.schema}")
    return table


def read_manifest(folder: str | os.PathLike[str]) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the dataset is incomplete (re-run the generate stage)")
    return json.loads(path.read_text())
