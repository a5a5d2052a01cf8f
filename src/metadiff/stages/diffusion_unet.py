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

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metadiff.config import ConfigError
from metadiff.config.typed import as_spec
from metadiff.diffusion.losses import hybrid_loss
from metadiff.diffusion.schedule import NoiseSchedule, ScheduleName
from metadiff.diffusion.zoo import sample_images, to_diffusion
from metadiff.eval.plots import log_image, save_grid
from metadiff.eval.tables import results_table
from metadiff.nets.speed import SpeedSpec, speed_up
from metadiff.nets.unet import ImageDenoiser
from metadiff.stages.base import ImageSetData, Stage
from metadiff.store import Artifact
from metadiff.utils.rng import follower_rank_seed, keyed_generator
from metadiff.utils.tensor_files import load_tensors, save_tensors
from metadiff.utils.transfer import host_to_device

WEIGHTS, SPEC = "unet.pt", "unet.json"


@dataclass(frozen=True)
class UNetSpec:
    """`model.unet`: the keyword arguments of diffusers' `UNet2DModel` that the zoo sets (null: left out, diffusers'
    own default)."""

    block_out_channels: list[int]
    layers_per_block: int
    down_block_types: list[str]
    up_block_types: list[str]
    norm_num_groups: int
    dropout: float
    resnet_time_scale_shift: str
    attention_head_dim: int | None  # one head width for all levels; null with `model.attention_heads` set

    def kwargs(self) -> dict[str, Any]:
        """The non-null keys, in this order: what `ImageDenoiser` passes on and stores beside the weights."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class ScheduleSpec:
    """`model.schedule`: the noise schedule (`NoiseSchedule.make`), stored beside the weights as it is here."""

    name: ScheduleName
    n_timesteps: int


@dataclass(frozen=True)
class SampleGridSpec:
    """`model.grid`: the sample grid written at test time with the EMA weights; `n: 0` writes none."""

    n: int
    nrow: int
    steps: int  # DDIM steps
    spacing: str  # timestep spacing (`NoiseSchedule.set_timesteps`)


def load_unet_spec(artifact: Artifact) -> dict[str, Any]:
    """{"config" (the denoiser's), "schedule", "classes" (meta-train indices)} of a diffusion_unet artifact."""
    return json.loads(artifact.file(SPEC).read_text())


def load_unet(artifact: Artifact) -> ImageDenoiser:
    """The (EMA) denoiser of a diffusion_unet artifact, frozen."""
    model = ImageDenoiser.from_config(load_unet_spec(artifact)["config"])
    model.load_state_dict(load_tensors(artifact.file(WEIGHTS)))
    return model.eval().requires_grad_(False)


class DiffusionUNetModule(Stage, name="diffusion_unet"):
    def __init__(
        self,
        image_size: int,
        channels: int,
        unet: UNetSpec,
        attention_heads: int | None,
        learn_sigma: bool,
        schedule: ScheduleSpec,
        optimizer: Callable[..., torch.optim.Optimizer],
        hflip: bool,
        grid: SampleGridSpec,
        speed: SpeedSpec,
        train_seed: int = 0,
        eval_seed: int = 0,
        upstream: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["optimizer", "upstream"])
        self.unet_cfg = as_spec(UNetSpec, unet, "model.unet")
        self.schedule_cfg = dataclasses.asdict(as_spec(ScheduleSpec, schedule, "model.schedule"))
        self.schedule = NoiseSchedule.make(**self.schedule_cfg)
        self.optimizer_factory, self.hflip = optimizer, hflip
        self.grid = as_spec(SampleGridSpec, grid, "model.grid")
        self.speed = as_spec(SpeedSpec, speed, "model.speed")
        self.train_seed, self.eval_seed = train_seed, eval_seed
        # built here, not in setup(): the EMA callback copies the module before the module's own setup runs
        self.denoiser = ImageDenoiser(
            image_size, channels, self.unet_cfg.kwargs(), learn_sigma=learn_sigma, attention_heads=attention_heads
        )
        self._sped_up = False

    def setup(self, stage: str) -> None:
        data = self.datamodule_view(ImageSetData)
        source = data.source
        config = self.denoiser.config
        if (source.image_size, source.channels) != (config["image_size"], config["channels"]):
            raise ConfigError(
                f"model.image_size/channels = {config['image_size']}/{config['channels']} but the data "
                f"gives {source.image_size}x{source.image_size} images with {source.channels} channels"
            )
        self.classes = data.train_classes()
        if not self._sped_up:  # here, after the EMA callback's copy (see `speed_up`); once for fit and test
            speed_up(self.denoiser.unet, self.speed)  # the diffusers UNet: every denoiser call (eps, eps + v) runs it
            self._sped_up = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.denoiser.parameters())

    def _loss(self, images: torch.Tensor, gen: torch.Generator, flip: bool) -> dict[str, torch.Tensor]:
        """{"loss", "mse"[, "vb"]}: the hybrid loss with a learned variance, else eps-MSE."""
        x0 = to_diffusion(images)
        n = x0.shape[0]
        if flip:  # random horizontal flip p = 0.5 (spec §1.1); off for glyphs, where a mirrored glyph is another one
            mask = host_to_device(torch.rand(n, generator=gen) < 0.5, x0.device)
            x0 = torch.where(mask[:, None, None, None], x0.flip(-1), x0)
        t = host_to_device(torch.randint(0, self.schedule.n_timesteps, (n,), generator=gen), x0.device)
        noise = host_to_device(torch.randn(x0.shape, generator=gen), x0.device, x0.dtype)
        x_t = self.schedule.add_noise(x0, noise, t)
        if self.denoiser.learn_sigma:
            eps, v = self.denoiser.forward_with_variance(x_t, t)
        else:
            eps, v = self.denoiser(x_t, t), None
        return hybrid_loss(self.schedule, x0, noise, x_t, t, eps, v)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        gen = keyed_generator(follower_rank_seed(self.train_seed, self.global_rank), self.global_step)
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
        self.log_dict({f"{prefix}/{name.format(k)}": value for k, value in shown.items()}, batch_size=batch[0].shape[0])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._log_heldout("val", batch, batch_idx)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._log_heldout("test", batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        if not self.trainer.is_global_zero or not self.grid.n:
            return
        with self.precision_context():  # an epoch hook: Lightning's bf16 covers only the steps
            images = sample_images(
                self.denoiser,
                self.schedule,
                int(self.grid.n),
                int(self.grid.steps),
                torch.Generator().manual_seed(self.eval_seed),
                self.grid.spacing,
            )
        path = save_grid(images.cpu(), Path(self.trainer.default_root_dir) / "samples.png", int(self.grid.nrow))
        log_image(self.loggers, "test/samples", path)
        self.grid_path = path

    def on_test_end(self) -> None:
        """The results table: here, not in `on_test_epoch_end`, because Lightning reduces the per-batch held-out
        losses into `callback_metrics` between the two hooks."""
        report = {key: float(value) for key, value in self.trainer.callback_metrics.items()}
        rows = [
            ("diffusion loss on held-out images", "test/heldout_loss"),
            ("its eps-MSE term", "test/heldout_mse"),
            ("its variational-bound term (L_vb)", "test/heldout_vb"),
        ]
        title = f"diffusion_unet on its {len(self.classes)} classes, EMA weights (mean over held-out batches):"
        grid = getattr(self, "grid_path", None)
        self.set_results_text(results_table(title, report, rows) + (f"\nsamples: {grid}" if grid is not None else ""))

    def write_artifact(self, directory: Path) -> None:
        save_tensors(self.denoiser.state_dict(), directory / WEIGHTS)
        (directory / SPEC).write_text(
            json.dumps({"config": self.denoiser.config, "schedule": self.schedule_cfg, "classes": self.classes})
        )
        if getattr(self, "grid_path", None) is not None:
            (directory / "samples.png").write_bytes(self.grid_path.read_bytes())
