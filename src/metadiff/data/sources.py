"""What every Meta-VQA-shaped benchmark offers the stages: tasks, prompts, images, and a fingerprint.

`SynthVQASource` (generated offline) and the real `MetaVQASource` (VQA v2 + COCO on disk) implement it, so the
CLIP, feature and meta-learning stages never know which one they run on.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch.utils.data import Dataset

from metadiff.config import ConfigError
from metadiff.data.meta_vqa.tasks import Task, answer_prompt, load_prompts, load_task_file
from metadiff.utils.hashing import to_plain

log = logging.getLogger(__name__)

#: The task splits every source offers. `meta_val` is carved out of the task file's meta-train tasks (`MetaValSplit`);
#: the task files themselves hold only meta-train and meta-test, as the authors published them.
META_SPLITS = ("meta_train", "meta_val", "meta_test")
TASK_FILE_SPLITS = ("meta_train", "meta_test")


@dataclass(frozen=True)
class MetaValSplit:
    """Meta-validation tasks held out of the task file's meta-train tasks, so that validation, checkpoint choice,
    early stopping and sweeps never read meta-test (the original validated on meta-test, spec §8 B24).

    `round(fraction * N)` of the N meta-train tasks (at least one when fraction > 0), picked by a
    `random.Random(seed)` shuffle of their indices; both splits keep the task file's order. fraction = 0: no
    meta-val, the authors' split as published (validation then reads meta-test, see `MetaTaskDataModule`)."""

    fraction: float
    seed: int

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float) or not 0 <= self.fraction < 1:
            raise ConfigError(
                f"data.source.meta_val.fraction = {self.fraction!r}: expected a number in [0, 1) "
                "(0 = no meta-val: validate on meta-test as the original did)"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"data.source.meta_val.seed = {self.seed!r}: expected an integer")

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> MetaValSplit:
        """From the `data.source.meta_val` node; a typo, a missing key or a bad value is a ConfigError naming it."""
        plain = to_plain(values)
        if not isinstance(plain, Mapping):
            raise ConfigError(f"data.source.meta_val = {plain!r}: expected a mapping {{fraction: ..., seed: ...}}")
        return dataclass_from_config(cls, dict(plain), "data.source.meta_val")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0

    def describe(self) -> dict[str, float | int]:
        """What a fingerprint records of the split."""
        return {"fraction": float(self.fraction), "seed": int(self.seed)}

    def carve(self, meta_train: Sequence[Task]) -> tuple[list[Task], list[Task]]:
        """(meta-train without meta-val, meta-val), each in task-file order."""
        if not self.enabled:
            return list(meta_train), []
        order = list(range(len(meta_train)))
        random.Random(self.seed).shuffle(order)
        k = max(1, round(self.fraction * len(order)))
        if k >= len(order):
            raise ConfigError(
                f"data.source.meta_val.fraction = {self.fraction}: {k} meta-val tasks would leave none "
                f"of the {len(order)} meta-train tasks for training"
            )
        held = set(order[:k])
        return (
            [t for i, t in enumerate(meta_train) if i not in held],
            [t for i, t in enumerate(meta_train) if i in held],
        )


class ImageSource(Protocol):
    """Benchmark images by name, preprocessed for a CLIP image tower: `raw_image_dataset` decoded and sized, uint8
    [3, S, S] (what DataLoader workers hand over; `ImageNormalizer` finishes them where they are used),
    `image_dataset` normalised float32 [3, S, S]; both yield (image, position)."""

    def image_names(self) -> list[str]: ...

    def raw_image_dataset(self, names: Sequence[str], image_size: int) -> Dataset: ...

    def image_dataset(
        self, names: Sequence[str], image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> Dataset: ...


class TaskSource(ImageSource, Protocol):
    name: str
    meta_val: MetaValSplit

    def prepare(self) -> None:
        """Build or check the data on disk (called once, on one process)."""

    def fingerprint(self) -> str: ...

    def tasks(self, split: str) -> list[Task]:
        """`split` is one of META_SPLITS; 'meta_val' is empty when the source has no meta-val split."""

    def prompt_template(self, question: str) -> str | None: ...


def task_prompts(source: TaskSource, task: Task) -> list[str]:
    """The answer texts of a task, in answer order (spec §2.4)."""
    template = source.prompt_template(task.question)
    return [answer_prompt(template, a) for a in task.answers]


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] normalised like the CLIP image tower expects (`ImageNormalizer`
    on the channels-first view: one implementation of the arithmetic, the same bits)."""
    return ImageNormalizer(mean, std)(images.movedim(-1, -3))


class ImageNormalizer:
    """uint8 images [..., 3, H, W] -> (x / 255 - mean) / std in float32, on the images' device: the last two steps of
    the CLIP preprocessing (torchvision's ToTensor and Normalize: the same operations in the same order, so the same
    numbers to the bit). They run where the batch is used, so that DataLoader workers hand over uint8: a quarter of
    the bytes of float32 through worker shared memory (347 MB per [256, 3, 336, 336] float batch) and to the GPU.
    mean and std are copied to a device once."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict[str, tuple[float, ...]]:
        return {"mean": self.mean, "std": self.std}  # not the per-device copies: a pickle may go to another process

    def __setstate__(self, state: dict[str, tuple[float, ...]]) -> None:
        ImageNormalizer.__init__(self, state["mean"], state["std"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        stats = self._stats.get(images.device)
        if stats is None:
            stats = self._stats[images.device] = (
                torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1).to(images.device),
                torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1).to(images.device),
            )
        mean, std = stats
        return images.float().div(255).sub(mean).div(std)


class NormalizedImages(Dataset):
    """A raw (uint8) image dataset normalised item by item: `ImageSource.image_dataset` for callers that want
    float images from the loader (CLIP pre-training, benches); yields (image, position)."""

    def __init__(self, raw: Dataset, normalize: ImageNormalizer):
        self.raw, self.normalize = raw, normalize

    def __len__(self) -> int:
        return len(cast(Sized, self.raw))  # every source's raw image dataset (files or an array) has a length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, position = self.raw[i]
        return self.normalize(image), position


class TaskFileSource:
    """Shared part of the sources whose tasks live in `meta_train.json` / `meta_test.json` under `root`.

    Subclasses set `self._root` in `prepare()` and `self.meta_val` in `__init__`, and may name a prompt file in
    `prompt_file()`. The meta-val tasks are carved out of `meta_train.json` when it is read (`MetaValSplit`).
    """

    _root: Path | None = None
    name: str  # the source's name in logs (a class attribute of each subclass)
    meta_val: MetaValSplit

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
        files = {split: load_task_file(self.root / f"{split}.json") for split in TASK_FILE_SPLITS}
        meta_train, meta_val = self.meta_val.carve(files["meta_train"])
        log.info(
            "%s tasks: %d meta-train, %d meta-val (data.source.meta_val = %s), %d meta-test",
            self.name,
            len(meta_train),
            len(meta_val),
            self.meta_val.describe(),
            len(files["meta_test"]),
        )
        return {"meta_train": meta_train, "meta_val": meta_val, "meta_test": files["meta_test"]}

    @cached_property
    def _prompts(self) -> dict[str, str]:
        path = self.prompt_file()
        return load_prompts(path) if path is not None else {}

    def tasks(self, split: str) -> list[Task]:
        if split not in META_SPLITS:
            raise ValueError(f"unknown meta split '{split}' (expected one of {META_SPLITS})")
        return self._tasks[split]

    def prompt_template(self, question: str) -> str | None:
        return self._prompts.get(question)


def dataclass_from_config(cls: type, values: Mapping[str, Any], key: str) -> Any:
    """Build a settings dataclass from a config node, naming the offending key on a typo (the YAML mirrors it) or a
    missing key of a field without default."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{key}.{unknown[0]}' (valid keys: {sorted(names)})")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in values]
    if missing:
        raise ConfigError(f"config key '{key}.{missing[0]}' is missing (required keys: {required})")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
