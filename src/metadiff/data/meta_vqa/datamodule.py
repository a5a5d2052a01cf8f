"""DataModule of the meta-learning stages: batches of whole tasks over a feature store.

Views follow the spec (§2.5): meta-training uses support = `test` split, query = `train` split; every evaluation
uses support = `train`, query = `test`. The feature store comes from the upstream `features` stage (or a path).

Validation loaders are [meta_train (how well it fits), meta_val (what selection may read)]; only the test loader
reads meta_test. A source without meta-val (`data.source.meta_val.fraction: 0`, the authors' split) validates on
meta-test as the original did (spec §8 B24): `tasks["meta_val"]` is then the meta-test tasks, with a warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TypedDict

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler

from metadiff.config import ConfigError
from metadiff.data.global_batch import training_shard
from metadiff.data.meta_vqa.batches import TaskEpisodes, collate_tasks
from metadiff.data.meta_vqa.tasks import Task
from metadiff.data.pinning import pin_memory
from metadiff.data.samplers import EpochOrder, EveryRankSampler
from metadiff.data.sources import META_SPLITS, TaskSource
from metadiff.features.store import FeatureStore
from metadiff.store import Artifact

log = logging.getLogger(__name__)

EVAL_SPLITS = ("meta_train", "meta_val")  # val dataloader order: how well it fits, how well it generalises


def split_tasks(source: TaskSource) -> dict[str, list[Task]]:
    """The tasks of every split as the stages see them: `meta_val` falls back to the meta-test tasks when the source
    has no meta-val split (fraction 0), the original's protocol, chosen in the config and said in the log."""
    tasks = {split: source.tasks(split) for split in META_SPLITS}
    if not tasks["meta_val"]:
        log.warning(
            "data.source.meta_val.fraction = 0: no meta-val split, validation reads the %d META-TEST tasks "
            "(the original's protocol): val/* metrics and anything selected on them have seen meta-test",
            len(tasks["meta_test"]),
        )
        tasks["meta_val"] = tasks["meta_test"]
    return tasks


def upstream_store_dir(upstream: dict[str, Artifact]) -> str:
    """Where the upstream `features` stage wrote its feature store: stored relative to the artifact (absolute in
    artifacts written before stores were relocatable; joining keeps those)."""
    features = upstream["features"]
    stored = json.loads(features.file("features.json").read_text())["store_dir"]
    return str((features.path / stored).resolve())


class LoaderOptions(TypedDict):
    """`MetaTaskDataModule.loader_options`: DataLoader keyword arguments."""

    num_workers: int
    persistent_workers: bool
    pin_memory: bool


class MetaTaskDataModule(pl.LightningDataModule):
    def __init__(
        self,
        source: TaskSource,
        tasks_per_batch: int = 32,
        eval_tasks_per_batch: int = 64,
        train_support_view: str = "test",
        train_query_view: str = "train",
        support_shots: int | None = None,
        n_shot_seed: int = 42,
        max_val_tasks: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        store_dir: str | None = None,
        upstream: dict[str, Artifact] | None = None,
        pin_memory: bool = False,
        drop_last: bool = True,
    ):
        """`num_workers`: DataLoader workers that gather and pad the tasks (the batches are those of one process:
        every task's views are drawn from (seed, epoch, task), and the order in this process); `pin_memory`: pin
        the batches when they go to a CUDA device (`metadiff.data.pinning`); `drop_last`: training drops the
        incomplete last batch of an epoch, so every step trains on the global batch in any world size
        (`global_batch.check_last_batch_shares`)."""
        super().__init__()
        self.source = source
        if store_dir is None:
            if not upstream or "features" not in upstream:
                raise ConfigError("data.store_dir is null and there is no upstream 'features' stage: set one of them")
            store_dir = upstream_store_dir(upstream)
        self.store_dir = Path(store_dir)
        self.tasks_per_batch, self.eval_tasks_per_batch = tasks_per_batch, eval_tasks_per_batch
        self.train_views = (train_support_view, train_query_view)
        self.support_shots, self.n_shot_seed, self.seed = support_shots, n_shot_seed, seed
        self.max_val_tasks, self.num_workers, self.shuffle = max_val_tasks, num_workers, shuffle
        self.pin_memory, self.drop_last = pin_memory, drop_last

    def setup(self, stage: str) -> None:
        self.store = FeatureStore(self.store_dir)
        self.tasks = split_tasks(self.source)
        self.embed_dim = self.store.dim

    def episodes(
        self,
        split: str,
        support_view: str = "train",
        query_view: str = "test",
        support_shots: int | None = None,
        n_shot_seed: int | None = None,
        limit: int | None = None,
    ) -> TaskEpisodes:
        tasks = self.tasks[split][:limit] if limit else self.tasks[split]
        return TaskEpisodes(
            tasks,
            self.store,
            support_view,
            query_view,
            support_shots,
            self.n_shot_seed if n_shot_seed is None else n_shot_seed,
            seed=self.seed,
        )

    def task_loader(
        self, episodes: TaskEpisodes, batch_size: int, shuffle: bool, split_ranks: bool = False
    ) -> DataLoader:
        """Batches of whole tasks. `split_ranks` (training): `batch_size` is the global batch, and under DDP each rank
        takes every N-th task of one seeded order of the epoch (`EpochOrder`, the same on every rank whatever else a
        rank drew), so the ranks together train on global batches: without shuffling exactly the one-process batches;
        with it a permutation of (seed, epoch) rather than the one-process run's draw from the global RNG, which
        Lightning re-seeds when it sets DDP up (one process keeps `DataLoader(shuffle=True)`, so its results stay as
        they were). Evaluation loaders (`split_ranks=False`) give every
        rank all tasks in order (`EveryRankSampler`): the stages' per-task values are then those of one process,
        computed without a gather (Lightning's sampler would pad odd task counts with a duplicate of task 0 and
        interleave the ranks' tasks)."""
        sampler: Sampler[int] | None = None
        drop_last = split_ranks and self.drop_last  # evaluation keeps every task
        if split_ranks:
            order = EpochOrder(len(episodes), self.seed, episodes.epoch, shuffle)
            sampler, batch_size = training_shard(episodes, order, batch_size, drop_last, "data.tasks_per_batch")
            shuffle = shuffle and sampler is None
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler, shuffle = EveryRankSampler(episodes), False
        return DataLoader(
            episodes,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            collate_fn=collate_tasks,
            drop_last=drop_last,
            **self.loader_options(),
        )

    def loader_options(self) -> LoaderOptions:
        """The DataLoader settings every loader of these stages shares: workers kept between epochs (a short epoch
        would otherwise start them again each time) and pinned batches on CUDA."""
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": pin_memory(self.trainer, self.pin_memory),
        }

    def train_dataloader(self) -> DataLoader:
        episodes = self.episodes("meta_train", *self.train_views, support_shots=self.support_shots)
        if self.trainer is not None:
            episodes.set_epoch(self.trainer.current_epoch)
        return self.task_loader(episodes, self.tasks_per_batch, shuffle=self.shuffle, split_ranks=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            self.task_loader(self.episodes(split, limit=self.max_val_tasks), self.eval_tasks_per_batch, False)
            for split in EVAL_SPLITS
        ]

    def test_dataloader(self) -> DataLoader:
        return self.task_loader(self.episodes("meta_test"), self.eval_tasks_per_batch, False)
