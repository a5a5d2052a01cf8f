"""Shard files of a feature store being built: each rank's computed rows, one `.npz` per batch, never shared.

Why files of their own instead of rows written into one shared memory-mapped table: ranks on different nodes of a
network filesystem each write back whole pages of their own view of a shared file, so rows interleaved by the
distributed sampler overwrite each other, and the committing node reads a stale view of the others' rows. A shard is
written under a temporary name, flushed to disk (`fsync`) and renamed, so a shard that exists is complete, and it
survives a killed job (the next run resumes from it). Each rank lists the shards it wrote, with their sizes, in a
shard list when it finishes; rank 0 merges what the lists name and refuses a shard that is missing or truncated.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from metadiff.errors import InputFileError, MissingInputError
from metadiff.utils.io import atomic_path, read_json, write_json


def write_shard(path: Path, rows: np.ndarray, values: np.ndarray) -> int:
    """Write one shard (row numbers and their float32 values) atomically and durably; return its size in bytes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        np.savez(file, rows=np.asarray(rows, np.int64), values=np.asarray(values, np.float32))
        file.flush()
        os.fsync(file.fileno())
    return path.stat().st_size


def read_shard(path: Path, size: int | None, n_rows: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A shard's (rows, values), checked: present, of the size its writer listed (None: not listed yet, as for a
    leftover of a killed run), readable, rows within the table and values `[len(rows), dim]`. Every fault is one
    line naming the file."""
    if not path.is_file():
        raise MissingInputError(
            f"feature store shard {path} is missing: a rank listed it but it is not there "
            f"(rerun the features stage to compute its rows again)"
        )
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise InputFileError(f"feature store shard {path} is truncated: {actual} bytes, its rank wrote {size}")
    try:
        with np.load(path) as shard:
            rows, values = shard["rows"], shard["values"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise InputFileError(f"feature store shard {path} is unreadable (truncated or corrupt: {err})") from None
    if rows.ndim != 1 or values.shape != (len(rows), dim) or (len(rows) and not 0 <= rows.min() <= rows.max() < n_rows):
        raise InputFileError(
            f"feature store shard {path} does not fit its table: rows {rows.shape} in "
            f"[0, {n_rows}), values {values.shape}, expected [{len(rows)}, {dim}]"
        )
    return rows, values


def shard_list_path(folder: Path, run: str, rank: int) -> Path:
    return folder / f"{run}.rank{rank}.json"


def write_shard_list(path: Path, shards: Mapping[str, int]) -> None:
    """What one rank wrote in this run: {shard file name: size in bytes}; written last, when the rank is done."""
    write_json(path, {"shards": dict(shards)})


def read_shard_list(path: Path, rank: int, world_size: int) -> dict[str, int]:
    if not path.is_file():
        raise MissingInputError(
            f"feature store shard list {path} is missing: rank {rank} of {world_size} did not "
            f"finish its part of the features (rerun the stage to resume)"
        )
    return {str(k): int(v) for k, v in read_json(path, what="feature store shard list")["shards"].items()}
