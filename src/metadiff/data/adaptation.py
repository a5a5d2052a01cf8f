"""The adaptation dataset (spec §4.4): task latents fine-tuned from the HNET (or VAE) init, as the training set of the
VAE, HyperCLIP and HyperLDM stages.

Artifact file `adaptation.pt` (a dict of CPU tensors and lists, loadable with `weights_only=True`):
- `train_latents` [E, N, d]: E repetitions ("rows") of every meta-train task, each fine-tuned on a fresh random view;
- `eval_latents` {split: [N_split, d]} for meta_train, meta_val, meta_test: one fine-tune per task on its `train`
  split (the evaluation protocol; meta_val holds the meta-test latents when there is no meta-val split);
- `train_questions` [N, e]: each meta-train task's question embedding (the conditioning signal);
- `tasks` {split: [question, ...]}: task identity, in the task-file order the rows use;
- `init_latent` [d], `latent_mean` [d], `latent_std` [d] (over all rows, clipped below: the normalisation of §4.7).
Consumers draw one random row per epoch and iterate over its tasks (spec §4.4), reproducibly from the seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from metadiff.config import ConfigError
from metadiff.data.global_batch import training_shard
from metadiff.data.meta_vqa.datamodule import MetaTaskDataModule
from metadiff.data.meta_vqa.tasks import Task
from metadiff.data.samplers import EpochOrder
from metadiff.data.sources import META_SPLITS, TaskSource
from metadiff.store import Artifact, ArtifactMismatchError

ADAPTATION_FILE = "adaptation.pt"


def task_list_hash(questions: list[str]) -> str:
    return hashlib.sha256("\n".join(questions).encode()).hexdigest()[:12]


@dataclass
class AdaptationData:
    train_latents: torch.Tensor
    eval_latents: dict[str, torch.Tensor]
    train_questions: torch.Tensor
    tasks: dict[str, list[str]]
    init_latent: torch.Tensor
    latent_mean: torch.Tensor
    latent_std: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.train_latents.shape[0])

    @property
    def latent_dim(self) -> int:
        return int(self.train_latents.shape[-1])

    def save(self, path: Path) -> None:
        torch.save(self.__dict__, path)

    @classmethod
    def load(cls, artifact: Artifact) -> AdaptationData:
        path = artifact.file(ADAPTATION_FILE)
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            return cls(**raw)
        except (RuntimeError, TypeError, EOFError, KeyError) as err:
            raise ArtifactMismatchError(f"{path}: not a readable adaptation dataset ({err})") from None

    def check_tasks(self, tasks: dict[str, list[Task]], where: Path) -> None:
        """Refuse a dataset built for other tasks than this run's data: rows index tasks by position."""
        for split, mine in tasks.items():
            built = self.tasks.get(split, [])
            questions = [t.question for t in mine]
            if questions != built:
                raise ArtifactMismatchError(
                    f"adaptation dataset {where} was built for {len(built)} {split} tasks (hash "
                    f"{task_list_hash(built)}), but this run's data has {len(questions)} (hash "
                    f"{task_list_hash(questions)}): rebuild it with this run's data config"
                )


class LatentRows(Dataset):
    """Item j = (latent, question embedding, task index) of the epoch's rows: `rows_per_epoch` rows drawn without
    replacement per epoch (spec §4.4: 1, each epoch one fresh fine-tune of every task), items row-major."""

    def __init__(self, data: AdaptationData, seed: int, rows_per_epoch: int | None = 1):
        rows_per_epoch = data.rows if rows_per_epoch is None else rows_per_epoch  # None: every row, every epoch
        if not 1 <= rows_per_epoch <= data.rows:
            raise ConfigError(f"data.rows_per_epoch = {rows_per_epoch}: expected 1 to the dataset's {data.rows} rows")
        self.data, self.seed, self.rows_per_epoch = data, seed, rows_per_epoch
        self.epoch_rows = torch.arange(rows_per_epoch)

    @property
    def row(self) -> int:
        """The epoch's first row (its only one when rows_per_epoch = 1)."""
        return int(self.epoch_rows[0])

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        if self.rows_per_epoch == 1:  # the draw of earlier versions: the same row for the same (seed, epoch)
            self.epoch_rows = torch.tensor([int(rng.integers(self.data.rows))])
        else:
            self.epoch_rows = torch.from_numpy(rng.permutation(self.data.rows)[: self.rows_per_epoch])

    def __len__(self) -> int:
        return int(self.data.train_latents.shape[1]) * self.rows_per_epoch

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        n = int(self.data.train_latents.shape[1])
        row, i = int(self.epoch_rows[j // n]), j % n
        return self.data.train_latents[row, i], self.data.train_questions[i], i


class AdaptationDataModule(MetaTaskDataModule):
    """Training batches of (latent, question) pairs from the adaptation dataset; validation/test batches of whole
    tasks (support = train split, query = test split) whose fine-tuned latents are `data.eval_latents[split]`."""

    def __init__(
        self,
        source: TaskSource,
        *,
        latents_per_batch: int = 32,
        rows_per_epoch: int | None = 1,
        upstream: dict[str, Artifact] | None = None,
        **kwargs,
    ):
        super().__init__(source, upstream=upstream, **kwargs)
        if not upstream or "adaptation" not in upstream:
            raise ConfigError("this stage needs an upstream 'adaptation' dataset (upstream.adaptation in its config)")
        self.adaptation_artifact = upstream["adaptation"]
        self.latents_per_batch, self.rows_per_epoch = latents_per_batch, rows_per_epoch

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not hasattr(self, "adaptation"):  # fit then test: read and check the dataset once
            self.adaptation = AdaptationData.load(self.adaptation_artifact)
            self.adaptation.check_tasks({s: self.tasks[s] for s in META_SPLITS}, self.adaptation_artifact.path)

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        rows = LatentRows(self.adaptation, self.seed, self.rows_per_epoch)
        rows.set_epoch(epoch)
        order = EpochOrder(len(rows), self.seed, epoch, self.shuffle)
        # global: each rank loads its share of every batch of one process
        shard, batch_size = training_shard(
            rows, order, self.latents_per_batch, self.drop_last, "data.latents_per_batch"
        )
        return DataLoader(
            rows, batch_size=batch_size, sampler=shard or order, drop_last=self.drop_last, **self.loader_options()
        )
