"""Stage `diffusion_zoo`: assembles M trained `diffusion_unet` members into one zoo artifact and checks that each
member learned its classes.

The members are upstreams (`upstream.unet.fan_out`), so each UNet is its own cached artifact: a multirun trains
them as M jobs, and this stage then only collects them (or trains the missing ones in turn). The check: a classifier
trained on the real meta-train images (upstream `judge`, stage `classifier`) labels `check.n_per_model` samples of
every member; a sample counts as right when the judged class belongs to that member's subset. Chance is
classes_per_model / n_train_classes; the judge's own score on held-out real images of the same classes is the
ceiling. Sample grids (one per member and one of the whole zoo) are written as PNG and logged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from metadiff.config import ConfigError
from metadiff.config.typed import as_spec
from metadiff.data.images.partition import class_map
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.diffusion.zoo import PIXEL_RANGE, DiffusionZoo
from metadiff.eval.plots import log_image, save_grid
from metadiff.nets.unet import ImageDenoiser
from metadiff.stages.base import ImageSetData, Stage
from metadiff.stages.classifier import load_classifier
from metadiff.stages.diffusion_unet import load_unet, load_unet_spec
from metadiff.store import Artifact
from metadiff.utils.tensor_files import load_tensors, save_tensors

UNET_PREFIX = "unet"
ZOO_SPEC = "zoo.json"


@dataclass(frozen=True)
class CheckSpec:
    """`model.check`: how many samples of each member the judge classifies, and how they are sampled."""

    n_per_model: int
    batch_size: int
    steps: int  # DDIM steps
    spacing: str  # timestep spacing (`NoiseSchedule.set_timesteps`)


@dataclass(frozen=True)
class ZooGridSpec:
    """`model.grid`: the sample grids (one per member, one of the whole zoo)."""

    n_per_model: int
    nrow: int


def save_zoo(zoo: DiffusionZoo, directory: Path, extra: dict[str, Any] | None = None) -> None:
    """The zoo's files: each member's weights and one JSON of their configs, the schedule and the class map."""
    members = []
    for k, model in enumerate(zoo.models):
        save_tensors(model.state_dict(), directory / f"unet_{k}.pt")
        members.append({"weights": f"unet_{k}.pt", "config": model.config})
    (directory / ZOO_SPEC).write_text(
        json.dumps(
            {
                "members": members,
                "schedule": zoo.schedule_cfg,
                "class_map": zoo.class_map,
                "class_names": zoo.class_names,
                "image_size": zoo.image_size,
                "channels": zoo.channels,
                "pixel_range": list(PIXEL_RANGE),
                **(extra or {}),
            },
            indent=1,
        )
    )


def load_zoo(artifact: Artifact) -> DiffusionZoo:
    """The zoo of a diffusion_zoo artifact, its denoisers frozen."""
    spec = json.loads(artifact.file(ZOO_SPEC).read_text())
    models = []
    for member in spec["members"]:
        model = ImageDenoiser.from_config(member["config"])
        model.load_state_dict(load_tensors(artifact.file(member["weights"])))
        models.append(model.eval().requires_grad_(False))
    return DiffusionZoo(
        models,
        NoiseSchedule.make(**spec["schedule"]),
        spec["schedule"],
        spec["class_map"],
        spec["class_names"],
        spec["image_size"],
        spec["channels"],
    )


def member_artifacts(upstream: dict[str, Artifact]) -> list[Artifact]:
    """The zoo's UNet upstreams in member order (`unet0`, `unet1`, ...)."""
    names = sorted(
        (n for n in upstream if n.startswith(UNET_PREFIX) and n[len(UNET_PREFIX) :].isdigit()),
        key=lambda n: int(n[len(UNET_PREFIX) :]),
    )
    if not names:
        raise ConfigError(
            "diffusion_zoo needs its members as upstream 'unet' with fan_out (see "
            "conf/experiment/diffusion_zoo_glyphs.yaml)"
        )
    return [upstream[n] for n in names]


def assemble_zoo(members: list[Artifact], class_names: list[str]) -> DiffusionZoo:
    """Load the members' (EMA) UNets and build the pseudo class -> (model, local index) map from their subsets."""
    specs = [load_unet_spec(a) for a in members]
    subsets = [s["classes"] for s in specs]
    flat = [c for sub in subsets for c in sub]
    if len(set(flat)) != len(flat):
        raise ConfigError(f"zoo members {[str(a.path) for a in members]} share classes: {subsets}")
    first = specs[0]
    for a, s in zip(members, specs, strict=True):
        if s["schedule"] != first["schedule"] or (s["config"]["image_size"], s["config"]["channels"]) != (
            first["config"]["image_size"],
            first["config"]["channels"],
        ):
            raise ConfigError(f"zoo member {a.path} has another schedule or image shape than {members[0].path}")
    models = [load_unet(a) for a in members]
    mapping = [
        {**entry, "class": subsets[entry["model"]][entry["local"]]}
        for entry in class_map([list(range(len(sub))) for sub in subsets])
    ]
    return DiffusionZoo(
        models,
        NoiseSchedule.make(**first["schedule"]),
        dict(first["schedule"]),
        mapping,
        [class_names[m["class"]] for m in mapping],
        first["config"]["image_size"],
        first["config"]["channels"],
    )


class DiffusionZooModule(Stage, name="diffusion_zoo"):
    zoo: DiffusionZoo  # assembled by the first setup(): its class names are the data's

    @classmethod
    def required_upstreams(cls, model: DictConfig) -> tuple[str, ...]:
        """The judge classifier scores the members' samples; the members are `unet0`, `unet1`, ... (an upstream
        `unet` with `fan_out`), at least the first."""
        return ("judge", f"{UNET_PREFIX}0")

    def __init__(
        self, check: CheckSpec, grid: ZooGridSpec, eval_seed: int = 0, upstream: dict[str, Artifact] | None = None
    ):
        super().__init__()
        self.judge_artifact = self.upstream_artifact(upstream, "judge")
        self.members = member_artifacts(upstream or {})
        self.check = as_spec(CheckSpec, check, "model.check")
        self.grid, self.eval_seed = as_spec(ZooGridSpec, grid, "model.grid"), eval_seed
        self.judge = load_classifier(self.judge_artifact)
        self.real_right: list[torch.Tensor] = []

    def setup(self, stage: str) -> None:
        if not hasattr(self, "zoo"):
            data = self.datamodule_view(ImageSetData)
            if data.train_cfg.split is None:
                raise ConfigError("data.train.split is null (data-free): the zoo check needs the meta-train classes")
            split = data.split(data.train_cfg.split)
            if self.judge.spec["n_classes"] != len(split.classes):
                raise ConfigError(
                    f"judge {self.judge_artifact.path} has {self.judge.spec['n_classes']} classes, the "
                    f"data's train split {len(split.classes)}"
                )
            self.zoo = assemble_zoo(self.members, split.classes)
            self.n_train_classes = len(split.classes)
            # meta-train class -> zoo model (-1: no model covers it)
            owner = torch.full((self.n_train_classes,), -1, dtype=torch.long)
            for entry in self.zoo.class_map:
                owner[entry["class"]] = entry["model"]
            self.owner = owner

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """The ceiling: the judge's subset accuracy on held-out real images of the covered classes."""
        images, labels = batch
        owner = self.owner.to(self.device)
        covered = owner[labels] >= 0
        judged = owner[self.judge.to(self.device)(images).argmax(-1)]
        self.real_right.append((judged == owner[labels])[covered].float().cpu())

    def on_test_epoch_end(self) -> None:
        zoo = self.zoo.to(self.device)
        gen = torch.Generator().manual_seed(self.eval_seed)
        n, batch = int(self.check.n_per_model), int(self.check.batch_size)
        owner = self.owner.to(self.device)
        report: dict[str, float] = {}
        grids, confusion = [], torch.zeros(zoo.n_models, zoo.n_models + 1)
        for k in range(zoo.n_models):
            with self.precision_context():  # an epoch hook: Lightning's bf16 covers only the steps
                chunks = [
                    zoo.sample(k, min(batch, n - s), int(self.check.steps), gen, spacing=self.check.spacing)
                    for s in range(0, n, batch)
                ]
                samples = torch.cat(chunks)
                judged = owner[self.judge.to(self.device)(samples).argmax(-1)]
            report[f"test/member{k}_subset_accuracy"] = float((judged == k).float().mean())
            confusion[k] = torch.bincount(judged.cpu() + 1, minlength=zoo.n_models + 1).roll(-1).float() / n
            grids.append(samples[: int(self.grid.n_per_model)].cpu())
        members = [report[f"test/member{k}_subset_accuracy"] for k in range(zoo.n_models)]
        report["test/subset_accuracy"] = sum(members) / len(members)
        report["test/subset_accuracy_chance"] = len(zoo.classes_of(0)) / self.n_train_classes
        report["test/judge_real_subset_accuracy"] = float(torch.cat(self.real_right).mean())
        self.log_dict(report)
        self.summary_metrics.update(report)
        self.confusion = confusion
        if self.trainer.is_global_zero:
            self._write_grids(grids)
        lines = [
            "",
            "zoo check: a classifier of the real meta-train classes judges each member's samples",
            f"  samples in their member's class subset   {report['test/subset_accuracy']:.3f}  "
            f"(per member {', '.join(f'{m:.2f}' for m in members)})",
            f"  chance (classes per model / classes)     {report['test/subset_accuracy_chance']:.3f}",
            f"  judge on held-out real images (ceiling)  {report['test/judge_real_subset_accuracy']:.3f}",
        ]
        self.set_results_text("\n".join(lines))

    def _write_grids(self, grids: list[torch.Tensor]) -> None:
        out = Path(self.trainer.default_root_dir)
        nrow = int(self.grid.nrow)
        self.grid_paths = [save_grid(g, out / f"samples_member{k}.png", nrow) for k, g in enumerate(grids)]
        rows = torch.cat([g[:nrow] for g in grids])
        self.grid_paths.append(save_grid(rows, out / "samples_zoo.png", nrow))
        log_image(self.loggers, "test/samples_zoo", self.grid_paths[-1])

    def write_artifact(self, directory: Path) -> None:
        save_zoo(
            self.zoo,
            directory,
            extra={
                "member_artifacts": [{"path": str(a.path), "fingerprint": a.fingerprint} for a in self.members],
                "check": dict(self.summary_metrics),
                "confusion": self.confusion.tolist(),
            },
        )  # row k: member k's samples judged in subset j (last: none)
        for path in getattr(self, "grid_paths", []):
            (directory / path.name).write_bytes(path.read_bytes())
