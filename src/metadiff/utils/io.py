"""Atomic file and directory writes.

Every artifact of a stage is written under a temporary name and renamed into place, so a crash (or a kill -9)
never leaves a half-written file that a later run could mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from metadiff.errors import InputFileError, MissingInputError

log = logging.getLogger(__name__)


def tmp_sibling(path: Path) -> Path:
    """A unique temporary name next to `path` (same filesystem, so `os.replace` is atomic)."""
    path = Path(path)
    # tempfile's own random names: a private helper, which typeshed's stub leaves out
    token = next(tempfile._get_candidate_names())  # type: ignore[attr-defined]
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{token}")


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
    replaced: list[Path] = []
    try:
        yield tmp
        for _ in range(3):  # another process may publish the same directory between our check and our rename
            if path.exists():
                if not overwrite:
                    raise FileExistsError(f"{path} appeared while it was being built; refusing to overwrite it")
                # moved aside, not deleted in place: a reader of the old copy keeps its open files, and the
                # swap is two renames instead of a slow rmtree with nothing at `path` meanwhile
                replaced.append(tmp_sibling(path))
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, replaced[-1])
            try:
                os.replace(tmp, path)
                break
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        else:
            raise FileExistsError(f"{path} kept being replaced by other processes while this one published it")
    finally:
        for old in (tmp, *replaced):
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Hold the build of whatever goes at `path` (an artifact, a generated data set) for this process: processes
    sharing one outputs dir (sweep jobs, test workers, DDP ranks) then build it once, and the others wait and reuse
    it instead of rebuilding it. Callers check for `path` again once they hold the lock. An OS file lock (filelock),
    so a killed builder never leaves it held."""
    path = Path(path)
    lock_file = path.parent / ".locks" / f"{path.name}.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is building %s: waiting for it", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def build_once(path: Path, is_built: Callable[[], bool], build: Callable[[], object], locked: bool = True) -> bool:
    """Build what goes at `path` unless `is_built()`: check, take `build_lock(path)`, check again (another process
    may have built it meanwhile), build. `locked=False` builds without the lock (the follower ranks of a DDP job,
    which build alongside the rank 0 that holds it). Returns whether this call built it."""
    if is_built():
        return False
    with build_lock(path) if locked else contextlib.nullcontext():
        if is_built():
            return False
        build()
    return True


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
