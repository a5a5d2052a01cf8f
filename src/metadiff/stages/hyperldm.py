"""Stage `hyperldm`: a latent diffusion model over task latents, conditioned on the question embedding (spec §4.7-§4.8).

Training: (z - mu_z) / sigma_z of the adaptation dataset's latents, eps-prediction MSE; with classifier-free dropout
exactly floor(uncond_rate * B) rows of each batch get the null token (zeros), as the original. The EMA of the weights
is Lightning's `EMAWeightAveraging` callback (`callbacks=ema`): saved in checkpoints, restored on resume, swapped in
for validation, test and the artifact.

Evaluation on held-out tasks (no support labels: zero-shot): for every guidance scale g in `guidance_scales`, one
latent per task is sampled with classifier-free guidance (all scales of a task batch in ONE batched sampler run),
decoded by the HNET into adapter weights and scored on the task's query split. g = 0 is the unconditional model,
g = 1 the conditional one. The HNET's meta-learned init is scored on the same tasks as the reference. Options:
few-shot guidance (support-set gradient, spec §4.8) and init-from-pretrained (start at the HNET init, `t_frac`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from metadiff.artifacts import Artifact
from metadiff.config import ConfigError, cfg_label
from metadiff.data.meta_vqa.batches import TaskBatch
from metadiff.diffusion.sampling import cfg_eps, normalized_gradient_guidance, sample
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.eval.per_task import PerTaskValues, ci_report
from metadiff.eval.plots import log_image, save_curve_plot
from metadiff.meta.latent import load_fewshot_learner
from metadiff.nets.adapter import masked_task_accuracy, masked_task_losses
from metadiff.nets.latent_denoiser import LatentDenoiser
from metadiff.stages.vae import adaptation_base
from metadiff.utils.io import write_json

log = logging.getLogger(__name__)
DENOISER_WEIGHTS, DENOISER_SPEC = "denoiser.pt", "denoiser.json"




class HyperLDMModule(pl.LightningModule):
    def __init__(self, denoiser: dict[str, Any], schedule: dict[str, Any], uncond_rate: float,
                 optimizer: Callable[..., torch.optim.Optimizer], sampling: dict[str, Any],
                 guidance_scales: list[float] | float, fewshot_guidance: dict[str, Any], from_pretrained: dict[str, Any],
                 eval_seed: int = 0, train_seed: int = 0, plot: bool = True,
                 upstream: dict[str, Artifact] | None = None):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["optimizer", "upstream"])
        if not upstream or "adaptation" not in upstream or "hnet" not in upstream:
            raise ConfigError("hyperldm needs upstreams 'hnet' and 'adaptation' (see conf/experiment/hyperldm_*.yaml)")
        if not 0.0 <= uncond_rate < 1.0:
            raise ConfigError(f"model.uncond_rate = {uncond_rate}: expected a fraction in [0, 1)")
        self.base = adaptation_base(upstream)
        cond_dim = self.base.shape.embed_dim
        self.denoiser = LatentDenoiser(self.base.latent_dim, cond_dim, **denoiser)
        self.schedule = NoiseSchedule.make(**schedule)
        self.register_buffer("latent_mean", torch.zeros(self.base.latent_dim))
        self.register_buffer("latent_std", torch.ones(self.base.latent_dim))
        self.uncond_rate, self.optimizer_factory = uncond_rate, optimizer
        self.sampling, self.eval_seed, self.train_seed, self.plot = dict(sampling), eval_seed, train_seed, plot
        # one float = one scale (what a sweep over the scale sets; hparams_search=hyperldm_guidance)
        scales = guidance_scales if isinstance(guidance_scales, list | tuple) else [guidance_scales]
        self.guidance_scales = [float(g) for g in scales]
        if uncond_rate == 0 and any(g != 1.0 for g in self.guidance_scales):
            raise ConfigError("guidance scales other than 1 need a model trained with the null token "
                              "(model.uncond_rate > 0); set model.guidance_scales=[1.0] otherwise")
        # other methods' zero-shot accuracy on the same tasks, for the table (upstream `multitask`, optional)
        self.multitask = load_fewshot_learner(upstream["multitask"])[0].requires_grad_(False) \
            if "multitask" in upstream else None
        self.fewshot = dict(fewshot_guidance)
        self.from_pretrained = dict(from_pretrained)
        self.variants = self._variants()
        self.references = ["hnet_init"] + (["multitask"] if self.multitask is not None else [])
        self.values = PerTaskValues([f"{split}/{name}" for split in ("val", "test")
                                     for name in (*self.references, *self.variants)])
        self.summary_metrics: dict[str, float] = {}

    def _variants(self) -> list[str]:
        names = [cfg_label(g) for g in self.guidance_scales]
        names += [f"fewshot{g:g}" for g in self.fewshot.get("scales", [])]
        names += [f"pretrained_t{f:g}" for f in self.from_pretrained.get("t_fracs", [])]
        return names

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.denoiser.parameters())

    def on_fit_start(self) -> None:
        if self.trainer.ckpt_path:  # resumed: the statistics are buffers of the checkpoint
            return
        data = self.trainer.datamodule.adaptation
        self.latent_mean.copy_(data.latent_mean)
        self.latent_std.copy_(data.latent_std)

    # -- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        z, question, _ = batch
        z0 = (z - self.latent_mean) / self.latent_std
        # randomness of step k depends only on (seed, k), so a run resumed from a checkpoint continues exactly
        gen = torch.Generator().manual_seed(self.train_seed * 1_000_003 + self.global_step)
        cond = question.float().clone()
        n_null = int(self.uncond_rate * z.shape[0])  # an exact fraction per batch, as the original
        if n_null:
            cond[torch.randperm(z.shape[0], generator=gen)[:n_null].to(z.device)] = 0.0
        t = torch.randint(0, self.schedule.n_timesteps, (z.shape[0],), generator=gen).to(z.device)
        noise = torch.randn(z0.shape, generator=gen).to(z0)
        loss = torch.nn.functional.mse_loss(self.denoiser(self.schedule.add_noise(z0, noise, t), t, cond), noise)
        self.log("train/diffusion_loss", loss, prog_bar=True, batch_size=z.shape[0])
        return loss

    # -- sampling -------------------------------------------------------------------------------------------------
    def sample_latents(self, question: torch.Tensor, scales: torch.Tensor, generator: torch.Generator,
                       guidance: Callable | None = None, x_start: torch.Tensor | None = None,
                       start_frac: float = 1.0) -> torch.Tensor:
        """One latent per row of `question` [N, e] with per-row guidance scales [N], in normalised units -> raw."""
        null = torch.zeros(1, question.shape[-1], device=question.device)

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return cfg_eps(self.denoiser, x, t, question.float(), null, scales)

        steps = self.schedule.set_timesteps(int(self.sampling["steps"]), self.sampling["spacing"], start_frac)
        x = sample(eps, self.schedule, steps, shape=(question.shape[0], self.base.latent_dim),
                   method=self.sampling["method"], eta=float(self.sampling["eta"]), guidance=guidance,
                   x_start=x_start, noise_start=bool(self.from_pretrained.get("noise_start", True)),
                   generator=generator, device=question.device)
        return x * self.latent_std + self.latent_mean

    def _accuracy(self, z: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        logits = self.base.latent_logits(z, batch.query_x, batch.answers, batch.answer_mask)
        return masked_task_accuracy(logits, batch.query_y, batch.query_mask)

    def _evaluate(self, batch: TaskBatch, split: str) -> None:
        n = batch.n_tasks
        gen = torch.Generator().manual_seed(self.eval_seed * 1_000_003 + int(batch.task_index[0]))
        init = self.base.initial_inner(batch.question)["z"]
        with torch.no_grad():
            self.values.update(f"{split}/hnet_init", self._accuracy(init, batch))
            if self.multitask is not None:
                logits = self.multitask.logits(self.multitask.initial_inner(batch.question), batch.question,
                                               batch.query_x, batch.answers, batch.answer_mask)
                self.values.update(f"{split}/multitask", masked_task_accuracy(logits, batch.query_y, batch.query_mask))
            scales = torch.tensor(self.guidance_scales, device=self.device).repeat_interleave(n)
            questions = batch.question.repeat(len(self.guidance_scales), 1)
            z = self.sample_latents(questions, scales, gen)
            for k, g in enumerate(self.guidance_scales):
                self.values.update(f"{split}/{cfg_label(g)}", self._accuracy(z[k * n:(k + 1) * n], batch))
        for g in self.fewshot.get("scales", []):
            z = self.sample_latents(batch.question, torch.full((n,), float(self.fewshot["cfg_scale"]), device=self.device),
                                    gen, guidance=normalized_gradient_guidance(self._support_loss(batch), float(g)))
            with torch.no_grad():
                self.values.update(f"{split}/fewshot{g:g}", self._accuracy(z, batch))
        init = (init - self.latent_mean) / self.latent_std
        for frac in self.from_pretrained.get("t_fracs", []):
            with torch.no_grad():
                z = self.sample_latents(batch.question, torch.full((n,), float(self.from_pretrained["cfg_scale"]),
                                                                   device=self.device),
                                        gen, x_start=init, start_frac=float(frac))
                self.values.update(f"{split}/pretrained_t{frac:g}", self._accuracy(z, batch))

    def _support_loss(self, batch: TaskBatch) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Few-shot guidance's loss of a normalised latent: cross-entropy of its weights on the support set."""

        def loss(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            z = x * self.latent_std + self.latent_mean
            logits = self.base.latent_logits(z, batch.support_x, batch.answers, batch.answer_mask)
            return masked_task_losses(logits, batch.support_y, batch.support_mask)

        return loss

    def validation_step(self, batch: TaskBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 1:  # held-out tasks only: the meta-train loader is the fit diagnostic of other stages
            self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_dict(ci_report("val", {k.split("/", 1)[1]: v for k, v in
                                        self.values.compute([f"val/{n}" for n in (*self.references, *self.variants)]).items()}))

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        values = self.values.compute([f"test/{n}" for n in (*self.references, *self.variants)])
        per_task = {k.split("/", 1)[1]: v for k, v in values.items()}
        report = ci_report("test", per_task)
        for name in self.variants:  # paired per-task gains over the HNET init
            report |= ci_report("test", {f"{name}_minus_hnet_init": per_task[name] - per_task["hnet_init"]})
        self.log_dict(report)
        self.summary_metrics.update(report)
        if self.trainer.is_global_zero:
            self._print_table(report)
            if self.plot:
                self._save_plot(report)

    def _print_table(self, report: dict[str, float]) -> None:
        rows = [("multitask (one shared adapter)", "multitask")] if self.multitask is not None else []
        rows += [("HNET (meta-learned init latent, no sampling)", "hnet_init")]
        rows += [(f"HyperLDM, CFG scale {g:g}" + (" (unconditional)" if g == 0 else ""), cfg_label(g))
                 for g in self.guidance_scales]
        rows += [(f"HyperLDM + few-shot guidance {g:g} (uses support labels)", f"fewshot{g:g}")
                 for g in self.fewshot.get("scales", [])]
        rows += [(f"HyperLDM from the HNET init, t_frac {f:g}", f"pretrained_t{f:g}")
                 for f in self.from_pretrained.get("t_fracs", [])]
        lines = ["", "zero-shot accuracy on held-out tasks (mean +- 95% CI):"]
        lines += [f"  {label:<58s} {report[f'test/{key}']:.3f} +- {report[f'test/{key}_ci95']:.3f}" for label, key in rows]
        print("\n".join(lines), flush=True)

    def _save_plot(self, report: dict[str, float]) -> None:
        out = Path(self.trainer.default_root_dir)
        curve = {"HyperLDM (CFG)": [(g, report[f"test/{cfg_label(g)}"], report[f"test/{cfg_label(g)}_ci95"])
                                    for g in self.guidance_scales],
                 "HNET init": [(g, report["test/hnet_init"], report["test/hnet_init_ci95"]) for g in self.guidance_scales]}
        path = save_curve_plot(curve, out / "accuracy_vs_guidance.png", xlabel="guidance scale",
                               title="HyperLDM: held-out zero-shot accuracy")
        write_json(out / "accuracy_vs_guidance.json", curve)
        log_image(self.loggers, "test/accuracy_vs_guidance", path)

    def write_artifact(self, directory: Path) -> None:
        torch.save({"denoiser": self.denoiser.state_dict(), "latent_mean": self.latent_mean.cpu(),
                    "latent_std": self.latent_std.cpu()}, directory / DENOISER_WEIGHTS)
        (directory / DENOISER_SPEC).write_text(json.dumps({
            "latent_dim": self.base.latent_dim, "cond_dim": self.denoiser.cond_dim, **dict(self.hparams.denoiser),
            "schedule": dict(self.hparams.schedule), "uncond_rate": self.uncond_rate,
        }, default=list))
