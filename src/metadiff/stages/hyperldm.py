"""Stage `hyperldm`: a latent diffusion model over task latents, conditioned on the question embedding (spec §4.7-§4.8).

Training: (z - mu_z) / sigma_z of the adaptation dataset's latents; the denoiser predicts eps, v or x0
(`prediction`); with classifier-free dropout exactly floor(uncond_rate * B) rows of each batch get the null token
(zeros), as the original. The EMA of the weights is a Lightning `WeightAveraging` callback (`callbacks=ema`,
`metadiff.callbacks.InPlaceEMA`).

The default (`compat=fixed`) is a residual MLP with v-prediction and a DDIM sampler that clips x0_hat; the original's
v1 net, eps-prediction and its own DDPM update (`compat=faithful`) diverge at the cosine schedule's last steps, where
alpha-bar is ~2e-9 and every eps error is multiplied by ~2e4 (measured on condition-determined toy latents: squared
error ~1e8 times the data's spread, vs 0.09 for the default at g = 1; tests/test_hyperldm_sampler.py).

Evaluation on held-out tasks (no support labels: zero-shot), every variant with the same sampling noise per task, so
all differences are paired: for every guidance scale g in `guidance_scales` one latent per task (all scales in ONE
batched sampler run), decoded by the HNET into adapter weights and scored on the task's query split. g = 0 is the
unconditional model, g = 1 the conditional one. References on the same tasks: the HNET's init, the multitask
model, the fine-tuned latents (the oracle ceiling), and a ridge map question -> latent. Options: few-shot guidance
(support-set gradient, spec §4.8; uses labels), HyperCLIP guidance (an upstream `hyperclip` encoder scores x0_hat
against the question, as classifier guidance), ensembles (predictions averaged over several sampled latents), and
init-from-pretrained. The CFG scale reported as `cfg_selected` is chosen on meta-val (the last validation pass);
meta-test is read only here, by `test`. Every sampling run logs its health (spread and range of the normalised
samples) and warns when they leave the data's range.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from metadiff.config import ConfigError, cfg_label
from metadiff.config.typed import as_spec, spec_in
from metadiff.data.meta_vqa.batches import TaskBatch
from metadiff.data.meta_vqa.datamodule import EVAL_SPLITS
from metadiff.diffusion.diagnostics import denoiser_diagnostics
from metadiff.diffusion.sampling import (
    cfg_eps,
    classifier_guidance,
    normalized_gradient_guidance,
    sample,
    sample_health,
    sample_original,
)
from metadiff.diffusion.schedule import PREDICTIONS, NoiseSchedule, Prediction, ScheduleName, Spacing
from metadiff.eval.per_task import PerTaskValues, ci_report
from metadiff.eval.plots import log_image, save_curve_plot
from metadiff.eval.ridge import RidgeMap
from metadiff.meta.latent import LatentLearner
from metadiff.meta.learner import FewShotLearner
from metadiff.nets.adapter import masked_task_accuracy, masked_task_losses
from metadiff.nets.hyperclip import GuidanceObjective, HyperCLIPEncoder, question_log_prob
from metadiff.nets.latent_denoiser import LatentDenoiser
from metadiff.stages.base import LatentData, Stage
from metadiff.stages.fewshot import load_fewshot_learner
from metadiff.stages.hyperclip import load_hyperclip_encoder
from metadiff.stages.vae import load_adaptation_base
from metadiff.store import Artifact
from metadiff.utils.io import write_json
from metadiff.utils.rng import follower_rank_seed, keyed_generator

log = logging.getLogger(__name__)
DENOISER_WEIGHTS, DENOISER_SPEC = "denoiser.pt", "denoiser.json"
SAMPLERS = ("ddim", "ddpm", "original")


@dataclass(frozen=True)
class DenoiserSpec:
    """`model.denoiser` (from conf/hyperldm_compat): `metadiff.nets.latent_denoiser.LatentDenoiser`'s arguments
    except the latent and condition sizes (the upstreams')."""

    version: str
    hidden: list[int]
    time_dim: int
    head_on: str
    cond_norm: str


@dataclass(frozen=True)
class ScheduleSpec:
    """`model.schedule`: the noise schedule (`metadiff.diffusion.schedule.NoiseSchedule.make`)."""

    name: ScheduleName
    n_timesteps: int
    linear_start: float
    linear_end: float


@dataclass(frozen=True)
class SamplingSpec:
    """`model.sampling` (from conf/hyperldm_compat): the evaluation sampler. `spacing` and `eta` are unused by
    `method: original`; `clip_x0` null = no clipping of x0_hat."""

    method: Literal["ddim", "ddpm", "original"]
    steps: int
    eta: float
    spacing: Spacing
    clip_x0: float | None
    guidance_rescale: float


@dataclass(frozen=True)
class GuidedSamplingSpec:
    """`model.fewshot_guidance` and `model.hyperclip_guidance`: one row per guidance scale (none: off), sampled at
    CFG scale `cfg_scale`."""

    scales: list[float]
    cfg_scale: float


@dataclass(frozen=True)
class HyperCLIPGuidanceSpec(GuidedSamplingSpec):
    """`model.hyperclip_guidance`: the guided sampling rows, and what the guidance ascends (`objective`: `cosine`,
    the spec's, or `softmax`, log p(question | x0_hat) among the meta-train questions; `nets.hyperclip`)."""

    objective: GuidanceObjective


@dataclass(frozen=True)
class FromPretrainedSpec:
    """`model.from_pretrained`: sampling started from the HNET init at each `t_fracs` of the schedule (none: off);
    `noise_start` noises the start to its level first (SDEdit)."""

    t_fracs: list[float]
    cfg_scale: float
    noise_start: bool


@dataclass(frozen=True)
class EnsembleSpec:
    """`model.ensemble`: `size` sampled latents per task, their predictions combined (1: off): `combine: logits`
    averages the logits, as the spec's end accuracy does; `probs` averages the softmax (this stage's earlier rule)."""

    size: int
    cfg_scale: float
    combine: Literal["logits", "probs"]


@dataclass(frozen=True)
class DiagnosticsSpec:
    """`model.diagnostics`: denoiser diagnostics on the training latents per timestep band (edges `bands`)."""

    bands: list[int]
    seed: int


@dataclass(frozen=True)
class HealthSpec:
    """`model.health`: when a sampling run warns (entries beyond +-`bound`, per-dimension std outside
    `std_range`, more than `max_outside` of the entries outside)."""

    bound: float
    std_range: list[float]
    max_outside: float


SELECTED = "cfg_selected"  # the CFG variant whose scale meta-val chose, under its own name in the test table
VariantKind = Literal["cfg", "fewshot", "hyperclip", "ensemble", "pretrained"]
TABLE_ORDER: tuple[VariantKind, ...] = ("cfg", "hyperclip", "ensemble", "fewshot", "pretrained")  # rows of the table
SELECTED_KINDS: tuple[VariantKind, ...] = ("hyperclip", "fewshot", "pretrained")  # each its value chosen on meta-val
KIND_VALUE = {"hyperclip": "guidance scale", "fewshot": "guidance scale", "pretrained": "t_frac"}


@dataclass(frozen=True)
class Variant:
    """One sampling variant of the evaluation, defined once (`sampling_variants`): the name its per-task accuracy
    is logged under (`test/<name>`), its row of the table, how it samples, and the references its paired per-task
    difference is reported against (`test/<name>_minus_<reference>`)."""

    kind: VariantKind
    name: str
    label: str
    value: float  # cfg: its scale; fewshot, hyperclip: the guidance scale; ensemble: members; pretrained: t_frac
    cfg_scale: float  # the classifier-free guidance scale its sampler runs at
    references: tuple[str, ...]


def sampling_variants(
    guidance_scales: list[float],
    fewshot: GuidedSamplingSpec,
    hyperclip: GuidedSamplingSpec,
    ensemble: EnsembleSpec,
    from_pretrained: FromPretrainedSpec,
) -> list[Variant]:
    """Every variant the configuration asks for, in sampling order: the CFG scales (all in one batched sampler run),
    few-shot guidance, HyperCLIP guidance, the ensemble (size > 1), starts from the HNET init. Each is compared with
    the HNET init; all but the CFG scales also with the CFG row at the scale they sample with (like with like: the
    same sampler, the same noise, only the guidance added), which `HyperLDMSettings.check` requires in the grid."""

    def guided(cfg_scale: float) -> tuple[str, ...]:
        return ("hnet_init", cfg_label(cfg_scale))

    out = [
        Variant(
            kind="cfg",
            name=cfg_label(g),  # the name a sweep over the scale optimises (`${cfg_label:...}` in conf/)
            label=f"HyperLDM, CFG scale {g:g}" + (" (unconditional)" if g == 0 else ""),
            value=g,
            cfg_scale=g,
            references=("hnet_init",),
        )
        for g in guidance_scales
    ]
    gradient_guided: tuple[tuple[VariantKind, GuidedSamplingSpec, str], ...] = (
        ("fewshot", fewshot, "HyperLDM + few-shot guidance {g:g} (uses support labels)"),
        ("hyperclip", hyperclip, "HyperLDM + HyperCLIP guidance {g:g}"),
    )
    for kind, spec, label in gradient_guided:
        out += [
            Variant(
                kind=kind,
                name=f"{kind}{g:g}",
                label=label.format(g=g),
                value=float(g),
                cfg_scale=float(spec.cfg_scale),
                references=guided(spec.cfg_scale),
            )
            for g in spec.scales
        ]
    size, cfg = int(ensemble.size), float(ensemble.cfg_scale)
    if size > 1:
        out.append(
            Variant(
                kind="ensemble",
                name=f"ensemble{size}",
                label=f"HyperLDM ensemble of {size}, CFG {cfg:g}",
                value=size,
                cfg_scale=cfg,
                references=guided(cfg),
            )
        )
    out += [
        Variant(
            kind="pretrained",
            name=f"pretrained_t{f:g}",
            label=f"HyperLDM from the HNET init, t_frac {f:g}",
            value=float(f),
            cfg_scale=float(from_pretrained.cfg_scale),
            references=guided(from_pretrained.cfg_scale),
        )
        for f in from_pretrained.t_fracs
    ]
    return out


@dataclass(frozen=True)
class HyperLDMSettings:
    """Every setting of the stage: the model config, checked and typed (`of`), less the upstream artifacts. With the
    nets it makes a module (`HyperLDMModule.from_parts`); `denoiser` is the spec the artifact records."""

    denoiser: DenoiserSpec
    prediction: Prediction
    schedule: ScheduleSpec
    uncond_rate: float
    optimizer: Callable[..., torch.optim.Optimizer]
    sampling: SamplingSpec
    guidance_scales: list[float]
    fewshot_guidance: GuidedSamplingSpec
    from_pretrained: FromPretrainedSpec
    hyperclip_guidance: HyperCLIPGuidanceSpec
    ensemble: EnsembleSpec
    ridge_alpha: float | None
    diagnostics: DiagnosticsSpec
    health: HealthSpec
    eval_seed: int
    train_seed: int
    plot: bool

    @classmethod
    def of(cls, **model: Any) -> HyperLDMSettings:
        """From the stage constructor's arguments (the mappings Hydra passes, or specs), checked in one line each."""
        hints = typing.get_type_hints(cls)
        typed = {name: model[name] for name in hints}
        for name, hint in hints.items():
            if (spec := spec_in(hint)) is not None:
                typed[name] = as_spec(spec, model[name], f"model.{name}")
        scales = typed["guidance_scales"]  # one float = one scale (what a sweep over the scale sets)
        typed["guidance_scales"] = [float(g) for g in (scales if isinstance(scales, list | tuple) else [scales])]
        settings = cls(**typed)
        settings.check()
        return settings

    @classmethod
    def from_model_config(cls, model: DictConfig) -> HyperLDMSettings:
        """From an experiment's `model` block as composed (`_target_` and `upstream` aside): for building a module
        from parts (`HyperLDMModule.from_parts`) with the settings in conf/."""
        plain = cast(dict[str, Any], OmegaConf.to_container(model, resolve=True))
        names = {f.name for f in dataclasses.fields(cls)} - {"optimizer"}
        settings = {k: v for k, v in plain.items() if k in names}
        return cls.of(**settings, optimizer=hydra.utils.instantiate(model.optimizer))

    def check(self) -> None:
        """The settings that no type says are wrong together, each refused in one line naming the key."""
        if not 0.0 <= self.uncond_rate < 1.0:
            raise ConfigError(f"model.uncond_rate = {self.uncond_rate}: expected a fraction in [0, 1)")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"model.prediction = '{self.prediction}' is not one of {PREDICTIONS}")
        if self.sampling.method not in SAMPLERS:
            raise ConfigError(f"model.sampling.method = '{self.sampling.method}' is not one of {SAMPLERS}")
        if self.sampling.method == "original" and self.prediction != "eps":
            raise ConfigError(
                "model.sampling.method = original is the original's eps-prediction DDPM update: it needs "
                f"model.prediction = eps, not '{self.prediction}'"
            )
        paired = {
            "fewshot_guidance": bool(self.fewshot_guidance.scales),
            "hyperclip_guidance": bool(self.hyperclip_guidance.scales),
            "ensemble": self.ensemble.size > 1,
            "from_pretrained": bool(self.from_pretrained.t_fracs),
        }
        for key, on in paired.items():
            cfg_scale = float(getattr(self, key).cfg_scale)
            if on and cfg_scale not in self.guidance_scales:
                raise ConfigError(
                    f"model.{key}.cfg_scale = {cfg_scale:g}: its rows are paired against the CFG row at the scale they "
                    f"sample with, and model.guidance_scales = {self.guidance_scales} has no such row; add it"
                )
        if self.uncond_rate == 0 and any(g != 1.0 for g in self.guidance_scales):
            raise ConfigError(
                "guidance scales other than 1 need a model trained with the null token "
                "(model.uncond_rate > 0); set model.guidance_scales=[1.0] otherwise"
            )


class HyperLDMModule(Stage, name="hyperldm"):
    latent_mean: torch.Tensor  # buffers: the statistics of the training latents, checkpointed
    latent_std: torch.Tensor

    @classmethod
    def check_config(cls, model: DictConfig) -> None:
        """The settings' own checks (`HyperLDMSettings.check`), from the config before any upstream is built."""
        HyperLDMSettings.from_model_config(model)

    @classmethod
    def required_upstreams(cls, model: DictConfig) -> tuple[str, ...]:
        """HyperCLIP guidance needs the HyperCLIP encoder."""
        return ("adaptation", "hnet", *(("hyperclip",) if model.hyperclip_guidance.scales else ()))

    def __init__(
        self,
        denoiser: DenoiserSpec,
        prediction: Prediction,
        schedule: ScheduleSpec,
        uncond_rate: float,
        optimizer: Callable[..., torch.optim.Optimizer],
        sampling: SamplingSpec,
        guidance_scales: list[float] | float,
        fewshot_guidance: GuidedSamplingSpec,
        from_pretrained: FromPretrainedSpec,
        hyperclip_guidance: HyperCLIPGuidanceSpec,
        ensemble: EnsembleSpec,
        ridge_alpha: float | None,
        diagnostics: DiagnosticsSpec,
        health: HealthSpec,
        eval_seed: int,
        train_seed: int,
        plot: bool,
        upstream: dict[str, Artifact] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["optimizer", "upstream"])
        settings = HyperLDMSettings.of(
            denoiser=denoiser,
            prediction=prediction,
            schedule=schedule,
            uncond_rate=uncond_rate,
            optimizer=optimizer,
            sampling=sampling,
            guidance_scales=guidance_scales,
            fewshot_guidance=fewshot_guidance,
            from_pretrained=from_pretrained,
            hyperclip_guidance=hyperclip_guidance,
            ensemble=ensemble,
            ridge_alpha=ridge_alpha,
            diagnostics=diagnostics,
            health=health,
            eval_seed=eval_seed,
            train_seed=train_seed,
            plot=plot,
        )
        hnet, adaptation = self.upstream_artifact(upstream, "hnet"), self.upstream_artifact(upstream, "adaptation")
        base = load_adaptation_base(hnet, adaptation)
        # other methods' zero-shot accuracy on the same tasks, for the table (upstream `multitask`, optional)
        multitask = (upstream or {}).get("multitask")
        self._assemble(
            settings,
            base,
            LatentDenoiser(base.latent_dim, base.shape.embed_dim, **dataclasses.asdict(settings.denoiser)),
            load_fewshot_learner(multitask)[0].requires_grad_(False) if multitask is not None else None,
            (
                load_hyperclip_encoder(self.upstream_artifact(upstream, "hyperclip"))
                if settings.hyperclip_guidance.scales
                else None
            ),
        )

    @classmethod
    def from_parts(
        cls,
        settings: HyperLDMSettings,
        base: LatentLearner,
        denoiser: LatentDenoiser,
        multitask: FewShotLearner | None = None,
        hyperclip: tuple[HyperCLIPEncoder, str] | None = None,
    ) -> HyperLDMModule:
        """A module from its settings and nets, without upstream artifacts: e.g. a test's tiny latent learner (`base`,
        what the HNET or VAE decoder is in a run) and tiny denoiser over its latents. No hyperparameters are saved (a
        run's module is built by the constructor)."""
        module = cls.__new__(cls)
        Stage.__init__(module)
        module._assemble(settings, base, denoiser, multitask, hyperclip)
        return module

    def _assemble(
        self,
        settings: HyperLDMSettings,
        base: LatentLearner,
        denoiser: LatentDenoiser,
        multitask: FewShotLearner | None,
        hyperclip: tuple[HyperCLIPEncoder, str] | None,
    ) -> None:
        """Everything both constructors share: the nets, the settings as attributes, the variants and their values."""
        self.settings = settings
        self.denoiser_spec, self.schedule_spec, self.sampling = settings.denoiser, settings.schedule, settings.sampling
        self.fewshot, self.from_pretrained = settings.fewshot_guidance, settings.from_pretrained
        self.hyperclip_guidance, self.ensemble = settings.hyperclip_guidance, settings.ensemble
        self.diagnostics, self.health = settings.diagnostics, settings.health
        self.base, self.denoiser = base, denoiser
        self.schedule = NoiseSchedule.make(**dataclasses.asdict(self.schedule_spec))
        self.register_buffer("latent_mean", torch.zeros(self.base.latent_dim))
        self.register_buffer("latent_std", torch.ones(self.base.latent_dim))
        self.prediction, self.uncond_rate, self.optimizer_factory = (
            settings.prediction,
            settings.uncond_rate,
            settings.optimizer,
        )
        self.eval_seed, self.train_seed, self.plot = settings.eval_seed, settings.train_seed, settings.plot
        self.guidance_scales = settings.guidance_scales
        self.multitask = multitask
        self.hyperclip: HyperCLIPEncoder | None = hyperclip[0] if hyperclip is not None else None
        self.hyperclip_input: str | None = hyperclip[1] if hyperclip is not None else None  # "latent" or "weights"
        self.ridge_alpha = settings.ridge_alpha
        self.variants = sampling_variants(
            self.guidance_scales, self.fewshot, self.hyperclip_guidance, self.ensemble, self.from_pretrained
        )
        self.references = (
            ["hnet_init", "oracle"]
            + (["multitask"] if self.multitask is not None else [])
            + (["ridge"] if self.ridge_alpha is not None else [])
        )
        # every rank evaluates all tasks in one process's batches (EveryRankSampler): no gather, the same noise keys
        self.values = PerTaskValues(
            [f"{split}/{name}" for split in ("val", "test") for name in (*self.references, *self.variant_names)],
            sync=False,
        )
        self.samples = PerTaskValues(
            [f"{split}/{name}" for split in ("val", "test") for name in self.variant_names], sync=False
        )
        self.val_report: dict[str, float] = {}
        self._ridge: RidgeMap | None = None

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    def _of_kind(self, kind: VariantKind) -> list[Variant]:
        return [v for v in self.variants if v.kind == kind]

    def frozen_upstream_nets(self) -> tuple[str, ...]:
        """The HNET (or VAE decoder), the multitask learner and HyperCLIP: read from their artifacts, never trained."""
        return ("base", *(name for name in ("multitask", "hyperclip") if getattr(self, name) is not None))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.denoiser.parameters())

    def on_fit_start(self) -> None:
        if self.trainer.ckpt_path:  # resumed: the statistics are buffers of the checkpoint
            return
        data = self.datamodule_view(LatentData).adaptation
        self.latent_mean.copy_(data.latent_mean)
        self.latent_std.copy_(data.latent_std)
        if self.denoiser.cond_norm == "standard":
            self.denoiser.set_condition_stats(data.train_questions)

    # -- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        z, question, _ = batch
        z0 = (z - self.latent_mean) / self.latent_std
        # randomness of step k depends only on (seed, rank, k), so a run resumed from a checkpoint continues exactly
        gen = keyed_generator(follower_rank_seed(self.train_seed, self.global_rank), self.global_step)
        cond = question.float().clone()
        n_null = int(self.uncond_rate * z.shape[0])  # an exact fraction per batch, as the original
        if n_null:
            cond[torch.randperm(z.shape[0], generator=gen)[:n_null].to(z.device)] = 0.0
        t = torch.randint(0, self.schedule.n_timesteps, (z.shape[0],), generator=gen).to(z.device)
        noise = torch.randn(z0.shape, generator=gen).to(z0)
        target = self.schedule.training_target(z0, noise, t, self.prediction)
        loss = F.mse_loss(self.denoiser(self.schedule.add_noise(z0, noise, t), t, cond), target)
        self.log("train/diffusion_loss", loss, prog_bar=True, batch_size=z.shape[0])
        return loss

    # -- sampling -------------------------------------------------------------------------------------------------
    def _model(
        self, question: torch.Tensor, scales: torch.Tensor
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        null = torch.zeros(1, question.shape[-1], device=question.device)
        rescale = float(self.sampling.guidance_rescale)
        return lambda x, t: cfg_eps(self.denoiser, x, t, question.float(), null, scales, rescale=rescale)

    def sample_latents(
        self,
        question: torch.Tensor,
        scales: torch.Tensor,
        generator: torch.Generator,
        guidance: Callable | None = None,
        x_start: torch.Tensor | None = None,
        start_frac: float = 1.0,
        noise_repeats: int = 1,
    ) -> torch.Tensor:
        """Normalised latents, one per row of `question` [N, e] with per-row guidance scales [N]. `noise_repeats`:
        the r blocks of rows get the same noise (one block per scale: paired comparisons)."""
        model = self._model(question, scales)
        shape = (question.shape[0], self.base.latent_dim)
        if self.sampling.method == "original":
            big_t, steps = self.schedule.n_timesteps, int(self.sampling.steps)
            if big_t % steps:
                raise ConfigError(
                    f"model.sampling.steps = {steps}: the original sampler respaces by k = T / steps, "
                    f"so steps must divide T = {big_t}"
                )
            return sample_original(
                model,
                self.schedule,
                shape,
                respacing=big_t // steps,
                start_frac=start_frac,
                x_start=x_start,
                guidance=guidance,
                generator=generator,
                device=question.device,
                noise_repeats=noise_repeats,
            )
        timesteps = self.schedule.set_timesteps(int(self.sampling.steps), self.sampling.spacing, start_frac)
        clip = self.sampling.clip_x0
        return sample(
            model,
            self.schedule,
            timesteps,
            shape=shape,
            method=self.sampling.method,
            eta=float(self.sampling.eta),
            guidance=guidance,
            x_start=x_start,
            noise_start=bool(self.from_pretrained.noise_start),
            generator=generator,
            device=question.device,
            clip_x0=None if clip is None else float(clip),
            reclip_guided=True,
            prediction=self.prediction,
            noise_repeats=noise_repeats,
        )

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.latent_std + self.latent_mean

    def _logits(self, z: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        return self.base.latent_logits(z, batch.query_x, batch.answers, batch.answer_mask)

    def _accuracy(self, z: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        return masked_task_accuracy(self._logits(z, batch), batch.query_y, batch.query_mask)

    def _generator(self, batch: TaskBatch) -> torch.Generator:
        """The same noise for every variant of a task batch: each variant restarts this generator."""
        return keyed_generator(self.eval_seed, int(batch.task_index[0]))

    def _full(self, n: int, value: float) -> torch.Tensor:
        return torch.full((n,), float(value), device=self.device)

    def _record(self, split: str, name: str, x: torch.Tensor, batch: TaskBatch) -> None:
        """Score normalised samples x [n, D] and keep them for the health report."""
        self.samples.update(f"{split}/{name}", x)
        with torch.no_grad():
            self.values.update(f"{split}/{name}", self._accuracy(self.raw(x), batch))

    def _evaluate(self, batch: TaskBatch, split: str, data_split: str) -> None:
        n = batch.n_tasks
        init = self.base.initial_inner(batch.question)["z"]
        with torch.no_grad():
            self.values.update(f"{split}/hnet_init", self._accuracy(init, batch))
            latents = self.datamodule_view(LatentData).adaptation.eval_latents[data_split]
            oracle = latents[batch.task_index.cpu()]
            self.values.update(f"{split}/oracle", self._accuracy(oracle.to(self.device), batch))
            if self.multitask is not None:
                logits = self.multitask.logits(
                    self.multitask.initial_inner(batch.question),
                    batch.question,
                    batch.query_x,
                    batch.answers,
                    batch.answer_mask,
                )
                self.values.update(f"{split}/multitask", masked_task_accuracy(logits, batch.query_y, batch.query_mask))
            if self.ridge_alpha is not None:
                self.values.update(f"{split}/ridge", self._accuracy(self.ridge()(batch.question), batch))
            cfg = self._of_kind("cfg")  # every scale in one batched sampler run, the same noise per scale
            k = len(cfg)
            scales = torch.tensor([v.cfg_scale for v in cfg], device=self.device).repeat_interleave(n)
            x = self.sample_latents(batch.question.repeat(k, 1), scales, self._generator(batch), noise_repeats=k)
            for i, variant in enumerate(cfg):
                self._record(split, variant.name, x[i * n : (i + 1) * n], batch)
        for variant in self.variants:  # each restarts the task batch's generator: the same noise as the CFG rows
            if variant.kind == "fewshot":
                x = self.sample_latents(
                    batch.question,
                    self._full(n, variant.cfg_scale),
                    self._generator(batch),
                    guidance=normalized_gradient_guidance(self._support_loss(batch), variant.value),
                )
                self._record(split, variant.name, x, batch)
            elif variant.kind == "hyperclip":
                scale = self._full(n, variant.cfg_scale)
                guide = classifier_guidance(self._hyperclip_log_prob(batch, scale), variant.value, self.schedule)
                x = self.sample_latents(batch.question, scale, self._generator(batch), guidance=guide)
                self._record(split, variant.name, x, batch)
            elif variant.kind == "ensemble":
                self._evaluate_ensemble(batch, split, variant)
            elif variant.kind == "pretrained":
                with torch.no_grad():
                    x = self.sample_latents(
                        batch.question,
                        self._full(n, variant.cfg_scale),
                        self._generator(batch),
                        x_start=(init - self.latent_mean) / self.latent_std,
                        start_frac=variant.value,
                    )
                    self._record(split, variant.name, x, batch)

    @torch.no_grad()
    def _evaluate_ensemble(self, batch: TaskBatch, split: str, variant: Variant) -> None:
        """`variant.value` sampled latents per task, their answer logits (or probabilities) averaged."""
        members, n = int(variant.value), batch.n_tasks
        x = self.sample_latents(
            batch.question.repeat(members, 1), self._full(n * members, variant.cfg_scale), self._generator(batch)
        )
        self.samples.update(f"{split}/{variant.name}", x)
        logits = [self._logits(self.raw(m), batch) for m in x.chunk(members)]
        if self.ensemble.combine == "probs":
            logits = [z.softmax(-1) for z in logits]  # the argmax of the mean probability
        combined = torch.stack(logits).mean(0)
        self.values.update(f"{split}/{variant.name}", masked_task_accuracy(combined, batch.query_y, batch.query_mask))

    def ridge(self) -> RidgeMap:
        """Question -> fine-tuned latent, fitted on the meta-train tasks' evaluation fine-tunes (once)."""
        if self.ridge_alpha is None:
            raise RuntimeError("hyperldm: model.ridge_alpha is null, so there is no ridge reference")
        if self._ridge is None:
            data = self.datamodule_view(LatentData).adaptation
            self._ridge = RidgeMap.fit(data.train_questions, data.eval_latents["meta_train"], float(self.ridge_alpha))
        return self._ridge

    def _support_loss(self, batch: TaskBatch) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Few-shot guidance's loss of a normalised latent: cross-entropy of its weights on the support set."""

        def loss(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            logits = self.base.latent_logits(self.raw(x), batch.support_x, batch.answers, batch.answer_mask)
            return masked_task_losses(logits, batch.support_y, batch.support_mask)

        return loss

    def _hyperclip_log_prob(
        self, batch: TaskBatch, scales: torch.Tensor
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """log p(question | x_t), scored on the denoiser's x0_hat (the encoder was trained on clean latents; the
        gradient flows through the denoiser, as DPS does): `model.hyperclip_guidance.objective` of its HyperCLIP
        embedding (`question_log_prob`: the spec's cosine, or the softmax over the meta-train questions)."""
        encoder = self.hyperclip
        if encoder is None:
            raise RuntimeError("hyperldm: HyperCLIP guidance without a HyperCLIP encoder (upstream 'hyperclip')")
        objective = self.hyperclip_guidance.objective
        others = self.datamodule_view(LatentData).adaptation.train_questions.to(self.device)  # read by `softmax`
        model = self._model(batch.question, scales)

        def log_prob(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x0, _ = self.schedule.split_prediction(x, model(x, t), t, self.prediction)
            z = self.raw(x0)
            embedded = encoder(z if self.hyperclip_input == "latent" else self.base.decode(z))
            return question_log_prob(embedded, batch.question, objective, encoder.logit_scale, others)

        return log_prob

    def validation_step(self, batch: TaskBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 1:  # held-out tasks only: the meta-train loader is the fit diagnostic of other stages
            self._evaluate(batch, "val", EVAL_SPLITS[1])

    def on_validation_epoch_end(self) -> None:
        names = [f"val/{n}" for n in (*self.references, *self.variant_names)]
        report = ci_report("val", {k.split("/", 1)[1]: v for k, v in self.values.compute(names).items()})
        report |= self._health_report("val")
        self.log_dict(report)
        self.val_report = report

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test", "meta_test")

    # -- reports --------------------------------------------------------------------------------------------------
    def _health_report(self, split: str) -> dict[str, float]:
        """Spread and range of the normalised samples of every variant; a loud warning when they leave the data's."""
        out: dict[str, float] = {}
        lo, hi = (float(v) for v in self.health.std_range)
        for name, x in self.samples.compute([f"{split}/{n}" for n in self.variant_names]).items():
            if not x.numel():
                continue
            h = sample_health(x, float(self.health.bound))
            variant = name.split("/", 1)[1]
            out |= {f"{split}/health/{variant}_{key}": value for key, value in h.items()}
            std = h.get("std", 1.0)  # no spread from one sample: judged by its range alone
            if not lo <= std <= hi or h["outside"] > float(self.health.max_outside):
                log.warning(
                    "SAMPLER HEALTH %s/%s: per-dimension std %.3g (data: 1, expected in [%g, %g]), "
                    "%.1f%% of entries outside +-%g, max |x| %.3g: the samples left the data's range",
                    split,
                    variant,
                    std,
                    lo,
                    hi,
                    100 * h["outside"],
                    self.health.bound,
                    h["max_abs"],
                )
        return out

    def _selected(self, kind: VariantKind = "cfg") -> Variant | None:
        """The variant of `kind` (its scale, or t_frac) with the best meta-val accuracy in the last validation pass
        (None: no validation ran; a tie goes to the larger value)."""
        scored = [
            (self.val_report[f"val/{v.name}"], v.value, v)
            for v in self._of_kind(kind)
            if f"val/{v.name}" in self.val_report
        ]
        return max(scored, key=lambda s: s[:2])[2] if scored else None

    def _selected_per_kind(self) -> dict[str, Variant]:
        """`<kind>_selected` -> the guided variant of that kind chosen on meta-val, for the kinds with more than one
        value (few-shot and HyperCLIP guidance scales, from-pretrained t_fracs): each method at its own best setting,
        chosen as the CFG scale is, never on meta-test."""
        out = {}
        for kind in SELECTED_KINDS:
            if len(self._of_kind(kind)) > 1 and (chosen := self._selected(kind)) is not None:
                out[f"{kind}_selected"] = chosen
        return out

    def _denoiser_diagnostics(self) -> dict[str, float]:
        data = self.datamodule_view(LatentData).adaptation
        x0 = (data.train_latents[0].to(self.device) - self.latent_mean) / self.latent_std
        out = denoiser_diagnostics(
            self.denoiser,
            self.schedule,
            x0,
            data.train_questions.to(self.device).float(),
            self.prediction,
            [int(b) for b in self.diagnostics.bands],
            int(self.diagnostics.seed),
        )
        return {f"diag/{k}": v for k, v in out.items()}

    def on_test_epoch_end(self) -> None:
        values = self.values.compute([f"test/{n}" for n in (*self.references, *self.variant_names)])
        per_task = {k.split("/", 1)[1]: v for k, v in values.items()}
        chosen = self._selected()
        selected = chosen.value if chosen is not None else None
        if chosen is not None:
            per_task[SELECTED] = per_task[chosen.name]
        else:
            log.warning(
                "no validation pass ran before test: the CFG scale cannot be selected on meta-val, so the table "
                "has no cfg_selected row (validate at the last epoch: trainer.check_val_every_n_epoch)"
            )
        per_kind = self._selected_per_kind()
        for name, variant in per_kind.items():
            per_task[name] = per_task[variant.name]
        report = ci_report("test", per_task)
        report |= {f"test/{name}_value": variant.value for name, variant in per_kind.items()}
        # paired per-task differences on the same tasks and noise
        for name, minus in self._paired_rows(per_task, per_kind):
            report |= ci_report("test", {f"{name}_minus_{minus}": per_task[name] - per_task[minus]})
        if selected is not None:
            report["test/selected_scale"] = selected
        report |= self._health_report("test")
        report |= self._denoiser_diagnostics()
        self.log_dict(report)
        self.summary_metrics.update(report)
        if self.trainer.is_global_zero:
            plot = self._save_plot(report) if self.plot else None
            # printed by metadiff.run as the end of the run's summary: the claims table is the last thing a run shows
            self.set_results_text(self._table(report, selected) + (f"\nplot: {plot}" if plot is not None else ""))

    def _paired_rows(
        self, per_task: dict[str, torch.Tensor], per_kind: dict[str, Variant] | None = None
    ) -> list[tuple[str, str]]:
        """(method, reference) pairs whose per-task difference the table reports: every variant against its
        references (`Variant.references`: the HNET init and the CFG row at its own scale), each kind's variant chosen
        on meta-val (`per_kind`) against the same, the selected CFG scale against every reference row and the
        unconditional model, the oracle and the ridge map against the HNET init."""
        rows = [(v.name, ref) for v in self.variants for ref in v.references]
        rows += [(name, ref) for name, v in (per_kind or {}).items() for ref in v.references]
        if SELECTED in per_task:
            rows += [(SELECTED, ref) for ref in ("hnet_init", "multitask", "ridge", "oracle") if ref in per_task]
            rows += [(SELECTED, v.name) for v in self._of_kind("cfg") if v.value == 0.0]
        rows += [("oracle", "hnet_init")] + [("ridge", "hnet_init")] * ("ridge" in per_task)
        return list(dict.fromkeys(rows))

    def _labels(self) -> list[tuple[str, str]]:
        """(label, metric name) of every row of the table, in its order (`TABLE_ORDER` for the variants)."""
        rows = [("multitask (one shared adapter)", "multitask")] if self.multitask is not None else []
        rows += [("HNET (meta-learned init latent, no sampling)", "hnet_init")]
        rows += [("ridge map question -> fine-tuned latent", "ridge")] if self.ridge_alpha is not None else []
        rows += [(v.label, v.name) for v in self._of_kind("cfg")]
        rows += [("HyperLDM, CFG scale chosen on meta-val", SELECTED)]
        for kind in TABLE_ORDER[1:]:
            rows += [(v.label, v.name) for v in self._of_kind(kind)]
            if kind in SELECTED_KINDS:
                rows += [(f"  its {KIND_VALUE[kind]} chosen on meta-val", f"{kind}_selected")]
        rows += [("oracle: latents fine-tuned on the task's train split", "oracle")]
        return rows

    def _table(self, report: dict[str, float], selected: float | None) -> str:
        lines = [
            "",
            "zero-shot accuracy on meta-test tasks (mean +- 95% CI; CFG scale chosen on meta-val"
            + (f": {selected:g})" if selected is not None else ": no validation ran)"),
        ]
        lines += [
            f"  {label:<58s} {report[f'test/{key}']:.3f} +- {report[f'test/{key}_ci95']:.3f}"
            for label, key in self._labels()
            if f"test/{key}" in report
        ]
        lines += ["paired per-task differences (same tasks, same sampling noise; mean +- 95% CI):"]
        lines += [
            f"  {k[5:]:<58s} {v:+.3f} +- {report[k + '_ci95']:.3f}"
            for k, v in report.items()
            if "_minus_" in k and not k.endswith("_ci95")
        ]
        return "\n".join(lines)

    def _save_plot(self, report: dict[str, float]) -> Path:
        out = Path(self.trainer.default_root_dir)
        cfg = self._of_kind("cfg")
        curve = {"HyperLDM (CFG)": [(v.value, report[f"test/{v.name}"], report[f"test/{v.name}_ci95"]) for v in cfg]}
        on_the_axis = {v.name for v in cfg} | {SELECTED}
        for label, key in self._labels():  # every other row as a flat line across the scales
            if key not in on_the_axis and f"test/{key}" in report:
                curve[label.split(" (")[0]] = [
                    (v.value, report[f"test/{key}"], report[f"test/{key}_ci95"]) for v in cfg
                ]
        path = save_curve_plot(
            curve,
            out / "accuracy_vs_guidance.png",
            xlabel="guidance scale",
            title="HyperLDM: meta-test zero-shot accuracy",
        )
        write_json(out / "accuracy_vs_guidance.json", curve)
        log_image(self.loggers, "test/accuracy_vs_guidance", path)
        return path

    def write_artifact(self, directory: Path) -> None:
        torch.save(
            {
                "denoiser": self.denoiser.state_dict(),
                "latent_mean": self.latent_mean.cpu(),
                "latent_std": self.latent_std.cpu(),
            },
            directory / DENOISER_WEIGHTS,
        )
        (directory / DENOISER_SPEC).write_text(
            json.dumps(
                {
                    "latent_dim": self.base.latent_dim,
                    "cond_dim": self.denoiser.cond_dim,
                    **dataclasses.asdict(self.denoiser_spec),
                    "prediction": self.prediction,
                    "schedule": dataclasses.asdict(self.schedule_spec),
                    "uncond_rate": self.uncond_rate,
                },
                default=list,
            )
        )


def load_denoiser_state(artifact: Artifact) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    """What a `hyperldm` artifact holds of the trained model: the denoiser's state dict (`denoiser`) and the latent
    statistics it was trained in (`latent_mean`, `latent_std`)."""
    return torch.load(Path(artifact.file(DENOISER_WEIGHTS)), map_location="cpu", weights_only=True)
