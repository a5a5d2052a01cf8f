"""Where a few-shot image set comes from: the embedded glyph set, a folder dataset or its pickled distribution. A
source hands out its three splits (`meta_train`, `meta_val`, `meta_test`) and says how classifiers normalise its
pixels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from metadiff.config import ConfigError
from metadiff.config.typed import as_spec
from metadiff.data.images.folders import FolderImageSplit
from metadiff.data.images.glyphs import GlyphSpec, load_glyphs
from metadiff.data.images.pickled import load_pickled_split
from metadiff.data.images.splits import ImageSplit, TensorImageSplit
from metadiff.errors import MissingInputError
from metadiff.nets.backbones import BackboneSpec

SPLITS = ("meta_train", "meta_val", "meta_test")


class ImageSource:
    """Base: `split(name)`, `channels`, `image_size`, `mean`/`std` (the classifier side's normalisation)."""

    channels: int
    image_size: int

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def backbone_spec(self, backbone: BackboneSpec | Mapping) -> dict:
        """`build_backbone`'s arguments: the backbone's own keys (`model.backbone`) completed with this source's
        channels and normalisation (it lives in the network)."""
        own = as_spec(BackboneSpec, backbone, "model.backbone").arguments()
        return {**own, "in_channels": self.channels, "mean": self.mean, "std": self.std}

    def split(self, name: str) -> ImageSplit:
        if name not in SPLITS:
            raise ConfigError(f"split '{name}' is not one of {SPLITS}")
        return self._split(name)

    def _split(self, name: str) -> ImageSplit:
        raise NotImplementedError


class GlyphSource(ImageSource):
    """The embedded KanjiVG glyph set; classes are split in their seeded order (64/16/20 by default)."""

    def __init__(
        self, cache_dir: str, split_sizes: Sequence[int], mean: Sequence[float], std: Sequence[float], render: GlyphSpec
    ):
        super().__init__(mean, std)
        self.spec = as_spec(GlyphSpec, render, "data.source.render")
        if len(split_sizes) != 3 or sum(split_sizes) != self.spec.n_classes:
            raise ConfigError(
                f"data.source.split_sizes={list(split_sizes)}: expected 3 class counts summing to "
                f"n_classes={self.spec.n_classes}"
            )
        self.cache_dir, self.split_sizes = Path(cache_dir), [int(s) for s in split_sizes]
        self.channels, self.image_size = 1, self.spec.image_size

    @cached_property
    def data(self) -> dict:
        return load_glyphs(self.spec, self.cache_dir)

    def _split(self, name: str) -> ImageSplit:
        first = sum(self.split_sizes[: SPLITS.index(name)])
        classes = list(range(first, first + self.split_sizes[SPLITS.index(name)]))
        mask = torch.isin(self.data["targets"], torch.tensor(classes))
        return TensorImageSplit(
            self.data["images"][mask], self.data["targets"][mask] - first, [self.data["classes"][c] for c in classes]
        )


class FolderSource(ImageSource):
    """miniImageNet / CIFAR-FS style folders: `<root>/<split>/<class>/*.<ext>` (spec §2.1)."""

    def __init__(
        self,
        root: str,
        image_size: int,
        extensions: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        channels: int = 3,
    ):
        super().__init__(mean, std)
        self.root, self.image_size, self.channels = Path(root), int(image_size), int(channels)
        self.extensions = [e if e.startswith(".") else f".{e}" for e in extensions]

    def _split(self, name: str) -> ImageSplit:
        return FolderImageSplit(self.root, name, self.image_size, self.extensions, self.channels)


@dataclass(frozen=True)
class PickleFilesSpec:
    """`data.source.pickle_files`: per split, the file names to look for in `root` (the first found is read)."""

    meta_train: list[str]
    meta_val: list[str]
    meta_test: list[str]


class ImageSetSource(FolderSource):
    """miniImageNet / CIFAR-FS as users have them: the folder layout or one of the pickled distributions.

    `format`: `folder` (`<root>/<split>/<class>/*.<ext>`), `pickle` (the first of `pickle_files[split]` found in
    `root`; schemas in `metadiff.data.images.pickled`) or `auto` (folder when `<root>/<split>` is a directory, else
    the pickle files)."""

    FORMATS = ("auto", "folder", "pickle")

    def __init__(
        self,
        root: str,
        image_size: int,
        extensions: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        format: str,
        pickle_files: PickleFilesSpec,
        channels: int = 3,
    ):
        super().__init__(root, image_size, extensions, mean, std, channels)
        if format not in self.FORMATS:
            raise ConfigError(f"data.source.format={format!r}: expected one of {list(self.FORMATS)}")
        missing = [s for s in SPLITS if isinstance(pickle_files, Mapping) and s not in pickle_files]
        if missing:
            raise ConfigError(
                f"data.source.pickle_files has no entry for {missing}: expected a list of file names "
                f"for each of {list(SPLITS)}"
            )
        files = as_spec(PickleFilesSpec, pickle_files, "data.source.pickle_files")
        self.format = format
        self.pickle_files = {s: [str(n) for n in getattr(files, s)] for s in SPLITS}

    def _pickle_path(self, name: str) -> Path | None:
        return next((self.root / f for f in self.pickle_files[name] if (self.root / f).is_file()), None)

    def _split(self, name: str) -> ImageSplit:
        if self.format == "folder" or (self.format == "auto" and (self.root / name).is_dir()):
            return super()._split(name)
        path = self._pickle_path(name)
        if path is None:
            folder = f"{self.root / name} is not a directory and " if self.format == "auto" else ""
            raise MissingInputError(
                f"split '{name}' not found: {folder}none of {self.pickle_files[name]} is in "
                f"{self.root} (data.source.format={self.format})"
            )
        return load_pickled_split(path, self.image_size, self.channels)
