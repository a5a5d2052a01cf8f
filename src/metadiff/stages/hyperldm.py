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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from metadiff.config import ConfigError, cfg_label
from metadiff.config.typed import as_spec
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
from metadiff.nets.adapter import masked_task_accuracy, masked_task_losses
from metadiff.nets.latent_denoiser import LatentDenoiser
from metadiff.stages.base import Stage
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
class FromPretrainedSpec:
    """`model.from_pretrained`: sampling started from the HNET init at each `t_fracs` of the schedule (none: off);
    `noise_start` noises the start to its level first (SDEdit)."""

    t_fracs: list[float]
    cfg_scale: float
    noise_start: bool


@dataclass(frozen=True)
class EnsembleSpec:
    """`model.ensemble`: `size` sampled latents per task, their predictions averaged (1: off)."""

    size: int
    cfg_scale: float


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


class HyperLDMModule(Stage, name="hyperldm"):
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
        hyperclip_guidance: GuidedSamplingSpec,
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
        self.denoiser_spec = as_spec(DenoiserSpec, denoiser, "model.denoiser")
        self.schedule_spec = as_spec(ScheduleSpec, schedule, "model.schedule")
        self.sampling = as_spec(SamplingSpec, sampling, "model.sampling")
        self.fewshot = as_spec(GuidedSamplingSpec, fewshot_guidance, "model.fewshot_guidance")
        self.from_pretrained = as_spec(FromPretrainedSpec, from_pretrained, "model.from_pretrained")
        self.hyperclip_guidance = as_spec(GuidedSamplingSpec, hyperclip_guidance, "model.hyperclip_guidance")
        self.ensemble = as_spec(EnsembleSpec, ensemble, "model.ensemble")
        self.diagnostics = as_spec(DiagnosticsSpec, diagnostics, "model.diagnostics")
        self.health = as_spec(HealthSpec, health, "model.health")
        if not upstream or "adaptation" not in upstream or "hnet" not in upstream:
            raise ConfigError("hyperldm needs upstreams 'hnet' and 'adaptation' (see conf/experiment/hyperldm_*.yaml)")
        if not 0.0 <= uncond_rate < 1.0:
            raise ConfigError(f"model.uncond_rate = {uncond_rate}: expected a fraction in [0, 1)")
        if prediction not in PREDICTIONS:
            raise ConfigError(f"model.prediction = '{prediction}' is not one of {PREDICTIONS}")
        if self.sampling.method not in SAMPLERS:
            raise ConfigError(f"model.sampling.method = '{self.sampling.method}' is not one of {SAMPLERS}")
        if self.sampling.method == "original" and prediction != "eps":
            raise ConfigError(
                "model.sampling.method = original is the original's eps-prediction DDPM update: it needs "
                f"model.prediction = eps, not '{prediction}'"
            )
        self.base = load_adaptation_base(upstream)
        self.denoiser = LatentDenoiser(
            self.base.latent_dim, self.base.shape.embed_dim, **dataclasses.asdict(self.denoiser_spec)
        )
        self.schedule = NoiseSchedule.make(**dataclasses.asdict(self.schedule_spec))
        self.register_buffer("latent_mean", torch.zeros(self.base.latent_dim))
        self.register_buffer("latent_std", torch.ones(self.base.latent_dim))
        self.prediction, self.uncond_rate, self.optimizer_factory = prediction, uncond_rate, optimizer
        self.eval_seed, self.train_seed, self.plot = eval_seed, train_seed, plot
        # one float = one scale (what a sweep over the scale sets; hparams_search=hyperldm_guidance)
        scales = guidance_scales if isinstance(guidance_scales, list | tuple) else [guidance_scales]
        self.guidance_scales = [float(g) for g in scales]
        if uncond_rate == 0 and any(g != 1.0 for g in self.guidance_scales):
            raise ConfigError(
                "guidance scales other than 1 need a model trained with the null token "
                "(model.uncond_rate > 0); set model.guidance_scales=[1.0] otherwise"
            )
        # other methods' zero-shot accuracy on the same tasks, for the table (upstream `multitask`, optional)
        self.multitask = (
            load_fewshot_learner(upstream["multitask"])[0].requires_grad_(False) if "multitask" in upstream else None
        )
        self.hyperclip, self.hyperclip_input = None, None
        if self.hyperclip_guidance.scales:
            if "hyperclip" not in upstream:
                raise ConfigError(
                    "model.hyperclip_guidance.scales needs an upstream 'hyperclip' "
                    "(upstream.hyperclip in the experiment)"
                )
            self.hyperclip, self.hyperclip_input = load_hyperclip_encoder(upstream["hyperclip"])
        self.ridge_alpha = ridge_alpha
        self.variants = self._variants()
        self.references = (
            ["hnet_init", "oracle"]
            + (["multitask"] if self.multitask is not None else [])
            + (["ridge"] if ridge_alpha is not None else [])
        )
        # every rank evaluates all tasks in one process's batches (EveryRankSampler): no gather, the same noise keys
        self.values = PerTaskValues(
            [f"{split}/{name}" for split in ("val", "test") for name in (*self.references, *self.variants)], sync=False
        )
        self.samples = PerTaskValues(
            [f"{split}/{name}" for split in ("val", "test") for name in self.variants], sync=False
        )
        self.val_report: dict[str, float] = {}
        self._ridge: RidgeMap | None = None

    def _variants(self) -> list[str]:
        names = [cfg_label(g) for g in self.guidance_scales]
        names += [f"fewshot{g:g}" for g in self.fewshot.scales]
        names += [f"hyperclip{g:g}" for g in self.hyperclip_guidance.scales]
        if int(self.ensemble.size) > 1:
            names.append(f"ensemble{int(self.ensemble.size)}")
        names += [f"pretrained_t{f:g}" for f in self.from_pretrained.t_fracs]
        return names

    def frozen_upstream_nets(self) -> tuple[str, ...]:
        """The HNET (or VAE decoder), the multitask learner and HyperCLIP: read from their artifacts, never trained."""
        return ("base", *(name for name in ("multitask", "hyperclip") if getattr(self, name) is not None))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.denoiser.parameters())

    def on_fit_start(self) -> None:
        if self.trainer.ckpt_path:  # resumed: the statistics are buffers of the checkpoint
            return
        data = self.trainer.datamodule.adaptation
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
        steps = self.schedule.set_timesteps(int(self.sampling.steps), self.sampling.spacing, start_frac)
        clip = self.sampling.clip_x0
        return sample(
            model,
            self.schedule,
            steps,
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
            oracle = self.trainer.datamodule.adaptation.eval_latents[data_split][batch.task_index.cpu()]
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
            k = len(self.guidance_scales)
            scales = torch.tensor(self.guidance_scales, device=self.device).repeat_interleave(n)
            x = self.sample_latents(batch.question.repeat(k, 1), scales, self._generator(batch), noise_repeats=k)
            for i, g in enumerate(self.guidance_scales):
                self._record(split, cfg_label(g), x[i * n : (i + 1) * n], batch)
        for g in self.fewshot.scales:
            x = self.sample_latents(
                batch.question,
                self._full(n, self.fewshot.cfg_scale),
                self._generator(batch),
                guidance=normalized_gradient_guidance(self._support_loss(batch), float(g)),
            )
            self._record(split, f"fewshot{g:g}", x, batch)
        for g in self.hyperclip_guidance.scales:
            scale = self._full(n, self.hyperclip_guidance.cfg_scale)
            guide = classifier_guidance(self._hyperclip_log_prob(batch, scale), float(g), self.schedule)
            x = self.sample_latents(batch.question, scale, self._generator(batch), guidance=guide)
            self._record(split, f"hyperclip{g:g}", x, batch)
        members = int(self.ensemble.size)
        if members > 1:
            with torch.no_grad():
                x = self.sample_latents(
                    batch.question.repeat(members, 1),
                    self._full(n * members, self.ensemble.cfg_scale),
                    self._generator(batch),
                )
                self.samples.update(f"{split}/ensemble{members}", x)
                probs = torch.stack([self._logits(self.raw(m), batch).softmax(-1) for m in x.chunk(members)]).mean(0)
                self.values.update(
                    f"{split}/ensemble{members}", masked_task_accuracy(probs, batch.query_y, batch.query_mask)
                )
        start = (init - self.latent_mean) / self.latent_std
        for frac in self.from_pretrained.t_fracs:
            with torch.no_grad():
                x = self.sample_latents(
                    batch.question,
                    self._full(n, self.from_pretrained.cfg_scale),
                    self._generator(batch),
                    x_start=start,
                    start_frac=float(frac),
                )
                self._record(split, f"pretrained_t{frac:g}", x, batch)

    def ridge(self) -> RidgeMap:
        """Question -> fine-tuned latent, fitted on the meta-train tasks' evaluation fine-tunes (once)."""
        if self._ridge is None:
            data = self.trainer.datamodule.adaptation
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
        """log p(question | x_t) ~ cos(HyperCLIP(x0_hat(x_t)), question): the encoder was trained on clean latents,
        so it scores the denoiser's x0_hat, and the gradient flows through the denoiser (as DPS does)."""
        target = F.normalize(batch.question.float(), dim=-1)
        model = self._model(batch.question, scales)

        def log_prob(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x0, _ = self.schedule.split_prediction(x, model(x, t), t, self.prediction)
            z = self.raw(x0)
            return (self.hyperclip(z if self.hyperclip_input == "latent" else self.base.decode(z)) * target).sum(-1)

        return log_prob

    def validation_step(self, batch: TaskBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 1:  # held-out tasks only: the meta-train loader is the fit diagnostic of other stages
            self._evaluate(batch, "val", EVAL_SPLITS[1])

    def on_validation_epoch_end(self) -> None:
        names = [f"val/{n}" for n in (*self.references, *self.variants)]
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
        for name, x in self.samples.compute([f"{split}/{n}" for n in self.variants]).items():
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

    def _selected_scale(self) -> float | None:
        """The CFG scale with the best meta-val accuracy in the last validation pass (None: no validation ran)."""
        scored = [
            (self.val_report[f"val/{cfg_label(g)}"], g)
            for g in self.guidance_scales
            if f"val/{cfg_label(g)}" in self.val_report
        ]
        return max(scored)[1] if scored else None

    def _denoiser_diagnostics(self) -> dict[str, float]:
        data = self.trainer.datamodule.adaptation
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
        values = self.values.compute([f"test/{n}" for n in (*self.references, *self.variants)])
        per_task = {k.split("/", 1)[1]: v for k, v in values.items()}
        selected = self._selected_scale()
        if selected is not None:
            per_task["cfg_selected"] = per_task[cfg_label(selected)]
        else:
            log.warning(
                "no validation pass ran before test: the CFG scale cannot be selected on meta-val, so the table "
                "has no cfg_selected row (validate at the last epoch: trainer.check_val_every_n_epoch)"
            )
        report = ci_report("test", per_task)
        for name, minus in self._paired_rows(per_task):  # paired per-task differences on the same tasks and noise
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
            self.results_text = self._table(report, selected) + (f"\nplot: {plot}" if plot is not None else "")

    def _paired_rows(self, per_task: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
        """(method, reference) pairs whose per-task difference the table reports."""
        rows = [(name, "hnet_init") for name in self.variants]
        main = "cfg_selected" if "cfg_selected" in per_task else None
        if main is not None:
            rows += [(main, ref) for ref in ("hnet_init", "multitask", "ridge", "oracle") if ref in per_task]
            if cfg_label(0.0) in per_task:
                rows.append((main, cfg_label(0.0)))
            rows += [(name, main) for name in self.variants if not name.startswith("cfg")]
        rows += [("oracle", "hnet_init")] + [("ridge", "hnet_init")] * ("ridge" in per_task)
        return list(dict.fromkeys(rows))

    def _labels(self) -> list[tuple[str, str]]:
        rows = [("multitask (one shared adapter)", "multitask")] if self.multitask is not None else []
        rows += [("HNET (meta-learned init latent, no sampling)", "hnet_init")]
        rows += [("ridge map question -> fine-tuned latent", "ridge")] if self.ridge_alpha is not None else []
        rows += [
            (f"HyperLDM, CFG scale {g:g}" + (" (unconditional)" if g == 0 else ""), cfg_label(g))
            for g in self.guidance_scales
        ]
        rows += [("HyperLDM, CFG scale chosen on meta-val", "cfg_selected")]
        rows += [(f"HyperLDM + HyperCLIP guidance {g:g}", f"hyperclip{g:g}") for g in self.hyperclip_guidance.scales]
        if int(self.ensemble.size) > 1:
            rows += [
                (
                    f"HyperLDM ensemble of {int(self.ensemble.size)}, CFG {float(self.ensemble.cfg_scale):g}",
                    f"ensemble{int(self.ensemble.size)}",
                )
            ]
        rows += [
            (f"HyperLDM + few-shot guidance {g:g} (uses support labels)", f"fewshot{g:g}") for g in self.fewshot.scales
        ]
        rows += [
            (f"HyperLDM from the HNET init, t_frac {f:g}", f"pretrained_t{f:g}") for f in self.from_pretrained.t_fracs
        ]
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
        xs = self.guidance_scales
        curve = {
            "HyperLDM (CFG)": [(g, report[f"test/{cfg_label(g)}"], report[f"test/{cfg_label(g)}_ci95"]) for g in xs]
        }
        for label, key in self._labels():  # every other row as a flat line across the scales
            if not key.startswith("cfg") and f"test/{key}" in report:
                curve[label.split(" (")[0]] = [(g, report[f"test/{key}"], report[f"test/{key}_ci95"]) for g in xs]
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
