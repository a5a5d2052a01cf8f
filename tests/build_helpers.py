"""Builders run in spawned processes by tests/test_artifacts.py: a module of its own with light imports, so each
spawned child starts in a moment instead of importing torch, Hydra and the test module's fixtures."""

from __future__ import annotations

import time
from pathlib import Path

from metadiff.utils.io import atomic_dir, build_once


def build_slowly(target: str, log: str) -> None:
    """A builder as the pipeline runs one: `build_once` with a slow, atomically published build."""

    def build() -> None:
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        with atomic_dir(Path(target)) as tmp:
            (tmp / "weights.txt").write_text("done")

    build_once(Path(target), lambda: Path(target).exists(), build)


def build_and_hang(target: str) -> None:
    """A builder killed mid-build: half its files are written when it stops."""

    def build() -> None:
        with atomic_dir(Path(target)) as tmp:
            (tmp / "half.txt").write_text("half")
            (Path(target).parent / "started").touch()
            time.sleep(600)

    build_once(Path(target), lambda: Path(target).exists(), build)


def publish(target: str, content: str) -> None:
    """Publish (overwriting) the same artifact dir 20 times."""
    for _ in range(20):
        with atomic_dir(Path(target), overwrite=True) as tmp:
            (tmp / "weights.txt").write_text(content)
