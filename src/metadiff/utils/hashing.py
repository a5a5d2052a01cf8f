"""Stable fingerprints of configs, used to key cached artifacts by what produced them."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(obj: Any) -> Any:
    """Resolve an OmegaConf node to plain Python containers (no-op for plain values)."""
    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (dict order does not matter)."""
    blob = json.dumps(to_plain(obj), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (checkpoints, task files): what a cached result was built from."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cached_file_sha256(path: str | Path) -> str:
    """sha256 of a weights file (GBs for ViT-L), hashed once per (path, inode, size, mtime) in this process: the
    pinned-asset check and the feature store's key both ask for it."""
    stat = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))
