"""miniImageNet / CIFAR-FS in their usual folder layout: `<root>/<split>/<class>/*.{jpg,png}` (spec §2.1).

Listing and class order come from torchvision's ImageFolder helpers (classes sorted by name, files sorted), so a
split's labels are the same on every machine. Images are read lazily and resized to `image_size` (bicubic, spec
§2.4: 84x84 miniImageNet and 32x32 CIFAR-FS both become 64x64 by default). Errors name the split, class or file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import find_classes, make_dataset

from metadiff.data.images.splits import ImageSplit, ResizeToUnit
from metadiff.errors import InputFileError, MissingInputError


class FolderImageSplit(ImageSplit):
    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int,
        extensions: Sequence[str] = (".jpg", ".png"),
        channels: int = 3,
    ):
        self.root = Path(root) / split
        if not self.root.is_dir():
            raise MissingInputError(
                f"split '{split}' not found: {self.root} is not a directory (expected "
                f"<root>/{split}/<class>/*{'|*'.join(extensions)})"
            )
        try:
            classes, class_to_idx = find_classes(str(self.root))
        except FileNotFoundError:
            raise MissingInputError(f"split '{split}': no class folders in {self.root}") from None
        exts = tuple(e.lower() for e in extensions)
        samples = make_dataset(str(self.root), class_to_idx, extensions=exts, allow_empty=True)
        counts = torch.bincount(torch.tensor([s[1] for s in samples], dtype=torch.long), minlength=len(classes))
        empty = [classes[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
        if empty:
            raise InputFileError(
                f"split '{split}' in {self.root}: class folder(s) {empty[:5]} hold no {'/'.join(exts)} image"
            )
        self.samples = samples
        self.classes = classes
        self.targets = torch.tensor([s[1] for s in samples], dtype=torch.long)
        self.channels, self.image_size = channels, image_size
        self.transform = ResizeToUnit(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB" if self.channels == 3 else "L")
        except (UnidentifiedImageError, OSError) as err:
            raise InputFileError(f"unreadable image {path}: {err}") from None
        return self.transform(image), label
