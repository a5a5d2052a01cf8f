"""One split (meta-train / meta-val / meta-test) of a many-class image set, whatever its storage.

Every split yields `(image, label)` with the image a float tensor [C, H, W] in [0, 1] and the label the class's
index within the split. Stages convert from there: [-1, 1] for diffusion models, mean/std normalisation inside the
classifiers, so the two domains never mix (the original mixed them, spec §8 B5/B6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2


class ResizeToUnit:
    """A PIL image or uint8 [C, H, W] tensor -> float [C, size, size] in [0, 1], resized bicubic (spec §2.4); the
    clamp removes bicubic overshoot. One transform for every stored form, so a set reads the same from any of them."""

    def __init__(self, image_size: int):
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )

    def __call__(self, image: object) -> torch.Tensor:
        return self.transform(image).clamp_(0.0, 1.0)


class ImageSplit(Dataset):
    """The interface the samplers and stages rely on: `targets`, `classes`, `channels`, `image_size`."""

    targets: torch.Tensor
    classes: list[str]
    channels: int
    image_size: int

    def indices_of(self, classes: Sequence[int]) -> torch.Tensor:
        """Indices of every image whose label is in `classes`."""
        return torch.nonzero(torch.isin(self.targets, torch.as_tensor(list(classes))), as_tuple=True)[0]


class TensorImageSplit(ImageSplit):
    """A split held in memory as uint8 (the embedded glyph set)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: list[str]):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images, self.targets, self.classes = images, targets.long(), list(classes)
        self.channels, self.image_size = int(images.shape[1]), int(images.shape[-1])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255.0), int(self.targets[index])
