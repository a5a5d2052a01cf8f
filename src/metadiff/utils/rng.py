"""Seeds of the random generators that steps, epochs, batches and ranks draw from.

Every draw that must be the same after a resume, under another rank count or in another process comes from a
`torch.Generator` seeded by the run's seed and the position it is for (step, epoch, batch, round), never from the
global RNG. One formula, so that two streams never meet by accident: the strides are primes above any count they
multiply (steps, batches, loaders, ranks)."""

from __future__ import annotations

import torch

KEY_STRIDE = 1_000_003  # above any step, batch, epoch or round index: (seed, key) pairs get distinct seeds
STREAM_STRIDE = 7_919  # above any number of loaders / sub-streams of one seed
RANK_STRIDE = 131  # above any world size


def keyed_seed(seed: int, key: int) -> int:
    """The seed of position `key` (a step, epoch, batch or round) of the stream `seed`."""
    return int(seed) * KEY_STRIDE + int(key)


def stream_seed(seed: int, stream: int) -> int:
    """A sub-stream of `seed` (e.g. one per dataloader)."""
    return int(seed) * STREAM_STRIDE + int(stream)


def rank_seed(seed: int, rank: int) -> int:
    """`seed` made distinct per rank (draws every rank makes for its own share)."""
    return int(seed) * RANK_STRIDE + int(rank)


def follower_rank_seed(seed: int, rank: int) -> int:
    """`seed` on rank 0 (a one-process run keeps its stream), `rank_seed` on the other ranks: for training draws
    (noise, timesteps) that would otherwise repeat on every rank, correlating the halves of a global batch."""
    return int(seed) if rank == 0 else rank_seed(seed, rank)


def generator(seed: int) -> torch.Generator:
    """A CPU generator at `seed` (draw on the CPU, then move: the same numbers on every device)."""
    return torch.Generator().manual_seed(int(seed))


def keyed_generator(seed: int, key: int) -> torch.Generator:
    """The generator of position `key` of the stream `seed`."""
    return generator(keyed_seed(seed, key))
