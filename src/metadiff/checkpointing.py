"""How often a run writes the checkpoint it resumes from, and what that checkpoint holds.

A checkpoint of a real-size stage is large (an ADM zoo member with Adam and its EMA: ~1.9 GB) and its epochs can be
short (549 of them per member), so Lightning's per-epoch `ModelCheckpoint` would write terabytes. `SpacedCheckpoint`
writes one file, `last.ckpt`, at the end of a training epoch only when it is due: at least `min_interval_s` seconds
after the previous one, and only while the time this run has spent writing checkpoints is at most `max_io_fraction`
of the time it has trained (1.0: no bound). Epoch ends only, because a resumed run is exact only from an epoch
boundary: Lightning cannot resume a plain DataLoader mid-epoch.

Why by hand: Lightning's triggers (`every_n_epochs`, `every_n_train_steps`, `train_time_interval`) are mutually
exclusive, and its time trigger fires mid-epoch; none bounds the share of time spent writing. The file is written by
`Trainer.save_checkpoint` (atomic: temporary file, then rename) under the name ModelCheckpoint gives `last`, so
`ckpt_path=last` finds it as it finds Lightning's own.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class SpacedCheckpoint(ModelCheckpoint):
    """`last.ckpt` at epoch ends, spaced by time and by a bound on the share of training time spent writing it."""

    def __init__(self, min_interval_s: float, max_io_fraction: float, **kwargs: Any) -> None:
        if min_interval_s < 0 or not 0.0 < max_io_fraction <= 1.0:
            raise ValueError(
                f"callbacks.model_checkpoint: min_interval_s {min_interval_s} must be >= 0 and "
                f"max_io_fraction {max_io_fraction} in (0, 1]"
            )
        # one file, written by this class only: no top-k files, no Lightning-triggered saves
        super().__init__(save_top_k=0, save_last=True, save_on_train_epoch_end=True, **kwargs)
        self.min_interval_s, self.max_io_fraction = float(min_interval_s), float(max_io_fraction)
        self.saves, self.save_seconds = 0, 0.0
        self._start = self._last = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = self._last = time.monotonic()
        self.saves, self.save_seconds = 0, 0.0

    def _due(self) -> bool:
        now = time.monotonic()
        return now - self._last >= self.min_interval_s and self.save_seconds <= self.max_io_fraction * (
            now - self._start
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # fast_dev_run: set on the Trainer by its debugging-flags connector, not declared on the class
        if trainer.fast_dev_run or trainer.sanity_checking:  # type: ignore[attr-defined]
            return
        # rank 0's clock decides for every rank: saving is collective, a rank that skipped it would hang the others
        if not trainer.strategy.broadcast(self._due()):
            return
        start = time.monotonic()
        path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        self.last_model_path = path  # before saving: it is part of this callback's state in the file
        trainer.save_checkpoint(path)
        self._last = time.monotonic()
        self.saves, self.save_seconds = self.saves + 1, self.save_seconds + (self._last - start)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing more at the end of training: Lightning's ModelCheckpoint writes `last` again here, an unspaced
        full write; a run that stops in its test phase resumes from its last spaced checkpoint."""
