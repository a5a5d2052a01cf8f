"""Stage `diffusion_unet`: one member of a diffusion zoo, an unconditional image diffusion model trained on one
class subset of the real meta-train images (spec §1.1, §4.1).

eps-prediction on x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t ~ U{0..T-1}, pixels in [-1, 1]. With `learn_sigma`
(the spec's default) the UNet also outputs the learned-range variance and the loss is improved DDPM's hybrid
eps-MSE + L_vb (`metadiff.diffusion.losses`); the variance is read by ancestral sampling (DiffusionMix), not by DDIM.
Without it, eps-MSE alone. The UNet is the spec's ADM through `model.unet` (diffusers kwargs) and
`model.attention_heads` (4 heads in every attention layer, `metadiff.nets.unet`). A bounded number of steps
(`trainer.max_steps`), EMA weights (`callbacks=ema`, they are the ones saved), checkpoints every epoch, and the
randomness of step k a function of (seed, k), so a killed run resumes exactly. Test: the loss (and its terms) on
held-out images of the subset (fixed t and noise) and a sample grid PNG, both with the EMA weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchvision.utils as vutils

from metadiff.config import ConfigError
from metadiff.diffusion.losses import hybrid_loss
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.diffusion.zoo import sample_images, to_diffusion
from metadiff.eval.plots import log_image
from metadiff.nets.unet import ImageDenoiser
from metadiff.utils.io import atomic_path
from metadiff.utils.rng import keyed_generator

WEIGHTS, SPEC = "unet.pt", "unet.json"


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    """A PNG grid of [0, 1] images, written atomically."""
    with atomic_path(path) as tmp:
        vutils.save_image(images, tmp, nrow=nrow, padding=1, format="png")
    return path


class DiffusionUNetModule(pl.LightningModule):
    def __init__(self, image_size: int, channels: int, unet: dict[str, Any], attention_heads: int | None,
                 learn_sigma: bool, schedule: dict[str, Any], optimizer: Callable[..., torch.optim.Optimizer],
                 hflip: bool, grid: dict[str, Any], train_seed: int = 0, eval_seed: int = 0,
                 upstream: dict | None = None):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["optimizer", "upstream"])
        self.unet_cfg, self.schedule_cfg = dict(unet), dict(schedule)
        self.schedule = NoiseSchedule.make(**schedule)
        self.optimizer_factory, self.hflip, self.grid = optimizer, hflip, dict(grid)
        self.train_seed, self.eval_seed = train_seed, eval_seed
        # built here, not in setup(): the EMA callback copies the module before the module's own setup runs
        self.denoiser = ImageDenoiser(image_size, channels, self.unet_cfg, learn_sigma=learn_sigma,
                                      attention_heads=attention_heads)
        self.summary_metrics: dict[str, float] = {}

    def setup(self, stage: str) -> None:
        source = self.trainer.datamodule.source
        config = self.denoiser.config
        if (source.image_size, source.channels) != (config["image_size"], config["channels"]):
            raise ConfigError(f"model.image_size/channels = {config['image_size']}/{config['channels']} but the data "
                              f"gives {source.image_size}x{source.image_size} images with {source.channels} channels")
        self.classes = self.trainer.datamodule.train_classes()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.denoiser.parameters())

    def _loss(self, images: torch.Tensor, gen: torch.Generator, flip: bool) -> dict[str, torch.Tensor]:
        """{"loss", "mse"[, "vb"]}: the hybrid loss with a learned variance, else eps-MSE."""
        x0 = to_diffusion(images)
        n = x0.shape[0]
        if flip:  # random horizontal flip p = 0.5 (spec §1.1); off for glyphs, where a mirrored glyph is another one
            mask = (torch.rand(n, generator=gen) < 0.5).to(x0.device)
            x0 = torch.where(mask[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, self.schedule.n_timesteps, (n,), generator=gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        x_t = self.schedule.add_noise(x0, noise, t)
        if self.denoiser.learn_sigma:
            eps, v = self.denoiser.forward_with_variance(x_t, t)
        else:
            eps, v = self.denoiser(x_t, t), None
        return hybrid_loss(self.schedule, x0, noise, x_t, t, eps, v)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        gen = keyed_generator(self.train_seed, self.global_step)
        terms = self._loss(batch[0], gen, self.hflip)
        self.log("train/loss", terms["loss"], prog_bar=True)
        if "vb" in terms:
            self.log_dict({"train/mse": terms["mse"], "train/vb": terms["vb"]})
        return terms["loss"]

    def _log_heldout(self, prefix: str, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """The loss (and its terms) on held-out images, fixed t and noise per batch."""
        gen = keyed_generator(self.eval_seed, batch_idx)
        terms = self._loss(batch[0], gen, flip=False)
        shown = terms if "vb" in terms else {"loss": terms["loss"]}  # eps-only: loss = mse, logged once
        name = "{}" if prefix == "val" else "heldout_{}"  # val/loss, test/heldout_loss as before
        self.log_dict({f"{prefix}/{name.format(k)}": value for k, value in shown.items()},
                      batch_size=batch[0].shape[0])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._log_heldout("val", batch, batch_idx)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._log_heldout("test", batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        if not self.trainer.is_global_zero or not self.grid.get("n"):
            return
        images = sample_images(self.denoiser, self.schedule, int(self.grid["n"]), int(self.grid["steps"]),
                               torch.Generator().manual_seed(self.eval_seed), self.grid.get("spacing", "trailing"))
        path = save_grid(images.cpu(), Path(self.trainer.default_root_dir) / "samples.png", int(self.grid["nrow"]))
        log_image(self.loggers, "test/samples", path)
        self.grid_path = path

    def write_artifact(self, directory: Path) -> None:
        torch.save(self.denoiser.state_dict(), directory / WEIGHTS)
        (directory / SPEC).write_text(json.dumps({"config": self.denoiser.config, "schedule": self.schedule_cfg,
                                                  "classes": self.classes}))
        if getattr(self, "grid_path", None) is not None:
            (directory / "samples.png").write_bytes(self.grid_path.read_bytes())
