"""A Lightning callback that times a stage's training steps and validation runs inside the real run loop (the check
adds it to a stage with a `+callbacks.step_timer` override), and writes what it measured as JSON."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from metadiff.utils.io import write_json


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepTimer(pl.Callback):
    """Seconds of every training batch (start to end, device drained) and of every validation run; `path`: where
    the JSON goes when the stage tears down."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.steps: list[float] = []
        self.validations: list[float] = []
        self.batch_sizes: list[int] = []
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        _sync()
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        _sync()
        self.steps.append(time.perf_counter() - self._start)
        self.batch_sizes.append(_batch_size(batch))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync()
        self._start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync()
        if not trainer.sanity_checking:
            self.validations.append(time.perf_counter() - self._start)

    def summary(self) -> dict[str, Any]:
        timed = self.steps[1:] or self.steps  # the first step pays for warm-up (allocations, kernel selection)
        return {
            "steps": len(self.steps),
            "step_seconds": self.steps,
            "batch_sizes": self.batch_sizes,
            "median_step_seconds": statistics.median(timed) if timed else None,
            "validation_seconds": self.validations,
        }

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and (self.steps or self.validations):
            write_json(self.path, self.summary())


def _batch_size(batch: Any) -> int:
    """Examples in a batch: a task batch's tasks, a tensor's or a (tensor, ...) tuple's first dimension."""
    if hasattr(batch, "n_tasks"):
        return int(batch.n_tasks)
    first = batch[0] if isinstance(batch, list | tuple) and batch else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1
