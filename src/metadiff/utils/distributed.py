"""DDP helpers: a spawn strategy that exits cleanly, and gathering rows computed on different ranks."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy


class SpawnDDPStrategy(DDPStrategy):
    """`ddp_spawn` that destroys its process group when a phase (fit/validate/test) ends.

    Why: a spawned gloo worker that reaches interpreter exit with its process group alive can abort in the gloo
    destructor ("terminate called without an active exception", SIGABRT), which fails a run that had finished
    training. Every phase spawns fresh workers and builds a new group, so nothing needs the old one.
    """

    def __init__(self, **kwargs):
        super().__init__(start_method="spawn", **kwargs)

    def teardown(self) -> None:
        super().teardown()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def gather_rows(module: pl.LightningModule, index: torch.Tensor, values: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Scatter (index, values) from every rank into one [n_rows, ...] tensor present on every rank."""
    if module.trainer is None or module.trainer.world_size == 1:
        out = values.new_zeros((n_rows, *values.shape[1:]))
        out[index] = values
        return out
    count = torch.tensor([index.numel()], device=values.device)
    counts = module.all_gather(count).flatten()
    pad = int(counts.max()) - index.numel()
    index_p = torch.cat([index, index.new_full((pad,), -1)])
    values_p = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))])
    all_index = module.all_gather(index_p).flatten()
    all_values = module.all_gather(values_p).reshape(-1, *values.shape[1:])
    keep = all_index >= 0
    out = values.new_zeros((n_rows, *values.shape[1:]))
    out[all_index[keep]] = all_values[keep]
    return out
