"""DataModule of a many-class image set for the data-free family.

* train: images of the `train.split` classes (optionally one zoo member's class subset), minus `holdout_per_class`
  images per class that form the validation set (supervised stages: classifier accuracy / diffusion loss on unseen
  images). The order of epoch e depends only on (seed, e).
* data-free (`train.split: null`, the dfml stage): no real training image is ever loaded. The train loader only
  paces the epoch (`train.steps_per_epoch` step indices); the stage draws its episodes from the pseudo data it
  generates itself. Validation is fixed episodes of `episodes.val_split` (`episodes.n_val_episodes` per shot), the
  split that selects the checkpoint.
* test: fixed, seeded N-way K-shot episodes of `episodes.split`, one loader per K in `episodes.shots`
  (`test_on: episodes`), or the held-out images again (`test_on: holdout`, the diffusion stages).
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

from metadiff.config import ConfigError
from metadiff.config.typed import as_spec
from metadiff.data import global_batch
from metadiff.data.images.episodes import EpisodeCollate, EpisodeSampler, EpisodeShape
from metadiff.data.images.partition import zoo_partition
from metadiff.data.images.sources import ImageSource
from metadiff.data.images.splits import ImageSplit
from metadiff.data.pinning import pin_memory
from metadiff.data.samplers import StepPositionMixin


@dataclass(frozen=True)
class TrainSpec:
    """`data.train`: the real training images (`split: null`: data-free, the loader only paces the epoch)."""

    split: str | None
    batch_size: int
    eval_batch_size: int  # the held-out images' loader
    holdout_per_class: int  # per class, kept out of training: the validation images
    steps_per_epoch: int | None  # data-free runs only: step indices per epoch


@dataclass(frozen=True)
class EpisodesSpec:
    """`data.episodes`: the fixed, seeded evaluation episodes (spec §2.5, §5)."""

    split: str  # the test episodes' split
    n_way: int
    shots: list[int]  # one test loader per K
    n_query: int
    n_episodes: int
    episodes_per_batch: int
    seed: int
    val_split: str | None  # data-free runs only: the split of the validation episodes (checkpoint selection)
    n_val_episodes: int | None  # data-free runs only: validation episodes per shot


@dataclass(frozen=True)
class ClassSubsetSpec:
    """`data.class_subset`: train on the classes of one zoo member (`metadiff.data.images.partition`)."""

    n_models: int
    classes_per_model: int
    member: int


class FewShotImageDataModule(StepPositionMixin, pl.LightningDataModule):
    def __init__(
        self,
        source: ImageSource,
        train: TrainSpec,
        episodes: EpisodesSpec,
        num_workers: int = 0,
        seed: int = 0,
        class_subset: ClassSubsetSpec | None = None,
        test_on: str = "episodes",
        pin_memory: bool = False,
    ):
        """`pin_memory`: pin the batches when they go to a CUDA device (`metadiff.data.pinning`)."""
        super().__init__()
        self.pin_memory = pin_memory
        self.source = source
        self.train_cfg = as_spec(TrainSpec, train, "data.train")
        self.episode_cfg = as_spec(EpisodesSpec, episodes, "data.episodes")
        self.num_workers, self.seed = num_workers, seed
        self.class_subset = as_spec(ClassSubsetSpec, class_subset, "data.class_subset") if class_subset else None
        self.shots = [int(k) for k in self.episode_cfg.shots]
        if test_on not in ("episodes", "holdout"):
            raise ConfigError(
                f"data.test_on='{test_on}': expected 'episodes' (fixed few-shot episodes) or 'holdout' "
                "(the held-out images of the train classes)"
            )
        self.test_on = test_on
        self._splits: dict[str, ImageSplit] = {}

    # ------------------------------------------------------------------ splits
    def split(self, name: str) -> ImageSplit:
        if name not in self._splits:
            self._splits[name] = self.source.split(name)
        return self._splits[name]

    @property
    def data_free(self) -> bool:
        return self.train_cfg.split is None

    def _train_split_name(self) -> str:
        """data.train.split; refused where it is null (data-free: no real training images)."""
        if self.train_cfg.split is None:
            raise ConfigError("data.train.split is null (data-free): this stage has no real training classes")
        return self.train_cfg.split

    def train_classes(self) -> list[int]:
        """The classes this run trains on: all of the train split, or one zoo member's subset."""
        n = len(self.split(self._train_split_name()).classes)
        if self.class_subset is None:
            return list(range(n))
        sub = self.class_subset
        parts = zoo_partition(n, sub.n_models, sub.classes_per_model)
        if not 0 <= sub.member < len(parts):
            raise ConfigError(f"data.class_subset.member={sub.member}: expected 0..{len(parts) - 1}")
        return parts[sub.member]

    def _train_val_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        split = self.split(self._train_split_name())
        holdout = int(self.train_cfg.holdout_per_class)
        train, val = [], []
        for c in self.train_classes():
            idx = torch.nonzero(split.targets == c, as_tuple=True)[0]
            if holdout >= len(idx):
                raise ConfigError(
                    f"data.train.holdout_per_class={holdout} leaves no training image of class "
                    f"'{split.classes[c]}' ({len(idx)} images)"
                )
            val.append(idx[:holdout])
            train.append(idx[holdout:])
        return torch.cat(train), torch.cat(val)

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=pin_memory(self.trainer, self.pin_memory),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.data_free:
            steps = self.train_cfg.steps_per_epoch
            if not isinstance(steps, int) or steps < 1:
                raise ConfigError(f"data.train.steps_per_epoch={steps!r}: a data-free run needs a positive int")
            # a Tensor is a map-style dataset (len, indexing); torch's stub asks for a Dataset subclass
            return DataLoader(torch.arange(steps), batch_size=1)  # type: ignore[arg-type]
        train_idx, _ = self._train_val_indices()
        data = Subset(self.split(self._train_split_name()), train_idx.tolist())
        # the configured batch is global: StepOrder cuts the one-process batches, each rank loads its share
        rank, world = global_batch.rank(self.trainer), global_batch.world_size(self.trainer)
        batch_size = global_batch.per_rank_batch(int(self.train_cfg.batch_size), world, "data.train.batch_size")
        order = self.step_order(len(data), batch_size, self.seed, rank=rank, world_size=world)
        return self._loader(data, batch_size=batch_size, sampler=order, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.data_free:
            cfg = self.episode_cfg
            if cfg.val_split is None or cfg.n_val_episodes is None:
                raise ConfigError(
                    "data.episodes.val_split and data.episodes.n_val_episodes must be set in a data-free run "
                    "(its validation episodes)"
                )
            return [self.episode_loader(cfg.val_split, k, int(cfg.n_val_episodes)) for k in self.shots]
        _, val_idx = self._train_val_indices()
        if len(val_idx) == 0:
            return []
        data = Subset(self.split(self._train_split_name()), val_idx.tolist())
        return self._loader(data, batch_size=int(self.train_cfg.eval_batch_size), shuffle=False)

    def episode_loader(self, split: str, k_shot: int, n_episodes: int | None = None) -> DataLoader:
        """Fixed evaluation episodes of `split`: the same list in every run, process and method."""
        cfg = self.episode_cfg
        shape = EpisodeShape(int(cfg.n_way), k_shot, int(cfg.n_query))
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = EpisodeSampler(
            self.split(split).targets,
            shape,
            int(n_episodes or cfg.n_episodes),
            int(cfg.episodes_per_batch),
            seed=int(cfg.seed),
            fixed=True,
            rank=rank,
            world_size=world,
            what=f"episodes of {split}",
        )
        return self._loader(self.split(split), batch_sampler=sampler, collate_fn=EpisodeCollate(shape))

    def test_dataloader(self) -> list[DataLoader] | DataLoader:
        if self.test_on == "holdout":
            return self.val_dataloader()
        return [self.episode_loader(self.episode_cfg.split, k) for k in self.shots]
