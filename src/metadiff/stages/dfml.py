"""Stage `dfml`: data-free meta-learning from a diffusion zoo (spec mlwdudm.md §1.2, §4.2–§4.5).

No real training image is read. Every `generation.every` epochs the stage regenerates its pseudo dataset: each zoo
member samples its pseudo classes, guided by the class-learner on the meta-model's features (round 0 by the untrained
networks, as the original). Between regenerations, every step (manual optimisation, two optimisers) trains
1. the meta-model on random pseudo episodes: CE of the global head over all pseudo classes + `episodic_weight` ·
   spatial episodic CE (spec §4.2);
2. the class-learner on the noised queries of fresh episodes: CE + KL to the meta-model's clean posterior (§4.3).
The original ran the two as two passes per epoch; interleaving gives both the same number of updates.

Learning rates follow the epoch look-up table `lr_lut` (the original's 0.1 / 0.006 / 0.0012 / 0.00024, a scheduler); the
class-learner's is `class_learner_lr_scale` times the meta LR, or constant (`null`, the original, §8 B4).
Validation (fixed real episodes of `data.episodes.val_split`, prototype readout) runs at the end of every round and
selects the weights the test uses (`callbacks=select_best`: a ModelCheckpoint monitoring `val/accuracy`, whose best
checkpoint `metadiff.run` tests): meta_val in `fixed` mode, meta_test in `faithful` mode (the original's test-set
selection, §8 B3). The test scores the selected backbone and a random-init one with the same readout on the fixed
real meta-test episodes (mean ± 95% CI).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig

from metadiff.config import ConfigError
from metadiff.config.typed import as_spec
from metadiff.data.global_batch import per_rank_batch
from metadiff.data.images.episodes import Episodes, EpisodeShape
from metadiff.dfml.augment import AugmentSpec, augment
from metadiff.dfml.class_learner import class_learner_loss
from metadiff.dfml.guidance import Compat, check_compat
from metadiff.dfml.lr_table import TableLR
from metadiff.dfml.pseudo_data import PseudoData, generate_pseudo_data, real_pseudo_data
from metadiff.diffusion.zoo import DiffusionZoo
from metadiff.eval.fewshot import paired_lines, prototype_episode_accuracy, readout_lines
from metadiff.eval.per_task import PerTaskValues, ci_report, paired_report
from metadiff.eval.plots import log_image, save_curve_plot, save_grid
from metadiff.nets.backbones import BackboneSpec, build_backbone
from metadiff.nets.heads import MLPHead
from metadiff.nets.meta_model import MetaModel, spatial_episodic_loss
from metadiff.nets.speed import SpeedSpec, speed_up
from metadiff.stages.base import ImageSetData, Stage
from metadiff.stages.classifier import load_classifier
from metadiff.stages.diffusion_zoo import load_zoo
from metadiff.store import Artifact
from metadiff.utils.rng import generator, keyed_seed, rank_seed, stream_seed
from metadiff.utils.tensor_files import load_tensors, save_tensors

WEIGHTS, SPEC = "meta_model.pt", "meta_model.json"


@dataclass(frozen=True)
class ClassLearnerSpec:
    """`model.class_learner`: the time-conditioned MLP head that guides sampling (spec §4.3)."""

    norm: str  # `MLPHead` norm (compat: none in fixed mode, batch_stats in the original's)


@dataclass(frozen=True)
class EpisodeSpec:
    """`model.episodes`: the training episodes drawn from the pseudo data (spec §2.5)."""

    n_way: int
    k_shot: int  # the shot this meta-model trains for and is selected on
    n_query: int
    per_batch: int  # episodes per step


@dataclass(frozen=True)
class GenerationSpec:
    """`model.generation`: how and when the pseudo data is regenerated."""

    source: str  # zoo: guided samples (the method); real: real images of the zoo's classes (positive control)
    real_split: str  # the split `source: real` reads
    every: int  # epochs per round
    per_class: int  # images per pseudo class and round
    batch_size: int
    steps: int  # DDIM steps
    spacing: str  # timestep spacing (`NoiseSchedule.set_timesteps`)
    scale: float  # classifier guidance scale
    guide_round0: bool  # round 0 guided by the untrained networks (the original) or unguided


@dataclass(frozen=True)
class PseudoGridSpec:
    """`model.grid`: the grid of each round's pseudo images."""

    per_class: int


def build_meta_model(spec: dict[str, Any]) -> MetaModel:
    return MetaModel(build_backbone(**spec["backbone"]), spec["n_classes"], spec["head_norm"], spec["scale_cls"])


def load_meta_model(artifact: Artifact) -> MetaModel:
    """The selected meta-model of a dfml artifact, frozen (the DiffusionMix stage's feature extractor)."""
    spec = json.loads(artifact.file(SPEC).read_text())
    net = build_meta_model(spec)
    net.load_state_dict(load_tensors(artifact.file(WEIGHTS)))
    return net.eval().requires_grad_(False)


class DFMLModule(Stage, name="dfml"):
    meta: MetaModel  # built by the first setup(): its backbone takes the data's channels and normalisation

    @classmethod
    def required_upstreams(cls, model: DictConfig) -> tuple[str, ...]:
        """The zoo it guides into pseudo data."""
        return ("zoo",)

    # each step takes two backward passes over disjoint parameter sets (meta-model, then class-learner): DDP's
    # reducer must not expect every parameter in each (see metadiff.run)
    ddp_find_unused_parameters = True

    def __init__(
        self,
        backbone: BackboneSpec,
        head_norm: str,
        scale_cls: float,
        class_learner: ClassLearnerSpec,
        meta_optimizer: Callable[..., torch.optim.Optimizer],
        class_learner_optimizer: Callable[..., torch.optim.Optimizer],
        lr_lut: list[list[float]],
        class_learner_lr_scale: float | None,
        episodic_weight: float,
        kl_reduction: str,
        episodes: EpisodeSpec,
        augment: AugmentSpec,
        generation: GenerationSpec,
        grid: PseudoGridSpec,
        compat: Compat,
        seed: int,
        speed: SpeedSpec,
        upstream: dict[str, Artifact] | None = None,
    ):
        super().__init__()
        check_compat(compat)
        self.save_hyperparameters(logger=False, ignore=["meta_optimizer", "class_learner_optimizer", "upstream"])
        self.automatic_optimization = False
        self.zoo_artifact = self.upstream_artifact(upstream, "zoo")
        # optional: a classifier trained on the real meta-train images, scored on the same test episodes (the upper
        # reference of the gap the data-free model closes)
        reference = (upstream or {}).get("reference")
        self.reference = load_classifier(reference).backbone if reference is not None else None
        self.zoo: DiffusionZoo = load_zoo(self.zoo_artifact)
        self.backbone_cfg = as_spec(BackboneSpec, backbone, "model.backbone")
        self.head_norm, self.scale_cls = head_norm, scale_cls
        self.class_learner_cfg = as_spec(ClassLearnerSpec, class_learner, "model.class_learner")
        self.meta_optimizer_factory, self.class_learner_optimizer_factory = meta_optimizer, class_learner_optimizer
        self.lr_lut, self.class_learner_lr_scale = [list(e) for e in lr_lut], class_learner_lr_scale
        self.episodic_weight, self.kl_reduction, self.compat = episodic_weight, kl_reduction, compat
        episodes = as_spec(EpisodeSpec, episodes, "model.episodes")
        self.shape = EpisodeShape(int(episodes.n_way), int(episodes.k_shot), int(episodes.n_query))
        self.global_episodes_per_batch = int(episodes.per_batch)  # per step over all ranks (metadiff.data.global_batch)
        self.augment = as_spec(AugmentSpec, augment, "model.augment")
        self.generation = as_spec(GenerationSpec, generation, "model.generation")
        self.grid = as_spec(PseudoGridSpec, grid, "model.grid")
        for member in self.zoo.models:  # the zoo's UNets sample every pseudo image: how they execute (model.speed)
            speed_up(member.unet, as_spec(SpeedSpec, speed, "model.speed"))
        self.seed = seed
        self.n_classes = len(self.zoo.class_map)
        self.pseudo: PseudoData | None = None  # the current round's (`round_data`), made at its first epoch
        self.pseudo_path: str | None = None
        self.selected_epoch = -1  # the epoch of the checkpoint the test loaded (callbacks.best_checkpoint); -1: none
        self.history: list[dict[str, float]] = []  # one entry per validated round

    # ------------------------------------------------------------------ networks
    def setup(self, stage: str) -> None:
        self.episodes_per_batch = per_rank_batch(
            self.global_episodes_per_batch, self.trainer.world_size, "model.episodes.per_batch"
        )
        if hasattr(self, "meta"):  # fit then test: built once
            return
        dm = self.datamodule_view(ImageSetData)
        source = dm.source
        if (source.channels, source.image_size) != (self.zoo.channels, self.zoo.image_size):
            raise ConfigError(
                f"zoo {self.zoo_artifact.path} makes {self.zoo.channels}x{self.zoo.image_size}px "
                f"images, the data's are {source.channels}x{source.image_size}px"
            )
        self.spec = {
            "backbone": source.backbone_spec(self.backbone_cfg),
            "n_classes": self.n_classes,
            "head_norm": self.head_norm,
            "scale_cls": self.scale_cls,
        }
        # initialised from the seed alone, not from wherever the global generator got to: Lightning re-seeds it
        # before setup() under DDP only, and round 0's guide (so its pseudo data) must be that of one process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.meta = build_meta_model(self.spec)
            self.class_learner = MLPHead(
                self.meta.backbone.out_dim, self.n_classes, norm=self.class_learner_cfg.norm, time_conditioned=True
            )
        # the random-init reference: the same architecture and seed, never trained
        self.random_init = copy.deepcopy(self.meta.backbone).requires_grad_(False)
        self.shots = list(dm.shots)
        if self.shape.k_shot not in self.shots:
            raise ConfigError(
                f"model.episodes.k_shot={self.shape.k_shot} (the shot this meta-model trains for and is "
                f"selected on) is not among data.episodes.shots={self.shots}"
            )
        self.augment_fill = list(source.mean)
        self.test_nets = ("trained", "random_init") + (("reference",) if self.reference is not None else ())
        names = [f"{m}_{k}shot" for m in self.test_nets for k in self.shots]
        self.values = PerTaskValues(names, sync=True)  # episodes are shared out over the ranks: gathered at compute

    def frozen_upstream_nets(self) -> tuple[str, ...]:
        """The reference classifier's backbone (a diagnostic), when there is one: read from its artifact."""
        return ("reference",) if self.reference is not None else ()

    def _two_optimizers(self) -> tuple[LightningOptimizer, LightningOptimizer]:
        """(the meta-model's, the class-learner's): `configure_optimizers` returns both, in this order."""
        meta_opt, cl_opt = cast(list[LightningOptimizer], self.optimizers())
        return meta_opt, cl_opt

    def configure_optimizers(self):
        meta_opt = self.meta_optimizer_factory(self.meta.parameters())
        cl_opt = self.class_learner_optimizer_factory(self.class_learner.parameters())
        schedulers = [TableLR(meta_opt, self.lr_lut)]
        if self.class_learner_lr_scale is not None:  # null: the class-learner keeps its optimizer's LR (the original)
            schedulers.append(TableLR(cl_opt, self.lr_lut, self.class_learner_lr_scale))
        return [meta_opt, cl_opt], schedulers

    # ------------------------------------------------------------------ pseudo data
    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    def _round_of(self, epoch: int) -> int:
        return epoch // int(self.generation.every)

    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch
        meta_opt, _ = self._two_optimizers()
        self.log("train/lr", meta_opt.optimizer.param_groups[0]["lr"])
        wanted = self._round_of(epoch)
        if self.pseudo is None and self.pseudo_path is not None and Path(self.pseudo_path).exists():
            self.pseudo = PseudoData.load(Path(self.pseudo_path))  # resumed: the round's data as it was
        if self.pseudo is None or self.pseudo.round != wanted:
            self.regenerate(wanted)

    @property
    def round_data(self) -> PseudoData:
        """The current round's pseudo data: made (or reloaded) by `on_train_epoch_start` before the epoch's steps."""
        if self.pseudo is None:
            raise RuntimeError("dfml: no pseudo data yet (on_train_epoch_start makes each round's)")
        return self.pseudo

    def _all_gather_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """`all_gather` of one tensor ([world_size, ...] on every rank), the form pseudo-data generation takes."""
        return cast(torch.Tensor, self.all_gather(tensor))

    @torch.no_grad()
    def regenerate(self, round_index: int) -> None:
        """Sample the zoo, guided by the current meta-model backbone and class-learner (eval mode). Under DDP each
        rank samples its share of the round's batches and the shares are gathered: every rank holds the whole round,
        the same images as one process with the same seed and guide (`generate_pseudo_data`)."""
        g = self.generation
        if g.source == "real":  # the positive control: real images of the covered classes, not data-free
            self.pseudo = real_pseudo_data(
                self.datamodule_view(ImageSetData).split(g.real_split),
                self.zoo.class_map,
                int(g.per_class),
                round_index,
            )
            self._report_round(round_index)
            return
        if g.source != "zoo":
            raise ConfigError(
                f"model.generation.source='{g.source}': expected 'zoo' (guided samples, the method) "
                "or 'real' (the meta-train images of the zoo's classes: the positive control)"
            )
        world_size = self.trainer.world_size
        if world_size > 1:
            # every chunk guided by rank 0's weights, whichever rank samples it: the batch-norm running statistics
            # of the ranks differ by their last local step (DDP syncs buffers at the next forward), and a resumed
            # run, whose ranks all load rank 0's checkpoint, then regenerates the same round
            for tensor in (*self.meta.backbone.state_dict().values(), *self.class_learner.state_dict().values()):
                torch.distributed.broadcast(tensor, src=0)
        self.meta.eval()
        self.class_learner.eval()
        zoo = self.zoo.to(self.device)
        scale = float(g.scale) if round_index > 0 or g.guide_round0 else 0.0
        with self.precision_context():  # an epoch hook: Lightning's bf16 covers only the steps
            self.pseudo = pseudo = generate_pseudo_data(
                zoo=zoo,
                backbone=self.meta.backbone,
                class_learner=self.class_learner,
                per_class=int(g.per_class),
                batch_size=int(g.batch_size),
                steps=int(g.steps),
                scale=scale,
                compat=self.compat,
                seed=keyed_seed(self.seed, round_index),
                round_index=round_index,
                spacing=g.spacing,
                rank=self.global_rank,
                world_size=world_size,
                all_gather=self._all_gather_tensor if world_size > 1 else None,
            )
        self.log("pseudo/images_generated", float((pseudo.ranks == self.global_rank).sum()))  # this rank's share
        self.meta.train()
        self.class_learner.train()
        self._report_round(round_index)

    def _report_round(self, round_index: int) -> None:
        """How often the guide and the meta-model agree with the asked pseudo class; a grid of the round."""
        pseudo = self.round_data
        images = pseudo.images.to(self.device).float().div_(255)
        targets = pseudo.labels.to(self.device)
        with torch.no_grad():
            self.meta.eval()
            agree = (
                torch.cat([self.meta.head(self.meta.backbone.embed(chunk)).argmax(-1) for chunk in images.split(256)])
                == targets
            )
            self.meta.train()
        self.log("pseudo/round", float(round_index))
        self.log("pseudo/meta_model_agreement", agree.float().mean())
        if not self.trainer.is_global_zero:
            return
        path = self.run_dir / "pseudo" / f"round{round_index}.pt"
        pseudo.save(path)
        self.pseudo_path = str(path)
        per_class = int(self.grid.per_class)
        order = torch.argsort(pseudo.classes, stable=True)
        counts = torch.bincount(pseudo.classes, minlength=self.n_classes)
        starts = torch.cumsum(counts, 0) - counts
        picks = torch.cat([order[s : s + per_class] for s in starts.tolist()])
        grid = save_grid(pseudo.images[picks].float() / 255, self.run_dir / f"pseudo_round{round_index}.png", per_class)
        log_image(self.loggers, "pseudo/grid", grid)

    # ------------------------------------------------------------------ training
    def _generator(self, batch: torch.Tensor) -> torch.Generator:
        """The episodes and noise of a step depend on (seed, epoch, step, rank) only."""
        step = keyed_seed(self.current_epoch, int(batch.flatten()[0]))
        return generator(rank_seed(stream_seed(self.seed, step), self.global_rank))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        meta_opt, cl_opt = self._two_optimizers()
        gen = self._generator(batch)
        pseudo = self.round_data
        ep = pseudo.episodes(self.shape, self.episodes_per_batch, gen, self.device)
        support = augment(ep.support, self.augment, self.augment_fill, gen)
        query = augment(ep.query, self.augment, self.augment_fill, gen)
        global_logits, spatial = self.meta.train_forward(support, ep.support_labels, query, self.shape.n_way)
        global_loss = F.cross_entropy(global_logits, ep.query_classes.flatten())
        episodic_loss = spatial_episodic_loss(spatial, ep.query_labels)
        loss = global_loss + self.episodic_weight * episodic_loss
        meta_opt.zero_grad()
        self.manual_backward(loss)
        meta_opt.step()

        fresh = pseudo.episodes(self.shape, self.episodes_per_batch, gen, self.device)
        self.meta.eval()  # the teacher and the noisy features use running statistics (spec §4.3)
        cl_loss, ce, kl = class_learner_loss(
            self.meta.backbone,
            self.meta.head,
            self.class_learner,
            augment(fresh.query.flatten(0, 1), self.augment, self.augment_fill, gen),
            fresh.query_classes.flatten(),
            self.zoo.schedule,
            self.compat,
            self.kl_reduction,
            gen,
        )
        self.meta.train()
        cl_opt.zero_grad()
        self.manual_backward(cl_loss)
        cl_opt.step()
        for name, value in (
            ("loss", loss),
            ("global_ce", global_loss),
            ("episodic_ce", episodic_loss),
            ("class_learner_loss", cl_loss),
            ("class_learner_ce", ce),
            ("class_learner_kl", kl),
        ):
            if not torch.isfinite(value):
                raise FloatingPointError(
                    f"stage dfml: train/{name} is {float(value)} at epoch {self.current_epoch}, step {self.global_step}"
                )
            self.log(f"train/{name}", value, prog_bar=name == "loss")

    # ------------------------------------------------------------------ validation: checkpoint selection
    def _score(self, batch: Episodes, dataloader_idx: int, nets: tuple[str, ...]) -> None:
        k = self.shots[dataloader_idx]
        backbones = {"trained": self.meta.backbone, "random_init": self.random_init}
        if self.reference is not None:
            backbones["reference"] = self.reference
        for name in nets:
            backbone = backbones[name].to(self.device)
            self.values.update(
                f"{name}_{k}shot",
                prototype_episode_accuracy(lambda x, b=backbone: b(x).mean(dim=(2, 3)), batch, self.scale_cls),
            )

    def validation_step(self, batch: Episodes, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._score(batch, dataloader_idx, ("trained",))

    def on_validation_epoch_end(self) -> None:
        values = self.values.compute([f"trained_{k}shot" for k in self.shots])
        report = ci_report("val", values)
        accuracy = report[f"val/trained_{self.shape.k_shot}shot"]  # selection on the shot trained for (one model per K)
        self.log_dict({**report, "val/accuracy": accuracy})
        if self.trainer.sanity_checking:
            return
        self.history.append(
            {
                "epoch": self.current_epoch,
                "round": self._round_of(self.current_epoch),
                **{f"{k}shot": report[f"val/trained_{k}shot"] for k in self.shots},
                **{f"{k}shot_ci95": report[f"val/trained_{k}shot_ci95"] for k in self.shots},
            }
        )

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero and self.history:
            curves = {
                f"{k}-shot ({self.datamodule_view(ImageSetData).episode_cfg.val_split})": [
                    (h["round"], h[f"{k}shot"], h[f"{k}shot_ci95"]) for h in self.history
                ]
                for k in self.shots
            }
            path = save_curve_plot(
                curves, self.run_dir / "accuracy_per_round.png", "dfml: accuracy per round", xlabel="regeneration round"
            )
            log_image(self.loggers, "val/accuracy_per_round", path)

    def on_train_epoch_end(self) -> None:
        schedulers = self.lr_schedulers()  # one scheduler, or a list of two (the class-learner's)
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if scheduler is not None:  # configure_optimizers always returns one: None only before it ran
                scheduler.step()  # manual optimisation: Lightning leaves the stepping to the module

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dfml"] = {"pseudo_path": self.pseudo_path, "history": self.history}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.trainer.state.fn == TrainerFn.FITTING:  # resuming: the round's data and the validation history
            state = checkpoint["dfml"]
            self.pseudo_path, self.history = state["pseudo_path"], state["history"]
        else:  # the selected checkpoint, loaded for test (metadiff.run): its weights, this run's history
            self.selected_epoch = int(checkpoint["epoch"])

    # ------------------------------------------------------------------ test: real meta-test episodes
    def on_test_start(self) -> None:
        if self.selected_epoch >= 0:
            self.summary_metrics["val/selected_epoch"] = float(self.selected_epoch)
        self.meta.eval()

    def test_step(self, batch: Episodes, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._score(batch, dataloader_idx, self.test_nets)

    def on_test_epoch_end(self) -> None:
        values = self.values.compute()
        report = ci_report("test", values)
        pairs = {f"trained_minus_random_init_{k}shot": (f"trained_{k}shot", f"random_init_{k}shot") for k in self.shots}
        if self.reference is not None:
            pairs |= {
                f"reference_minus_random_init_{k}shot": (f"reference_{k}shot", f"random_init_{k}shot")
                for k in self.shots
            }
        report |= paired_report("test", values, pairs)
        if self.reference is not None:  # the share of the random-init -> real-data gap the data-free model closes
            for k in self.shots:
                report[f"test/gap_closed_{k}shot"] = (
                    report[f"test/trained_minus_random_init_{k}shot"]
                    / report[f"test/reference_minus_random_init_{k}shot"]
                )
        self.log_dict(report)
        self.summary_metrics.update(report)
        lines = readout_lines(
            f"dfml ({self.compat}): prototype readout on the fixed real meta-test episodes (mean +- 95% CI):",
            report,
            self.shots,
            self.test_nets,
        )
        names = [f"trained_minus_random_init_{k}shot" for k in self.shots]
        notes = (
            {
                name: f"gap closed {report[f'test/gap_closed_{k}shot']:.1%}"
                for name, k in zip(names, self.shots, strict=True)
            }
            if self.reference is not None
            else None
        )
        lines += "\n" + paired_lines("paired per-episode differences (mean +- 95% CI):", report, names, notes, 34)
        self.set_results_text(lines)

    def write_artifact(self, directory: Path) -> None:
        save_tensors(self.meta.state_dict(), directory / WEIGHTS)
        (directory / SPEC).write_text(
            json.dumps(
                {**self.spec, "compat": self.compat, "history": self.history, "selected_epoch": self.selected_epoch}
            )
        )
        for png in sorted(self.run_dir.glob("pseudo_round*.png")) + sorted(self.run_dir.glob("accuracy_*.png")):
            (directory / png.name).write_bytes(png.read_bytes())
