"""The real Meta-VQA as a `TaskSource`: published task files or ones built from VQA v2, with COCO images on disk.

Two ways to get the tasks (conf/data/meta_vqa.yaml):
- `task_dir`: a folder with the authors' `meta_train.json` / `meta_test.json` (the exact published split);
- `vqa_dir` (with `task_dir: null`): the official VQA v2 files; the tasks are built once with the paper's rules
  into `build_dir/meta-vqa-<fingerprint>/` and reused.
Either way `meta_val` ({fraction, seed}) holds a share of the meta-train tasks out as meta-validation when the files
are read (`metadiff.data.sources.MetaValSplit`); the files stay as published or built.
Images are read from `image_dir` (`<image_dir>/train2014/COCO_train2014_000000000009.jpg`, the COCO layout); every
image a task names is checked before any work starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from metadiff.config import ConfigError
from metadiff.config.typed import as_spec
from metadiff.data.meta_vqa.build import TASK_FILES, MetaVQARules, VQAFiles, build_meta_vqa
from metadiff.data.sources import META_SPLITS, ImageNormalizer, MetaValSplit, NormalizedImages, TaskFileSource
from metadiff.errors import InputFileError, MissingInputError
from metadiff.utils.hashing import file_sha256, fingerprint
from metadiff.utils.io import atomic_dir

RESIZE_MODES = ("squash", "shorter_side_center_crop")


def _sizing(image_size: int, resize: str) -> list:
    """`squash`: resize to size x size with bicubic, no aspect ratio, no crop (what the paper's features used,
    spec §2.4); `shorter_side_center_crop`: CLIP's own preprocessing."""
    if resize == "squash":
        return [transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC)]
    if resize == "shorter_side_center_crop":
        return [
            transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
        ]
    raise ConfigError(f"data.source.resize = '{resize}' is not one of {RESIZE_MODES}")


def image_sizing(image_size: int, resize: str) -> transforms.Compose:
    """The worker's part of the preprocessing: PIL image -> uint8 [3, S, S], resized (and cropped) as `resize` says;
    `metadiff.data.sources.ImageNormalizer` does the rest (ToTensor's / 255 and Normalize) where the batch is used."""
    return transforms.Compose([*_sizing(image_size, resize), transforms.PILToTensor()])


def image_transform(image_size: int, mean: Sequence[float], std: Sequence[float], resize: str) -> transforms.Compose:
    """The whole preprocessing of one image (PIL -> normalised float32 [3, S, S]) as torchvision writes it: the
    reference the split one (`image_sizing` + `ImageNormalizer`) equals to the bit."""
    return transforms.Compose([*_sizing(image_size, resize), transforms.ToTensor(), transforms.Normalize(mean, std)])


class ImageFileDataset(Dataset):
    """JPEG/PNG files -> tensors by `transform`, decoded in DataLoader workers; yields (image, position)."""

    def __init__(self, paths: Sequence[Path], transform: transforms.Compose):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            with Image.open(self.paths[i]) as image:
                return self.transform(image.convert("RGB")), i
        except (OSError, ValueError) as err:
            raise InputFileError(f"image {self.paths[i]} could not be decoded: {err}") from None


class MetaVQASource(TaskFileSource):
    """Meta-VQA (VQA v2 questions as tasks) over COCO images, from published or freshly built task files."""

    name = "meta_vqa"

    def __init__(
        self,
        image_dir: str,
        meta_val: MetaValSplit,
        task_dir: str | None = None,
        vqa_dir: str | None = None,
        build_dir: str | None = None,
        prompts: str | None = None,
        rules: MetaVQARules | None = None,
        vqa_files: VQAFiles | None = None,
        image_file: str = "{split}/{name}.jpg",
        resize: str = "squash",
        check_images: bool = True,
    ):
        """`rules` and `vqa_files` (both in conf/data/meta_vqa.yaml) are read only to build the task files from
        `vqa_dir`; a source of published task files (`task_dir`) may leave them null."""
        if task_dir is None and vqa_dir is None:
            raise ConfigError(
                "data.source needs task_dir (published Meta-VQA files) or vqa_dir (official VQA v2 "
                "files to build them from); both are null"
            )
        self.image_dir = Path(image_dir)
        self.task_dir = Path(task_dir) if task_dir else None
        self.vqa_dir = Path(vqa_dir) if vqa_dir else None
        self.build_dir = Path(build_dir) if build_dir else None
        self.prompts_path = Path(prompts) if prompts else None
        self.rules = None if rules is None else as_spec(MetaVQARules, rules, "data.source.rules")
        self.vqa_files = None if vqa_files is None else as_spec(VQAFiles, vqa_files, "data.source.vqa_files")
        if resize not in RESIZE_MODES:
            raise ConfigError(f"data.source.resize = '{resize}' is not one of {RESIZE_MODES}")
        self.image_file, self.resize, self.check_images = image_file, resize, check_images
        self.meta_val = as_spec(MetaValSplit, meta_val, "data.source.meta_val")
        self._root: Path | None = None

    # -- task files -------------------------------------------------------------------------------------------
    def _build_root(self) -> Path:
        if self.build_dir is None:
            raise ConfigError("data.source.build_dir must be set to build Meta-VQA from vqa_dir")
        if self.rules is None or self.vqa_files is None:
            raise ConfigError(
                "data.source.rules and data.source.vqa_files must be set to build Meta-VQA from vqa_dir "
                "(conf/data/meta_vqa.yaml has the paper's)"
            )
        key = fingerprint({"rules": dataclasses.asdict(self.rules), "files": self._vqa_file_stats()})
        return self.build_dir / f"meta-vqa-{key[:12]}"

    def _vqa_file_stats(self) -> list[tuple[str, int]]:
        """Name and size of each VQA file: cheap to compute, changes when a file is replaced."""
        assert self.vqa_dir is not None and self.rules is not None and self.vqa_files is not None  # _build_root
        stats = []
        for split in self.rules.splits:
            for template in (self.vqa_files.questions, self.vqa_files.annotations):
                path = self.vqa_dir / template.format(split=split)
                if not path.is_file():
                    raise MissingInputError(
                        f"VQA v2 file for split '{split}' not found: {path} "
                        "(set paths.vqa_dir to the folder with Questions/ and Annotations/)"
                    )
                stats.append((path.name, path.stat().st_size))
        return stats

    def prepare(self) -> None:
        """Task files in place and, with `check_images`, every image they name on disk: what a stage that reads the
        images runs first (features_vqa's `prepare_data`), so a missing image stops it before any work."""
        self._prepare_tasks()
        if self.check_images:
            self._check_images()

    @property
    def root(self) -> Path:
        """The task files' folder, prepared on first use WITHOUT the image check: the stages that read only features
        (hnet_vqa, adaptation_vqa, ...) get here in every rank, and the check is one stat per image (~100k on a
        network filesystem for the real Meta-VQA), already done by the features stage that read them."""
        if self._root is None:
            self._prepare_tasks()
        assert self._root is not None
        return self._root

    def _prepare_tasks(self) -> None:
        if self.task_dir is not None:
            root = self.task_dir
            for name in TASK_FILES[:2]:
                if not (root / name).is_file():
                    raise MissingInputError(f"Meta-VQA task file not found: {root / name} (data.source.task_dir)")
        else:
            root = self._build_root()
            # _build_root refused null rules/vqa_files; vqa_dir is set where task_dir is not (__init__)
            assert self.vqa_dir is not None and self.rules is not None and self.vqa_files is not None
            if not all((root / name).is_file() for name in TASK_FILES):
                with atomic_dir(root, overwrite=True) as tmp:
                    build_meta_vqa(self.vqa_dir, tmp, self.rules, self.vqa_files)
        self._root = root

    def prompt_file(self) -> Path | None:
        return self.prompts_path

    def fingerprint(self) -> str:
        """Task files, prompts, images and the meta-val split (recorded only when there is one, so fraction 0 keeps
        the fingerprint of the published split from before meta-val existed)."""
        files = [self.root / name for name in TASK_FILES[:2]] + ([self.prompts_path] if self.prompts_path else [])
        return fingerprint(
            {
                "tasks": [(p.name, file_sha256(p)) for p in files],
                "image_dir": str(self.image_dir.resolve()),
                "image_file": self.image_file,
                "resize": self.resize,
                **({"meta_val": self.meta_val.describe()} if self.meta_val.enabled else {}),
            }
        )

    # -- images -----------------------------------------------------------------------------------------------
    def image_names(self) -> list[str]:
        """Every image some task uses (sorted), not all of COCO: the store holds what the stages read."""
        names = {name for split in META_SPLITS for t in self.tasks(split) for name, _ in t.train + t.test}
        return sorted(names)

    def image_path(self, name: str) -> Path:
        parts = name.split("_")
        if len(parts) != 3 or parts[0] != "COCO":
            raise InputFileError(f"image name '{name}' is not a COCO name like COCO_train2014_000000000009")
        return self.image_dir / self.image_file.format(split=parts[1], name=name)

    def _check_images(self) -> None:
        missing = [p for p in map(self.image_path, self.image_names()) if not p.is_file()]
        if missing:
            raise MissingInputError(
                f"{len(missing)} COCO image(s) named by the Meta-VQA tasks are missing under {self.image_dir}, "
                f"e.g. {missing[0]} (data.source.image_dir / image_file = '{self.image_file}')"
            )

    def raw_image_dataset(self, names: Sequence[str], image_size: int) -> Dataset:
        return ImageFileDataset([self.image_path(n) for n in names], image_sizing(image_size, self.resize))

    def image_dataset(self, names: Sequence[str], image_size: int, mean, std) -> NormalizedImages:
        return NormalizedImages(self.raw_image_dataset(names, image_size), ImageNormalizer(mean, std))
