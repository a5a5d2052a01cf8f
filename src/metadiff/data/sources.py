"""What every Meta-VQA-shaped benchmark offers the stages: tasks, prompts, images, and a fingerprint.

`SynthVQASource` (generated offline) and the real `MetaVQASource` (VQA v2 + COCO on disk) implement it, so the
CLIP, feature and meta-learning stages never know which one they run on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch.utils.data import Dataset

from metadiff.data.meta_vqa.tasks import Task, answer_prompt


class ImageSource(Protocol):
    """Benchmark images by name, already preprocessed for a CLIP image tower."""

    def image_names(self) -> list[str]: ...

    def image_dataset(
        self, names: Sequence[str], image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> Dataset: ...


class TaskSource(ImageSource, Protocol):
    name: str

    def prepare(self) -> None:
        """Build or check the data on disk (called once, on one process)."""

    def fingerprint(self) -> str: ...

    def tasks(self, split: str) -> list[Task]:
        """`split` is 'meta_train' or 'meta_test'."""

    def prompt_template(self, question: str) -> str | None: ...


def task_prompts(source: TaskSource, task: Task) -> list[str]:
    """The answer texts of a task, in answer order (spec §2.4)."""
    template = source.prompt_template(task.question)
    return [answer_prompt(template, a) for a in task.answers]


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] normalised like the CLIP image tower expects."""
    x = images.float().div(255.0).movedim(-1, -3)
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - m) / s
