"""The embedded benchmark as a `TaskSource`: generated on first use, cached under the data dir by fingerprint."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from metadiff.config.typed import as_spec
from metadiff.data.sources import (
    ImageNormalizer,
    MetaValSplit,
    NormalizedImages,
    TaskFileSource,
    normalize_images,
)
from metadiff.data.synthvqa.build import SynthVQAConfig, load_or_build_synthvqa
from metadiff.data.synthvqa.build import fingerprint as config_fingerprint
from metadiff.data.synthvqa.scenes import SceneSpec, caption_scene, render_scene, sample_scene
from metadiff.utils.hashing import fingerprint as value_fingerprint


class ImageArrayDataset(Dataset):
    """Rows of a uint8 [N, S, S, 3] image array (memory-mapped) as uint8 [3, S, S]; yields (image, position)."""

    def __init__(self, array_path: Path, rows: Sequence[int]):
        self.array_path, self.rows = Path(array_path), list(rows)

    @cached_property
    def images(self) -> np.ndarray:  # opened lazily so the dataset pickles cheaply into worker processes
        return np.load(self.array_path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.images[self.rows[i]])).movedim(-1, -3), i


class CaptionPairDataset(Dataset):
    """Fresh scenes (disjoint seed stream from the benchmark pool) with true captions, for CLIP pre-training."""

    def __init__(self, spec: SceneSpec, n_pairs: int, seed: int, tokenize: Callable, mean, std):
        self.spec, self.n_pairs, self.seed, self.tokenize = spec, n_pairs, seed, tokenize
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return self.n_pairs

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, i])
        scene = sample_scene(rng, self.spec)
        image = torch.from_numpy(render_scene(scene, self.spec, rng))
        caption = caption_scene(scene, rng, self.spec)
        return normalize_images(image, self.mean, self.std), self.tokenize([caption])[0]


class SynthVQASource(TaskFileSource):
    """Meta-VQA-shaped generated benchmark (see `metadiff.data.synthvqa.build` for the rules and statistics)."""

    name = "synthvqa"

    def __init__(self, cache_dir: str, generator: SynthVQAConfig, answer_prompt: str | None, meta_val: MetaValSplit):
        """`answer_prompt`: null = each question's declarative template ("the circle is {}", as Meta-VQA's
        prompt_meta.json); a string with one '{}' = that prompt for every question, so that the answer texts of two
        questions with the same answers are the same and only the task's condition (its question) tells them apart.
        `generator`: every setting of the generated data (`SynthVQAConfig`, its `scene` a `SceneSpec`), all of them
        in the config (the dataclasses' defaults serve the standalone builder).
        `meta_val`: {fraction, seed} of the meta-train tasks held out for validation (`MetaValSplit`)."""
        if answer_prompt is not None and answer_prompt.count("{}") != 1:
            raise ValueError(f"data.source.answer_prompt = {answer_prompt!r}: expected null or one '{{}}'")
        self.cache_dir = Path(cache_dir)
        self.config = as_spec(SynthVQAConfig, generator, "data.source.generator")
        self.answer_prompt = answer_prompt
        self.meta_val = as_spec(MetaValSplit, meta_val, "data.source.meta_val")
        self._root: Path | None = None

    def fingerprint(self) -> str:
        """The generated data, the answer prompt and the meta-val split (fraction 0 keeps the fingerprint the
        benchmark had before meta-val existed: the same tasks in the same splits)."""
        data = config_fingerprint(self.config)
        if self.answer_prompt is not None:
            data = f"{data}-prompt{value_fingerprint(self.answer_prompt)[:8]}"
        if self.meta_val.enabled:
            data = f"{data}-metaval{self.meta_val.fraction:g}s{self.meta_val.seed}"
        return data

    def prompt_template(self, question: str) -> str | None:
        return super().prompt_template(question) if self.answer_prompt is None else self.answer_prompt

    def prepare(self) -> None:
        self._root = load_or_build_synthvqa(self.config, self.cache_dir)

    def prompt_file(self) -> Path:
        return self.root / "prompt_meta.json"

    def image_names(self) -> list[str]:
        n = np.load(self.root / "images.npy", mmap_mode="r").shape[0]
        return [f"synth_{i:06d}" for i in range(n)]

    def raw_image_dataset(self, names: Sequence[str], image_size: int) -> Dataset:
        if image_size != self.config.scene.image_size:
            raise ValueError(
                f"the CLIP image tower expects {image_size}px images but synthvqa renders "
                f"{self.config.scene.image_size}px (set data.source.generator.scene.image_size)"
            )
        return ImageArrayDataset(self.root / "images.npy", [int(n.rsplit("_", 1)[1]) for n in names])

    def image_dataset(self, names: Sequence[str], image_size: int, mean, std) -> NormalizedImages:
        return NormalizedImages(self.raw_image_dataset(names, image_size), ImageNormalizer(mean, std))

    def caption_pairs(self, n_pairs: int, seed: int, tokenize: Callable, mean, std) -> Dataset:
        return CaptionPairDataset(self.config.scene, n_pairs, seed, tokenize, mean, std)
