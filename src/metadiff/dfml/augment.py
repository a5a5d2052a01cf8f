"""Training-time augmentation of the pseudo images (spec §2.4, `transform_type=1`), batched with per-image draws.

The original applies, per pseudo image: RandomCrop(64, padding=4) -> RandomHorizontalFlip(0.5) ->
ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2) -> Normalize -> RandomErasing(p=0.5, value=0). Here images
stay in [0, 1] (the backbone normalises inside), so erasing with 0 *after* normalisation is erasing with the set's
mean pixel before it: `fill` is the source's mean, and both modes get the same augmentation.

Written out rather than taken from torchvision: a torchvision transform draws one set of parameters per call, so a
batch would share one crop, flip and jitter, and per-image calls cost ~0.4 ms each (1,760 images per step at the
spec's 32 episodes of 5 x (5 + 6)); its draws also come from the global RNG, while a dfml step's randomness must
come from the step's generator (resume, DDP). The formulas are torchvision's; the jitter order is fixed
(brightness, contrast, saturation) where torchvision shuffles it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from metadiff.config.typed import as_spec


@dataclass(frozen=True)
class ColorJitterSpec:
    """ColorJitter factors: each drawn from U[1 - v, 1 + v]; 0: off."""

    brightness: float
    contrast: float
    saturation: float

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            object.__setattr__(self, name, float(getattr(self, name)))


@dataclass(frozen=True)
class ErasingSpec:
    """RandomErasing(p, scale, ratio), filled with the set's mean pixel."""

    p: float
    scale: tuple[float, float]
    ratio: tuple[float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", float(self.p))
        for name in ("scale", "ratio"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))


@dataclass(frozen=True)
class AugmentSpec:
    """`model.augment` of the dfml stage."""

    enabled: bool
    crop_padding: int  # RandomCrop(size, padding) with black padding; 0: off
    hflip: bool  # RandomHorizontalFlip(0.5)
    color_jitter: ColorJitterSpec
    erasing: ErasingSpec

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | AugmentSpec) -> AugmentSpec:
        """The spec of a `model.augment` mapping (checked: unknown, missing or mistyped keys are a ConfigError)."""
        return as_spec(cls, cfg, "model.augment")


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` and crop back to H x W at a random offset per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [N, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [N, 1, 1, W]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma [N, 1, H, W], torchvision's rgb_to_grayscale (grey images are their own luma)."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.2989, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * other).clamp(0, 1)


def color_jitter(
    x: torch.Tensor, brightness: float, contrast: float, saturation: float, gen: torch.Generator
) -> torch.Tensor:
    n = x.shape[0]
    if brightness:
        x = _blend(x, torch.zeros_like(x), _uniform(n, 1 - brightness, 1 + brightness, gen).to(x))
    if contrast:
        mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
        x = _blend(x, mean.expand_as(x), _uniform(n, 1 - contrast, 1 + contrast, gen).to(x))
    if saturation and x.shape[1] == 3:
        x = _blend(x, _grey(x).expand_as(x), _uniform(n, 1 - saturation, 1 + saturation, gen).to(x))
    return x


def random_erasing(
    x: torch.Tensor,
    p: float,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    fill: torch.Tensor,
    gen: torch.Generator,
    attempts: int = 10,
) -> torch.Tensor:
    """With probability p per image, fill one random box (area share ~ U[scale], log aspect ~ U[log ratio]) with
    `fill` [C]; as torchvision, up to `attempts` draws for a box that fits, none erased if no draw fits."""
    n, c, h, w = x.shape
    erase = torch.rand(n, generator=gen) < p
    area = h * w * _uniform(n * attempts, *scale, gen).view(n, attempts)
    log_low, log_high = torch.log(torch.tensor(ratio)).tolist()
    log_r = _uniform(n * attempts, log_low, log_high, gen).view(n, attempts)
    bh = (area * log_r.exp()).sqrt().round().long()
    bw = (area / log_r.exp()).sqrt().round().long()
    fits = (bh < h) & (bw < w) & (bh > 0) & (bw > 0)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros(n, dtype=torch.long))
    bh, bw = bh.gather(1, first[:, None]).squeeze(1), bw.gather(1, first[:, None]).squeeze(1)
    erase &= fits.any(1)
    top = (torch.rand(n, generator=gen) * (h - bh + 1).clamp_min(1)).long()
    left = (torch.rand(n, generator=gen) * (w - bw + 1).clamp_min(1)).long()
    ys, xs = torch.arange(h)[None, :], torch.arange(w)[None, :]
    in_rows = (ys >= top[:, None]) & (ys < (top + bh)[:, None])
    in_cols = (xs >= left[:, None]) & (xs < (left + bw)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]).to(x.device)[:, None]
    return torch.where(mask, fill.to(x).view(1, c, 1, 1), x)


def augment(images: torch.Tensor, spec: AugmentSpec, fill: Sequence[float], gen: torch.Generator) -> torch.Tensor:
    """The spec's pseudo-image augmentation of [0, 1] images of any leading shape [..., C, H, W]; every image gets
    its own draws, all from `gen`."""
    if not spec.enabled:
        return images
    x = images.reshape(-1, *images.shape[-3:])
    if spec.crop_padding:
        x = random_crop(x, spec.crop_padding, gen)
    if spec.hflip:
        flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    jitter, erasing = spec.color_jitter, spec.erasing
    x = color_jitter(x, jitter.brightness, jitter.contrast, jitter.saturation, gen)
    if erasing.p:
        x = random_erasing(x, erasing.p, erasing.scale, erasing.ratio, torch.tensor(fill), gen)
    return x.view_as(images)
