"""N-way K-shot Q-query episodes (spec §2.5).

An episode picks `n_way` classes and, per class, `k_shot + n_query` distinct images. Indices are laid out
class-major, support block first: [support of c1..cN][queries of c1..cN], so the episode label of support item i
is i // K and of query item j is j // Q (the FRN layout of the original's meta-test).

* Training episodes are random; episode e of epoch `epoch` depends only on (seed, epoch), so a resumed run draws the
  same ones (Lightning calls `set_epoch`).
* Evaluation episodes are a fixed list drawn once from the seed: every method, run and process scores the same ones.
Batches of several episodes are one flat index list; `EpisodeCollate` reshapes it back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from einops import rearrange
from torch.utils.data import Sampler

from metadiff.config import ConfigError
from metadiff.utils.rng import keyed_seed


@dataclass(frozen=True)
class EpisodeShape:
    n_way: int = 5
    k_shot: int = 1
    n_query: int = 15

    @property
    def size(self) -> int:
        return self.n_way * (self.k_shot + self.n_query)


def draw_episode(by_class: list[torch.Tensor], shape: EpisodeShape, gen: torch.Generator) -> torch.Tensor:
    """Flat indices of one episode in the class-major, support-first layout."""
    classes = torch.randperm(len(by_class), generator=gen)[: shape.n_way]
    picks = []
    for c in classes.tolist():
        pool = by_class[c]
        picks.append(pool[torch.randperm(len(pool), generator=gen)[: shape.k_shot + shape.n_query]])
    per_class = torch.stack(picks)  # [N, K + Q]
    return torch.cat([per_class[:, : shape.k_shot].flatten(), per_class[:, shape.k_shot :].flatten()])


def group_by_class(targets: torch.Tensor, shape: EpisodeShape, what: str) -> list[torch.Tensor]:
    classes = torch.unique(targets)
    by_class = [torch.nonzero(targets == c, as_tuple=True)[0] for c in classes]
    if len(by_class) < shape.n_way:
        raise ConfigError(f"{what}: {len(by_class)} classes, fewer than n_way={shape.n_way}")
    smallest = min(len(b) for b in by_class)
    if smallest < shape.k_shot + shape.n_query:
        raise ConfigError(
            f"{what}: a class has only {smallest} images; k_shot + n_query = {shape.k_shot + shape.n_query} are needed"
        )
    return by_class


class EpisodeSampler(Sampler[list[int]]):
    """Batches of `episodes_per_batch` episodes as flat index lists (a DataLoader `batch_sampler`).

    `fixed=True`: the evaluation list, drawn once at construction. `rank/world_size` shard the episodes across
    processes (rank r takes episodes r, r + W, ...), so DDP evaluation covers each episode exactly once."""

    def __init__(
        self,
        targets: torch.Tensor,
        shape: EpisodeShape,
        n_episodes: int,
        episodes_per_batch: int = 1,
        seed: int = 0,
        fixed: bool = False,
        rank: int = 0,
        world_size: int = 1,
        what: str = "episodes",
    ):
        self.shape, self.n_episodes, self.per_batch = shape, n_episodes, episodes_per_batch
        self.seed, self.fixed, self.rank, self.world_size, self.epoch = seed, fixed, rank, world_size, 0
        self.by_class = group_by_class(torch.as_tensor(targets), shape, what)
        self.episodes = self._draw(seed) if fixed else None

    def _draw(self, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.stack([draw_episode(self.by_class, self.shape, gen) for _ in range(self.n_episodes)])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def all_episodes(self) -> torch.Tensor:
        """[n_episodes, episode size] indices of this epoch (every rank's)."""
        if self.episodes is not None:
            return self.episodes
        return self._draw(keyed_seed(self.seed, self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.all_episodes()[self.rank :: self.world_size]
        for start in range(0, len(mine), self.per_batch):
            yield mine[start : start + self.per_batch].flatten().tolist()

    def __len__(self) -> int:
        mine = len(range(self.rank, self.n_episodes, self.world_size))
        return (mine + self.per_batch - 1) // self.per_batch


@dataclass
class Episodes:
    """A batch of B episodes: support [B, N*K, C, H, W] / query [B, N*Q, C, H, W], episode labels, global labels."""

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    query_classes: torch.Tensor

    def pin_memory(self) -> Episodes:
        """Every field in pinned memory: what a DataLoader with `pin_memory=True` calls on a batch type of its own
        (it pins only tensors and standard collections itself)."""
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)}
        )


class EpisodeCollate:
    def __init__(self, shape: EpisodeShape):
        self.shape = shape

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> Episodes:
        s = self.shape
        images = torch.stack([img for img, _ in items])
        labels = torch.tensor([lab for _, lab in items])
        images = rearrange(images, "(b e) c h w -> b e c h w", e=s.size)
        labels = rearrange(labels, "(b e) -> b e", e=s.size)
        n_support = s.n_way * s.k_shot
        b = images.shape[0]
        support_labels = torch.arange(s.n_way).repeat_interleave(s.k_shot).expand(b, -1)
        query_labels = torch.arange(s.n_way).repeat_interleave(s.n_query).expand(b, -1)
        return Episodes(
            images[:, :n_support],
            support_labels.clone(),
            images[:, n_support:],
            query_labels.clone(),
            labels[:, n_support:],
        )
