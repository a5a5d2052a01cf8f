"""The original's epoch LR table ([[first_epoch, lr], ...]: 0.1 / 0.006 / 0.0012 / 0.00024) as a torch LR scheduler.

A scheduler, not LRs set by hand each epoch, so Lightning saves and restores its position with every checkpoint.
Hand-written because torch's schedulers scale the optimizer's initial LR by a factor (`LambdaLR`, `MultiStepLR`),
which would give the table's values only up to float rounding; this one returns them exactly.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler

from metadiff.config import ConfigError


def lr_at(lut: list[list[float]], epoch: int) -> float:
    """The LR of `epoch` from a look-up table [[first_epoch, lr], ...] sorted by epoch."""
    lr = None
    for first, value in lut:
        if epoch >= first:
            lr = float(value)
    if lr is None:
        raise ConfigError(f"model.lr_lut={lut}: no entry covers epoch {epoch} (the first must start at 0)")
    return lr


class TableLR(LRScheduler):
    """LR of epoch e = `scale` · lr_at(table, e) for every param group; stepped once per epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, table: list[list[float]], scale: float = 1.0) -> None:
        lr_at(table, 0)  # a table that does not start at epoch 0 fails here, in one line
        self.table, self.scale = [list(entry) for entry in table], scale
        super().__init__(optimizer)

    def get_lr(self) -> list[float | torch.Tensor]:  # LRScheduler's signature; these are floats
        lr = lr_at(self.table, self.last_epoch)
        return [lr * self.scale for _ in self.optimizer.param_groups]  # x * 1.0 == x: the table exactly
