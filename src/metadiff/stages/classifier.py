"""Stage `classifier`: a Conv4 trained by plain supervised classification on the real meta-train classes.

Two uses. (1) The few-shot **baseline** of an image set: its frozen features with the prototype readout on the
fixed meta-test episodes, next to a random-init Conv4 with the same readout (reported in docs/results.md). (2) The
**judge** of a diffusion zoo: it tells which meta-train class a generated image looks like, so the zoo stage can
check that each model's samples fall in that model's class subset.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from metadiff.config.typed import as_spec
from metadiff.data.images.episodes import Episodes
from metadiff.eval.fewshot import prototype_episode_accuracy, readout_lines
from metadiff.eval.per_task import PerTaskValues, ci_report
from metadiff.nets.backbones import BackboneSpec, build_backbone
from metadiff.nets.heads import MLPHead
from metadiff.stages.base import ImageSetData, Stage
from metadiff.store import Artifact
from metadiff.utils.tensor_files import load_tensors, save_tensors

WEIGHTS, SPEC = "classifier.pt", "classifier.json"


class ImageClassifier(torch.nn.Module):
    """backbone -> normalize(GAP) -> MLP head over the train classes."""

    def __init__(self, backbone: dict[str, Any], n_classes: int, head_norm: str):
        super().__init__()
        self.spec = {"backbone": dict(backbone), "n_classes": int(n_classes), "head_norm": head_norm}
        self.backbone = build_backbone(**backbone)
        self.head = MLPHead(self.backbone.out_dim, n_classes, norm=head_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.embed(x))

    def gap(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised GAP features: the prototype readout averages these (spec §3.4 eval mode)."""
        return self.backbone(x).mean(dim=(2, 3))


def load_classifier(artifact: Artifact) -> ImageClassifier:
    spec = json.loads(artifact.file(SPEC).read_text())
    net = ImageClassifier(spec["backbone"], spec["n_classes"], spec["head_norm"])
    net.load_state_dict(load_tensors(artifact.file(WEIGHTS)))
    return net.eval().requires_grad_(False)


class ClassifierModule(Stage, name="classifier"):
    net: ImageClassifier  # built by the first setup(): its class count is the data's

    def __init__(
        self,
        backbone: BackboneSpec,
        head_norm: str,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        readout_scale: float = 7.0,
        upstream: dict[str, Artifact] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["optimizer", "scheduler", "upstream"])
        self.backbone_cfg, self.head_norm = as_spec(BackboneSpec, backbone, "model.backbone"), head_norm
        self.optimizer_factory, self.scheduler_factory, self.readout_scale = optimizer, scheduler, readout_scale

    def setup(self, stage: str) -> None:
        if hasattr(self, "net"):  # fit then test: built once
            return
        dm = self.datamodule_view(ImageSetData)
        source = dm.source
        n_classes = len(dm.train_classes())
        self.net = ImageClassifier(source.backbone_spec(self.backbone_cfg), n_classes, self.head_norm)
        # the random-init reference: the same architecture and seed, never trained
        self.random_init = copy.deepcopy(self.net).requires_grad_(False)
        self.val_acc = MulticlassAccuracy(num_classes=n_classes, average="micro")
        self.shots = list(dm.shots)
        # the test episodes are shared out over the ranks (EpisodeSampler): gathered at compute
        self.values = PerTaskValues([f"{m}_{k}shot" for m in ("trained", "random_init") for k in self.shots], sync=True)

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.net.parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "epoch"}}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels - self._first_class)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @property
    def _first_class(self) -> int:
        return self.datamodule_view(ImageSetData).train_classes()[0]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.val_acc.update(self.net(images), labels - self._first_class)
        self.log("val/accuracy", self.val_acc, prog_bar=True)

    def test_step(self, batch: Episodes, batch_idx: int, dataloader_idx: int = 0) -> None:
        k = self.shots[dataloader_idx]
        for name, net in (("trained", self.net), ("random_init", self.random_init.to(self.device))):
            self.values.update(f"{name}_{k}shot", prototype_episode_accuracy(net.gap, batch, self.readout_scale))

    def on_test_epoch_end(self) -> None:
        report = ci_report("test", self.values.compute())
        self.log_dict(report)
        self.summary_metrics.update(report)
        self.set_results_text(
            readout_lines(
                "prototype readout on the fixed meta-test episodes (mean +- 95% CI):",
                report,
                self.shots,
                ("trained", "random_init"),
            )
        )

    def write_artifact(self, directory: Path) -> None:
        save_tensors(self.net.state_dict(), directory / WEIGHTS)
        (directory / SPEC).write_text(json.dumps(self.net.spec))
