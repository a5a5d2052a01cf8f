"""miniImageNet / CIFAR-FS in the pickled distributions most researchers already have (spec §2.1).

Two schemas are read, told apart by their keys:
- `cache`: `mini-imagenet-cache-{train,val,test}.pkl` (Ravi & Larochelle's split as redistributed by learn2learn and
  others): `{"image_data": uint8 [N, 84, 84, 3], "class_dict": {class name: [row indices]}}`.
- `category_split`: MetaOptNet's `miniImageNet_category_split_*.pickle` and `CIFAR_FS_{train,val,test}.pickle`:
  `{"data": uint8 [N, H, W, 3], "labels": [int] * N}` (written by Python 2: read with latin-1 strings).

Classes are ordered by name (the `cache` schema) or by label value (`category_split`), so labels are the same on every
machine; a split's labels are re-indexed 0..n-1. Images stay uint8 in memory and are resized per item, as the folder
reader does. Pickle files run code when loaded: read only files you trust, as with any pickled dataset.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metadiff.data.images.splits import ImageSplit, ResizeToUnit
from metadiff.errors import InputFileError

#: schema name -> the keys that identify it (and that a file must hold)
SCHEMAS = {"cache": ("image_data", "class_dict"), "category_split": ("data", "labels")}


def read_pickle(path: Path) -> dict[str, Any]:
    """The pickled dict with str keys (Python 2 pickles store them as bytes or latin-1 str)."""
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, ImportError, IndexError) as err:
        raise InputFileError(f"unreadable pickle {path}: {type(err).__name__}: {err}") from None
    if not isinstance(obj, dict):
        raise InputFileError(f"{path}: expected a pickled dict with keys {_expected()}, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _expected() -> str:
    return " or ".join("{" + ", ".join(keys) + "}" for keys in SCHEMAS.values())


def _images(path: Path, key: str, value: Any, channels: int) -> np.ndarray:
    images = np.asarray(value)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != channels:
        raise InputFileError(
            f"{path}: '{key}' must be uint8 images [N, H, W, {channels}], got {images.dtype} {tuple(images.shape)}"
        )
    return images


def decode_split(obj: dict[str, Any], path: Path, channels: int) -> tuple[np.ndarray, torch.Tensor, list[str]]:
    """(images [N, H, W, C] uint8, labels 0..n-1, class names) from either schema."""
    schema = next((name for name, keys in SCHEMAS.items() if all(k in obj for k in keys)), None)
    if schema is None:
        raise InputFileError(f"{path}: expected keys {_expected()}, found {sorted(map(str, obj))[:8]}")
    if schema == "cache":
        images = _images(path, "image_data", obj["image_data"], channels)
        class_dict = obj["class_dict"]
        names = sorted(class_dict)
        rows = [np.asarray(class_dict[n], dtype=np.int64).reshape(-1) for n in names]
        if any(r.size == 0 for r in rows) or any((r < 0).any() or (r >= len(images)).any() for r in rows):
            raise InputFileError(f"{path}: 'class_dict' must map every class to row indices in [0, {len(images)})")
        order = np.concatenate(rows)
        labels = np.concatenate([np.full(r.size, i) for i, r in enumerate(rows)])
        return images[order], torch.as_tensor(labels, dtype=torch.long), [str(n) for n in names]
    images = _images(path, "data", obj["data"], channels)
    raw = np.asarray(obj["labels"]).reshape(-1)
    if raw.size != len(images) or not np.issubdtype(raw.dtype, np.integer):
        raise InputFileError(
            f"{path}: 'labels' must hold one integer per image ({len(images)}), got {raw.dtype} x {raw.size}"
        )
    values, labels = np.unique(raw, return_inverse=True)
    return images, torch.as_tensor(labels, dtype=torch.long), [str(v) for v in values.tolist()]


class ArrayImageSplit(ImageSplit):
    """A split held as uint8 [N, H, W, C] in memory, resized per item to `image_size` (bicubic, spec §2.4)."""

    def __init__(self, images: np.ndarray, targets: torch.Tensor, classes: list[str], image_size: int):
        self.images, self.targets, self.classes = images, targets, classes
        self.channels, self.image_size = int(images.shape[-1]), int(image_size)
        self.transform = ResizeToUnit(image_size)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)
        return self.transform(image), int(self.targets[index])


def load_pickled_split(path: Path, image_size: int, channels: int) -> ArrayImageSplit:
    """One split from one pickle file of either schema."""
    images, targets, classes = decode_split(read_pickle(path), path, channels)
    return ArrayImageSplit(images, targets, classes, image_size)
