"""Simple baselines that show a Meta-VQA-shaped benchmark is learnable but not trivial.

- majority: predict each task's most frequent `train` answer on its `test` split (no features at all);
- prototype: nearest class centroid of the task's `train` image features (cosine), scored on `test`;
- zero-shot: argmax cosine between the image and the task's answer-prompt embeddings (no task data).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from metadiff.data.meta_vqa.tasks import Task
from metadiff.eval.stats import mean_ci95
from metadiff.features.store import FeatureStore


def _labels(examples: Sequence[tuple[str, int]]) -> torch.Tensor:
    return torch.tensor([label for _, label in examples])


def majority_accuracy(task: Task) -> float:
    counts = torch.bincount(_labels(task.train), minlength=task.n_answers)
    return float((_labels(task.test) == counts.argmax()).float().mean())


def prototype_accuracy(task: Task, store: FeatureStore) -> float:
    support = F.normalize(torch.from_numpy(store.images([n for n, _ in task.train])), dim=-1)
    query = F.normalize(torch.from_numpy(store.images([n for n, _ in task.test])), dim=-1)
    labels = _labels(task.train)
    centroids = torch.zeros(task.n_answers, support.shape[1]).index_add_(0, labels, support)
    present = torch.bincount(labels, minlength=task.n_answers) > 0
    scores = query @ F.normalize(centroids, dim=-1).T
    scores[:, ~present] = -torch.inf
    return float((scores.argmax(-1) == _labels(task.test)).float().mean())


def zeroshot_accuracy(task: Task, store: FeatureStore) -> float:
    query = F.normalize(torch.from_numpy(store.images([n for n, _ in task.test])), dim=-1)
    answers = F.normalize(torch.from_numpy(store.answers(task.question)), dim=-1)
    return float(((query @ answers.T).argmax(-1) == _labels(task.test)).float().mean())


def baseline_report(tasks: Sequence[Task], store: FeatureStore, prefix: str) -> dict[str, float]:
    """Mean and 95% CI over tasks of every baseline, plus chance (mean 1/A)."""
    out: dict[str, float] = {f"{prefix}/chance": float(torch.tensor([1 / t.n_answers for t in tasks]).mean())}
    for name, fn in (
        ("majority", majority_accuracy),
        ("prototype", lambda t: prototype_accuracy(t, store)),
        ("zeroshot", lambda t: zeroshot_accuracy(t, store)),
    ):
        mean, ci = mean_ci95([fn(t) for t in tasks])
        out[f"{prefix}/{name}_acc"], out[f"{prefix}/{name}_acc_ci95"] = mean, ci
    return out
