"""Batch sizes in the configs are global: what one optimiser step trains on, summed over every DDP rank.

Why: Lightning's convention is a per-rank batch, so the same experiment on 8 GPUs trains on 8x the tasks or images
per step, a different recipe from the one on 1 GPU, and a result would depend on the machine that produced it. With
global sizes the world size changes neither the recipe nor the artifact's identity (`metadiff.store` leaves the
devices, nodes and strategy out of the fingerprint); each rank loads `global // world_size`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Protocol, cast

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset, DistributedSampler

from metadiff.config import ConfigError


def world_size(trainer: pl.Trainer | None) -> int:
    """The number of ranks that share each step: the trainer's, or 1 before there is one."""
    return trainer.world_size if trainer is not None else 1


def rank(trainer: pl.Trainer | None) -> int:
    return trainer.global_rank if trainer is not None else 0


def per_rank_batch(global_batch: int, world: int, key: str) -> int:
    """The share of a global batch that one of `world` ranks loads; refused in one line when it does not divide."""
    if global_batch < 1 or global_batch % world:
        raise ConfigError(
            f"{key}={global_batch}: a global batch size must be a positive multiple of the number of "
            f"ranks ({world}); each rank loads {key} / {world}"
        )
    return global_batch // world


class SizedOrder(Protocol):
    """An epoch's order of item indices with its length, e.g. `metadiff.data.samplers.EpochOrder`."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[int]: ...


class EpochOrderShard(DistributedSampler):
    """Rank r's share (every `world`-th item) of a seeded order that one process iterates whole, e.g. `EpochOrder`:
    the ranks' batch b together are the one-process batch b. A DistributedSampler subclass so that Lightning keeps it;
    items past the last multiple of `world` are dropped."""

    def __init__(self, dataset: Sized, order: SizedOrder, rank: int, world: int):
        # DistributedSampler reads only len(dataset); its stub asks for a Dataset
        super().__init__(cast(Dataset, dataset), num_replicas=world, rank=rank, shuffle=False, drop_last=True)
        self.order, self.world = order, world

    def __len__(self) -> int:
        return len(self.order) // self.world

    def __iter__(self) -> Iterator[int]:
        yield from list(self.order)[self.rank : len(self) * self.world : self.world]


def check_last_batch_shares(n_items: int, world: int, drop_last: bool, key: str) -> None:
    """Keeping the incomplete last batch of an epoch (`drop_last=false`) gives the one-process recipe under DDP only
    when every rank gets an equal share of it: each rank's loss is a mean over its own items and DDP averages the
    ranks, so unequal shares weigh items unequally, and `EpochOrderShard` drops the `n_items % world` items that would
    make them unequal. Refused in one line where that would happen, so the world size never changes the recipe."""
    if not drop_last and world > 1 and n_items % world:
        raise ConfigError(
            f"{key}=false with {n_items} training items on {world} ranks: the incomplete last batch of "
            f"each epoch cannot be shared equally (one process trains on {n_items % world} more items "
            f"than the ranks together); set {key}=true, which drops it in every world size"
        )


def check_epoch_has_a_step(n_items: int, global_batch: int, drop_last: bool, key: str) -> None:
    """Dropping the incomplete last batch of an epoch smaller than one batch would train nothing, silently."""
    if drop_last and n_items < global_batch:
        raise ConfigError(
            f"{key}={global_batch} but the epoch has {n_items} training items: with data.drop_last=true no step "
            f"would train; lower {key} or set data.drop_last=false"
        )


def training_shard(
    dataset: Sized, order: SizedOrder, global_batch: int, drop_last: bool, key: str
) -> tuple[EpochOrderShard | None, int]:
    """(this rank's sampler, its batch size) for a training loader whose `key` is a global batch over `order`, an
    epoch order of `dataset` that one process iterates whole: under DDP `EpochOrderShard` and `global // world`, in
    one process (None, the global batch), the loader keeping its own order. Checked first: an epoch with a step
    (`check_epoch_has_a_step`) and, under DDP, a last batch the ranks can share (`check_last_batch_shares`)."""
    check_epoch_has_a_step(len(dataset), global_batch, drop_last, key)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None, global_batch
    world = torch.distributed.get_world_size()
    batch_size = per_rank_batch(global_batch, world, key)
    check_last_batch_shares(len(dataset), world, drop_last, "data.drop_last")
    return EpochOrderShard(dataset, order, torch.distributed.get_rank(), world), batch_size
