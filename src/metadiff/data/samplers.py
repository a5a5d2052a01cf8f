"""Samplers whose order is a pure function of (seed, epoch), so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from metadiff.utils.rng import keyed_generator


class EveryRankSampler(DistributedSampler):
    """Every item, in order, on every rank: evaluation that each rank runs whole, so its per-task values are exactly
    those of one process (no padding duplicates, no gather, the same batches and per-batch noise keys).

    Why a DistributedSampler of one replica: Lightning replaces an evaluation loader's sampler with a padded,
    rank-sharded one unless it already is a DistributedSampler (`use_distributed_sampler`); this one shards nothing.
    The cost is the evaluation repeated on each rank; the stages using it evaluate tasks in batches, not images."""

    def __init__(self, dataset: Dataset):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)


class EpochOrder(Sampler[int]):
    """The task order of epoch e as a function of (seed, e) only, however often it is iterated: Lightning iterates a
    fresh loader once more when it resumes from a checkpoint, which made a shuffling generator's order depend on
    whether the run had been resumed (measured: a different order at epoch 2 after a kill and resume)."""

    def __init__(self, n: int, seed: int, epoch: int = 0, shuffle: bool = True):
        self.n, self.seed, self.epoch, self.shuffle = n, seed, epoch, shuffle

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        gen = keyed_generator(self.seed, self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())


class StepOrder(Sampler[int]):
    """The images of optimiser step k as a function of (seed, k) only: a resumed run trains on exactly the batches
    an uninterrupted one would have, whatever Lightning's epoch bookkeeping does on restart.

    The sample stream is the concatenation of seeded permutations (one per pass over the data, cut to whole
    batches). Each `iter()` starts at the stream position of the trainer's current step (`position()` returns it,
    in samples) and yields one pass. Why not `set_epoch`: resuming from an end-of-epoch checkpoint, Lightning runs
    one more batch under the old epoch number and shifts every later epoch by one (measured with lightning 2.6:
    the resumed run drew epoch 2's order for the batches an uninterrupted run took from epoch 1)."""

    def __init__(
        self, n: int, batch_size: int, seed: int, position: Callable[[], int], rank: int = 0, world_size: int = 1
    ):
        # under DDP the stream is cut into global batches of batch_size x world_size, and rank r takes every
        # world_size-th index of each: together the ranks train on exactly the batches of one process
        self.n, self.seed, self.position, self.rank, self.world_size = n, seed, position, rank, world_size
        self.batch_size = batch_size * world_size
        self.per_pass = (n // self.batch_size) * self.batch_size

    def __len__(self) -> int:
        return self.per_pass // self.world_size

    def _perm(self, pass_index: int) -> torch.Tensor:
        gen = keyed_generator(self.seed, pass_index)
        return torch.randperm(self.n, generator=gen)[: self.per_pass]

    def __iter__(self) -> Iterator[int]:
        position, end = self.position(), self.position() + self.per_pass
        while position < end:
            pass_index, offset = divmod(position, self.per_pass)
            stop = min(end, (pass_index + 1) * self.per_pass)
            chunk = self._perm(pass_index)[offset : offset + stop - position]
            yield from chunk.view(-1, self.world_size)[:, self.rank].tolist()
            position = stop


class StepPositionMixin:
    """For DataModules whose training order is a `StepOrder`: the stream position of the next batch, and its
    checkpointing.

    Why saved: with DataLoader workers, Lightning creates the train iterator (whose workers prefetch, so the sampler
    reads its position at once) before it restores the loop counters, when `trainer.global_step` still reads 0
    (measured with lightning 2.6: a resumed run trained its first epoch on pass 0's order). The DataModule state is
    restored before that, so the position is the larger of the saved one and the trainer's."""

    _restored_samples: int = 0
    _step_batch_size: int = 0  # per rank; set by step_order(), so the batch size is stated once, where it is used

    def step_order(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> StepOrder:
        """The training order, starting at the position of the trainer's next step."""
        self._step_batch_size = batch_size
        return StepOrder(
            n, batch_size, seed, position=lambda: self.trained_samples(batch_size), rank=rank, world_size=world_size
        )

    def trained_samples(self, batch_size: int) -> int:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return self._restored_samples
        return max(
            self._restored_samples,
            trainer.global_step * trainer.accumulate_grad_batches * batch_size * trainer.world_size,
        )

    def state_dict(self) -> dict[str, int]:
        return {"trained_samples": self.trained_samples(self._step_batch_size)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._restored_samples = int(state.get("trained_samples", 0))
