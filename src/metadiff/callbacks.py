"""Callbacks of our own. `KillAfterBatches` is for resume tests and drills: it kills the process like `kill -9`."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl

PHASES = ("train", "validation", "test", "predict")


class KillAfterBatches(pl.Callback):
    """SIGKILL this process after `after` batches of `phase`: nothing is flushed or cleaned up, as in a crash or a
    pre-empted job, so what survives on disk is exactly what a real kill would leave."""

    def __init__(self, after: int, phase: str = "train"):
        if phase not in PHASES:
            raise ValueError(f"phase '{phase}' is not one of {PHASES}")
        self.after, self.phase, self.seen = after, phase, 0

    def _count(self) -> None:
        self.seen += 1
        if self.seen >= self.after:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.phase == "train":
            self._count()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.phase == "validation":
            self._count()

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.phase == "test":
            self._count()

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.phase == "predict":
            self._count()
