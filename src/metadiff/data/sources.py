"""What every Meta-VQA-shaped benchmark offers the stages: tasks, prompts, images, and a fingerprint.

`SynthVQASource` (generated offline) and the real `MetaVQASource` (VQA v2 + COCO on disk) implement it, so the
CLIP, feature and meta-learning stages never know which one they run on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from metadiff.config import ConfigError
from metadiff.data.meta_vqa.tasks import Task, answer_prompt, load_prompts, load_task_file

META_SPLITS = ("meta_train", "meta_test")


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


class TaskFileSource:
    """Shared part of the sources whose tasks live in `meta_train.json` / `meta_test.json` under `root`.

    Subclasses set `self._root` in `prepare()` and may name a prompt file in `prompt_file()`.
    """

    _root: Path | None = None

    def prepare(self) -> None:
        raise NotImplementedError

    def prompt_file(self) -> Path | None:
        return None

    @property
    def root(self) -> Path:
        if self._root is None:
            self.prepare()
        assert self._root is not None
        return self._root

    @cached_property
    def _tasks(self) -> dict[str, list[Task]]:
        return {split: load_task_file(self.root / f"{split}.json") for split in META_SPLITS}

    @cached_property
    def _prompts(self) -> dict[str, str]:
        path = self.prompt_file()
        return load_prompts(path) if path is not None else {}

    def tasks(self, split: str) -> list[Task]:
        if split not in META_SPLITS:
            raise ValueError(f"unknown meta split '{split}' (expected meta_train or meta_test)")
        return self._tasks[split]

    def prompt_template(self, question: str) -> str | None:
        return self._prompts.get(question)


def dataclass_from_config(cls: type, values: Mapping[str, Any], key: str) -> Any:
    """Build a settings dataclass from a config node, naming the offending key on a typo (the YAML mirrors it)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{key}.{unknown[0]}' (valid keys: {sorted(names)})")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
