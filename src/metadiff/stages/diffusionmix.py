"""Stage `diffusionmix`: meta-test of a dfml meta-model with a per-episode head, with and without DiffusionMix
(spec mlwdudm.md §1.3, §4.6), on the same fixed real meta-test episodes.

Per episode the frozen backbone embeds support and queries (normalize(GAP)). A fresh MLP head is trained on the
support features in three phases: `clean_steps` SGD steps on the support set; `mix_steps` steps of a second SGD on
the DiffusionMix sets, one per zoo model (support images mixed with a permutation of themselves at noise step t,
denoised by that model; mixup loss with Beta(α, α) weights; averaged over models); `final_steps` more steps of the
first SGD on the support set. `head` trains the same head with the mix phase left out, from the same initial weights.
Each head is trained once per norm of `head.norms` (`none`: the fixed mode's; `batch_stats`: the original's
transductive batch norm, spec §8 B9), so the B9 comparison sits beside the DiffusionMix one. The prototype readout
of the meta-model is reported too. All episodes of a batch are trained at once (metadiff.dfml.episode_heads).

Every comparison is also reported *paired*, as the mean and 95% CI of the per-episode difference on the same
episodes: DiffusionMix vs none (per norm), transductive vs plain head, head vs prototype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from metadiff.config import ConfigError
from metadiff.config.typed import as_spec
from metadiff.data.images.episodes import Episodes
from metadiff.dfml.diffusionmix import interpolate, mixup_label_weights
from metadiff.dfml.episode_heads import EpisodeHeads, train_heads
from metadiff.dfml.guidance import Compat, check_compat
from metadiff.eval.fewshot import (
    embed_episodes,
    episode_accuracy,
    paired_lines,
    prototype_episode_accuracy,
    readout_lines,
)
from metadiff.eval.per_task import PerTaskValues, ci_report, paired_report
from metadiff.eval.plots import save_grid
from metadiff.stages.base import ImageSetData, Stage
from metadiff.stages.dfml import load_meta_model
from metadiff.stages.diffusion_zoo import load_zoo
from metadiff.store import Artifact
from metadiff.utils.rng import generator, keyed_seed, rank_seed, stream_seed

HEAD_NORMS = ("none", "batch_stats")


@dataclass(frozen=True)
class HeadSpec:
    """`model.head`: the per-episode MLP head and its three SGD phases."""

    norms: list[str]  # one head per norm (of HEAD_NORMS); the first is `head`
    clean_steps: int  # SGD lr_clean on the support set
    mix_steps: int  # a second SGD (its own momentum) on the DiffusionMix sets
    final_steps: int  # the first SGD again on the support set
    lr_clean: float
    lr_mix: float
    momentum: float
    weight_decay: float


@dataclass(frozen=True)
class MixSpec:
    """`model.mix`: the DiffusionMix sets (spec §4.6)."""

    t: int  # noise step of the mix
    denoise_steps: int | None  # null: all t ancestral steps (the original); n: n respaced DDPM steps
    beta_alpha: float  # lambda ~ Beta(alpha, alpha), one per episode and zoo model
    batch_size: int | None  # images per UNet call (null: a batch's whole support set at once)


class DiffusionMixModule(Stage, name="diffusionmix"):
    @classmethod
    def required_upstreams(cls, model: DictConfig) -> tuple[str, ...]:
        """The meta model (a dfml artifact) and the zoo it mixes with."""
        return ("meta", "zoo")

    def __init__(
        self, head: HeadSpec, mix: MixSpec, compat: Compat, seed: int = 0, upstream: dict[str, Artifact] | None = None
    ):
        super().__init__()
        check_compat(compat)
        self.meta = load_meta_model(self.upstream_artifact(upstream, "meta"))
        self.zoo = load_zoo(self.upstream_artifact(upstream, "zoo"))
        self.head_cfg, self.mix = as_spec(HeadSpec, head, "model.head"), as_spec(MixSpec, mix, "model.mix")
        self.compat, self.seed = compat, seed
        self.norms = list(self.head_cfg.norms)
        if not self.norms or any(n not in HEAD_NORMS for n in self.norms):
            raise ConfigError(f"model.head.norms={self.norms}: expected a non-empty list of {HEAD_NORMS}")
        # the first norm's heads are `head` / `head_diffusionmix`; others get the norm as a suffix
        self.readouts = ["prototype"] + [
            f"{r}{self._suffix(n)}" for n in self.norms for r in ("head", "head_diffusionmix")
        ]

    def _suffix(self, norm: str) -> str:
        return "" if norm == self.norms[0] else f"_{norm}"

    def setup(self, stage: str) -> None:
        self.shots = list(self.datamodule_view(ImageSetData).shots)
        # the episodes are shared out over the ranks (EpisodeSampler): gathered at compute
        self.values = PerTaskValues([f"{r}_{k}shot" for r in self.readouts for k in self.shots], sync=True)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.meta.backbone.embed(images)

    def _generator(self, batch_idx: int, dataloader_idx: int) -> torch.Generator:
        """λ, permutations and noise of a batch depend on (seed, shot, batch, rank) only."""
        return generator(rank_seed(keyed_seed(stream_seed(self.seed, dataloader_idx), batch_idx), self.global_rank))

    def mixed_support(
        self, support: torch.Tensor, labels: torch.Tensor, model: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One DiffusionMix set per episode from zoo model `model`: (mixed images [B, S, C, H, W], y_a, y_b,
        λ [B]); one λ ~ Beta(α, α) and one permutation of the support per episode (spec §4.6)."""
        b, s = support.shape[:2]
        alpha = float(self.mix.beta_alpha)
        lam = beta_draws(alpha, b, gen).to(support.device)
        perm = torch.stack([torch.randperm(s, generator=gen) for _ in range(b)]).to(support.device)
        x_b = torch.gather(support, 1, perm.view(b, s, 1, 1, 1).expand_as(support))
        x_a, x_b, lam_img = support.flatten(0, 1), x_b.flatten(0, 1), lam.repeat_interleave(s)
        # UNet calls of at most `mix.batch_size` images: on a CPU one call of 625 glyphs takes 13x one of 125
        chunk = int(self.mix.batch_size or len(x_a))
        mixed = torch.cat(
            [
                interpolate(
                    self.zoo,
                    model,
                    x_a[i : i + chunk],
                    x_b[i : i + chunk],
                    int(self.mix.t),
                    lam_img[i : i + chunk],
                    self.compat,
                    gen,
                    self.mix.denoise_steps,
                )
                for i in range(0, len(x_a), chunk)
            ]
        )
        return mixed.view_as(support), labels, torch.gather(labels, 1, perm), lam

    def test_step(self, batch: Episodes, batch_idx: int, dataloader_idx: int = 0) -> None:
        k = self.shots[dataloader_idx]
        gen = self._generator(batch_idx, dataloader_idx)
        zoo = self.zoo.to(self.device)
        self.meta.to(self.device)
        self.values.update(
            f"prototype_{k}shot",
            prototype_episode_accuracy(lambda x: self.meta.backbone(x).mean(dim=(2, 3)), batch, self.meta.scale_cls),
        )
        support, query = embed_episodes(self._embed, batch)
        y_s, y_q = batch.support_labels, batch.query_labels
        n_way = int(y_s.max()) + 1
        mixed = [self.mixed_support(batch.support, y_s, j, gen) for j in range(zoo.n_models)]
        mixed_features = [
            (self._embed(x.flatten(0, 1)).view(*x.shape[:2], -1), ya, yb, lam) for x, ya, yb, lam in mixed
        ]
        if batch_idx == 0 and dataloader_idx == 0 and self.trainer.is_global_zero:
            self._save_grid(batch.support, [m[0] for m in mixed])
        for norm in self.norms:
            for readout, with_mix in (("head", False), ("head_diffusionmix", True)):
                torch.manual_seed(self.seed + batch_idx)  # every readout starts from the same fresh heads
                with torch.inference_mode(False), torch.enable_grad():
                    logits = self._fit_and_predict(
                        support.clone(),
                        y_s,
                        query.clone(),
                        n_way,
                        norm,
                        [tuple(t.clone() for t in m) for m in mixed_features] if with_mix else None,
                    )
                self.values.update(f"{readout}{self._suffix(norm)}_{k}shot", episode_accuracy(logits, y_q))

    def _fit_and_predict(
        self,
        support: torch.Tensor,
        y_s: torch.Tensor,
        query: torch.Tensor,
        n_way: int,
        norm: str,
        mixed: list[tuple[torch.Tensor, ...]] | None,
    ) -> torch.Tensor:
        h = self.head_cfg
        heads = EpisodeHeads(len(support), support.shape[-1], n_way, norm, self.device)
        clean = torch.optim.SGD(heads.parameters(), lr=h.lr_clean, momentum=h.momentum, weight_decay=h.weight_decay)

        def clean_loss() -> torch.Tensor:
            return F.cross_entropy(heads(support).transpose(1, 2), y_s, reduction="none").mean(1)

        def mix_loss(sets: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
            total: torch.Tensor | float = 0.0
            for x, y_a, y_b, lam in sets:
                w_a, w_b = mixup_label_weights(lam, self.compat)
                logits = heads(x).transpose(1, 2)
                total = (
                    total
                    + w_a * F.cross_entropy(logits, y_a, reduction="none").mean(1)
                    + w_b * F.cross_entropy(logits, y_b, reduction="none").mean(1)
                )
            return cast(torch.Tensor, total) / len(sets)  # a tensor: a zoo has at least one model, so one set

        train_heads(heads, clean, int(h.clean_steps), clean_loss)
        if mixed is not None:
            mix_opt = torch.optim.SGD(heads.parameters(), lr=h.lr_mix, momentum=h.momentum, weight_decay=h.weight_decay)
            train_heads(heads, mix_opt, int(h.mix_steps), functools.partial(mix_loss, mixed))
        train_heads(heads, clean, int(h.final_steps), clean_loss)
        with torch.no_grad():
            return heads(query)

    def _save_grid(self, support: torch.Tensor, mixed: list[torch.Tensor]) -> None:
        """Row 0: the support of the first episode; row j + 1: its DiffusionMix by zoo model j."""
        first = [support[0]] + [m[0] for m in mixed]
        images = torch.cat(first)
        if self.compat == "faithful":
            images = images.clamp(0, 1)
        self.grid_path = save_grid(
            images.float().cpu(), Path(self.trainer.default_root_dir) / "diffusionmix.png", support.shape[1]
        )

    def paired_differences(self) -> dict[str, tuple[str, str]]:
        """name -> (readout a, readout b) of every comparison, per shot: a - b per episode."""
        pairs = {}
        for k in self.shots:
            for norm in self.norms:
                x = self._suffix(norm)
                pairs[f"diffusionmix_gain{x}_{k}shot"] = (f"head_diffusionmix{x}_{k}shot", f"head{x}_{k}shot")
                pairs[f"head{x}_minus_prototype_{k}shot"] = (f"head{x}_{k}shot", f"prototype_{k}shot")
            for other in self.norms[1:]:  # B9: the other norm's heads against the first's
                x = self._suffix(other)
                pairs[f"head{x}_minus_head_{k}shot"] = (f"head{x}_{k}shot", f"head_{k}shot")
                pairs[f"head_diffusionmix{x}_minus_head_diffusionmix_{k}shot"] = (
                    f"head_diffusionmix{x}_{k}shot",
                    f"head_diffusionmix_{k}shot",
                )
        return pairs

    def on_test_epoch_end(self) -> None:
        values = self.values.compute()
        report = ci_report("test", values)
        paired = paired_report("test", values, self.paired_differences())
        report |= paired
        self.log_dict(report)
        self.summary_metrics.update(report)
        lines = readout_lines(
            f"diffusionmix ({self.compat}) on the fixed real meta-test episodes (mean +- 95% CI;"
            f" head norms {self.norms}):",
            report,
            self.shots,
            tuple(self.readouts),
            width=28,
        )
        names = [key.removeprefix("test/") for key in paired if not key.endswith("_ci95")]
        lines += "\n" + paired_lines("paired per-episode differences (mean +- 95% CI):", report, names)
        self.set_results_text(lines)

    def write_artifact(self, directory: Path) -> None:
        if hasattr(self, "grid_path"):
            (directory / self.grid_path.name).write_bytes(self.grid_path.read_bytes())


def beta_draws(alpha: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """n draws of Beta(alpha, alpha) that depend only on `gen` (torch.distributions samples from the global RNG, so
    NumPy's Beta sampler is seeded from `gen` instead)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, n)).float()
