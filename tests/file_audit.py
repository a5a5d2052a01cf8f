"""A test-only callback that records which files under a folder each DDP rank opens for writing (Python's audit
hook sees every `open`, numpy's memmaps included), written per rank to `<log_dir>/rank<r>.json` at teardown.

Why an audit hook: the ranks are processes of their own (started by metadiff.run or Lightning), so a monkeypatch in
the test cannot see into them; a callback named in the config is built inside every rank."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT


class WriteOpens(pl.Callback):
    """Records (path relative to `watch`) of every file this rank opens for writing under `watch`."""

    def __init__(self, watch: str, log_dir: str):
        self.watch, self.log_dir = Path(watch).resolve(), Path(log_dir)
        self.opened: set[str] = set()
        self.rank = 0

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event != "open" or not isinstance(args[0], str | bytes | os.PathLike):
            return
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
        if not writes:
            return
        try:
            relative = Path(os.fsdecode(path)).resolve().relative_to(self.watch)
        except ValueError:
            return
        # temporary names (".<name>.tmp-<pid>-<random>") are a process's own by construction: record the target
        name = relative.name
        if name.startswith(".") and ".tmp-" in name:
            relative = relative.with_name(name[1:].split(".tmp-")[0])
        self.opened.add(str(relative))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.rank = trainer.global_rank
        sys.addaudithook(self._hook)  # cannot be removed: the rank's process ends with its stage

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / f"rank{self.rank}.json").write_text(json.dumps(sorted(self.opened)))
