"""Atomic file and directory writes.

Every artifact of a stage is written under a temporary name and renamed into place, so a crash (or a kill -9)
never leaves a half-written file that a later run could mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metadiff.errors import InputFileError, MissingInputError


def tmp_sibling(path: Path) -> Path:
    """A unique temporary name next to `path` (same filesystem, so `os.replace` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(tempfile._get_candidate_names())}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path; on success move it onto `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success rename it to `path` (replacing it only if `overwrite`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} appeared while it was being built; refusing to overwrite it")
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: Any, sort_keys: bool = True) -> None:
    """Write JSON atomically (sorted keys by default, so equal content gives equal bytes; `sort_keys=False` where
    key order is data, as in Meta-VQA task files)."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, default=str))


def read_json(path: Path, what: str = "JSON file") -> Any:
    """Read JSON with an error that names the file instead of a bare decoder trace."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputFileError(f"{what} {path} is not valid JSON (truncated or corrupt?): {err}") from None
