"""What several sections share, built once on first use: the generated VQA tree, the random CLIP weights file the
features stage reads, and the composed configs (each section composes the experiment it measures through here, so
they all see the same paths, trainer group and data)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import DictConfig

from metadiff.bench.gpu_check.config import Settings, compose_experiment
from metadiff.bench.gpu_check.data import write_vqa_tree


class Context:
    def __init__(self, settings: Settings, runner: Callable[[DictConfig], dict[str, float]]):
        """`runner`: the stage runner (`metadiff.run.train`), handed in by the entry point: below the run loop, only
        entry points import it (tests/test_layers.py)."""
        self.settings, self.runner = settings, runner
        self.root = settings.work / "root"  # paths.root_dir of every stage the check runs: outputs/ lies under it
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def device(self) -> str:
        return self.settings.device

    def base_overrides(self) -> list[str]:
        """Every composed experiment: this check's trainer group, outputs under the work folder, and the generated
        data where the experiments look for real data (the VQA tree is written on first use)."""
        return [
            f"trainer={self.settings.trainer}",
            f"paths.root_dir={self.root}",
            f"paths.output_dir={self.root / 'outputs' / 'check'}",
            f"paths.miniimagenet_dir={self.settings.work / 'miniimagenet'}",
        ]

    def vqa_overrides(self) -> list[str]:
        """The generated VQA tree as the *_vqa experiments' data (and the rules' example count, if the tree is too
        small for the paper's)."""
        tree = self.vqa_tree
        rules = self.settings.sizes.vqa.min_task_examples
        return [
            f"paths.vqa_dir={tree['vqa_dir']}",
            f"paths.coco_dir={tree['coco_dir']}",
            *([f"data.source.rules.min_task_examples={rules}"] if rules is not None else []),
        ]

    def compose(self, experiment: str, *overrides: str, hydra_config: bool = False) -> DictConfig:
        return compose_experiment(experiment, [*self.base_overrides(), *overrides], hydra_config=hydra_config)

    @cached_property
    def vqa_tree(self) -> dict[str, Path]:
        """COCO-size JPEGs and VQA v2 JSON in the layout and file names conf/data/meta_vqa.yaml reads."""
        source = compose_experiment(
            self.settings.spec.experiments.features, [f"paths.root_dir={self.root}"]
        ).data.source
        return write_vqa_tree(
            self.settings.work / "vqa", self.settings.sizes.vqa, list(source.rules.splits), dict(source.vqa_files)
        )

    def features_config(self, *overrides: str) -> DictConfig:
        return self.compose(self.settings.spec.experiments.features, *self.vqa_overrides(), *overrides)

    def clip_weights(self, model: torch.nn.Module | None = None) -> Path:
        """The local weights file features_vqa's `model.pretrained` names, holding random weights of its arch
        (`model`'s, when given; else a fresh random model)."""
        cfg = self.features_config()
        path = Path(cfg.model.pretrained)
        if not path.is_file():
            if model is None:
                from metadiff.features.clip_models import create_clip

                model = create_clip(cfg.model.arch).model
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
        return path
