"""Batches of whole tasks for the meta-learning stages: padded feature tensors with masks.

Tasks differ in answers (2..200) and examples (21..1,776); the batched inner loops (`torch.func.vmap` over tasks)
need one rectangular tensor per field, so examples and answers are padded and masked. Labels of padded rows are 0
and must be ignored through the masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from metadiff.data.meta_vqa.tasks import Task
from metadiff.data.meta_vqa.views import Example, n_shot, split_random_disjoint, task_view
from metadiff.features.store import FeatureStore


@dataclass
class TaskBatch:
    """T tasks: support/query image features [T, N, e] with labels [T, N] and masks, answers [T, A, e], question [T, e]."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    support_mask: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    query_mask: torch.Tensor
    answers: torch.Tensor
    answer_mask: torch.Tensor
    question: torch.Tensor
    task_index: torch.Tensor

    @property
    def n_tasks(self) -> int:
        return int(self.question.shape[0])

    def pin_memory(self) -> TaskBatch:
        """Every field in pinned memory: what a DataLoader with `pin_memory=True` calls on a batch type of its own
        (it pins only tensors and standard collections itself)."""
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)}
        )


@dataclass
class TaskExample:
    """One task's tensors before padding."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    answers: torch.Tensor
    question: torch.Tensor
    task_index: int


class TaskEpisodes(Dataset):
    """Item i = task i seen through a support view and a query view (spec §2.5 defaults: meta-training uses
    support=`test`, query=`train`; evaluation uses support=`train`, query=`test`). `query_view="disjoint_random"`
    re-splits train + test at random into disjoint support and query (MAML's `val_subtype=random`)."""

    def __init__(
        self,
        tasks: Sequence[Task],
        store: FeatureStore,
        support_view: str,
        query_view: str,
        support_shots: int | None = None,
        n_shot_seed: int = 42,
        seed: int = 0,
    ):
        self.tasks, self.store = list(tasks), store
        self.support_view, self.query_view = support_view, query_view
        self.support_shots, self.n_shot_seed, self.seed = support_shots, n_shot_seed, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Random views change every epoch but stay reproducible (as `DistributedSampler.set_epoch`)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.tasks)

    def _features(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.asarray(self.store.images([name for name, _ in examples]), dtype=np.float32))
        return x, torch.tensor([label for _, label in examples], dtype=torch.long)

    def __getitem__(self, i: int) -> TaskExample:
        task = self.tasks[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if self.query_view == "disjoint_random":
            support, query = split_random_disjoint(task, rng)
        else:
            support = task_view(task, self.support_view, rng)
            query = task_view(task, self.query_view, rng)
        support = n_shot(support, task.n_answers, self.support_shots, self.n_shot_seed)
        sx, sy = self._features(support)
        qx, qy = self._features(query)
        answers = torch.from_numpy(np.asarray(self.store.answers(task.question), dtype=np.float32))
        question = torch.from_numpy(np.asarray(self.store.question(task.question), dtype=np.float32))
        return TaskExample(sx, sy, qx, qy, answers, question.reshape(-1), i)


def _pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([r.shape[0] for r in rows])
    padded = pad_sequence(rows, batch_first=True)
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    return padded, mask


def collate_tasks(items: Sequence[TaskExample]) -> TaskBatch:
    """Pad examples and answers of several tasks into one `TaskBatch`."""
    support_x, support_mask = _pad([it.support_x for it in items])
    query_x, query_mask = _pad([it.query_x for it in items])
    answers, answer_mask = _pad([it.answers for it in items])
    return TaskBatch(
        support_x=support_x,
        support_y=_pad([it.support_y for it in items])[0],
        support_mask=support_mask,
        query_x=query_x,
        query_y=_pad([it.query_y for it in items])[0],
        query_mask=query_mask,
        answers=answers,
        answer_mask=answer_mask,
        question=torch.stack([it.question for it in items]),
        task_index=torch.tensor([it.task_index for it in items]),
    )
