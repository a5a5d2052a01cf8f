"""Few-shot image backbones (spec §3.1). Inputs are images in [0, 1]; each backbone normalises with its data's
mean/std itself, so callers never have to remember which domain a tensor is in (the original fed [-1, 1] diffusion
samples to an ImageNet-normalised classifier, spec §8 B5).

Hand-written: torchvision ships neither Conv4 nor the few-shot ResNet-12, and their layer layouts are the
benchmark's; so is DropBlock (torchvision's `drop_block2d` takes odd block sizes only, the spec's is 4).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metadiff.config import ConfigError


class Normalize(nn.Module):
    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


class Backbone(nn.Module):
    """What every backbone of `build_backbone` gives: feature maps [B, out_dim, h, w] and their embedding."""

    out_dim: int

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """normalize(GAP(g(x))) [B, D]: the embedding every head and readout uses (spec §3.1)."""
        return F.normalize(self(x).mean(dim=(2, 3)), dim=-1, eps=1e-12)


class Conv4(Backbone):
    """[Conv3x3 -> BN -> ReLU -> MaxPool2] x depth, `width` channels: 64x64 -> 64x4x4, 32x32 -> 64x2x2."""

    def __init__(self, in_channels: int, mean: Sequence[float], std: Sequence[float], width: int = 64, depth: int = 4):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.blocks = nn.Sequential(*[conv_block(in_channels if i == 0 else width, width) for i in range(depth)])
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps [B, D, h, w]."""
        return self.blocks(self.normalize(x))


def drop_block(x: torch.Tensor, rate: float, block_size: int) -> torch.Tensor:
    """The original's DropBlock (Ghiasi et al. 2018, as in MetaOptNet/CAN): Bernoulli seeds on the positions where a
    whole `block_size` block fits, each zeroing the block it anchors (top-left), the rest rescaled by
    numel / kept. gamma turns the drop `rate` into a seed probability so that about `rate` of the map is dropped."""
    n, c, h, w = x.shape
    size = min(block_size, h, w)
    gamma = rate / size**2 * (h * w) / ((h - size + 1) * (w - size + 1))
    seeds = torch.bernoulli(
        torch.full((n, c, h - size + 1, w - size + 1), min(gamma, 1.0), device=x.device, dtype=x.dtype)
    )
    blocks = F.max_pool2d(F.pad(seeds, (size - 1,) * 4), kernel_size=size, stride=1)  # seed (i, j) covers i..i+size-1
    keep = 1.0 - blocks
    return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class AnnealedDropBlock(nn.Module):
    """DropBlock whose drop rate rises linearly from 0 to `drop` over the block's first `anneal_calls` training calls
    (spec §3.2: keep rate max(1 - 0.1 n / (20 x 2000), 0.9)). The call count is a buffer, so it is checkpointed and a
    resumed run continues the schedule."""

    calls: torch.Tensor  # buffer

    def __init__(self, drop: float, block_size: int, anneal_calls: int):
        super().__init__()
        if anneal_calls < 0:
            raise ValueError(f"anneal_calls = {anneal_calls}: expected >= 0")
        self.drop, self.block_size, self.anneal_calls = float(drop), int(block_size), int(anneal_calls)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def rate(self) -> float:
        """The drop rate the next training call uses."""
        if self.anneal_calls == 0:
            return self.drop
        return self.drop * min(int(self.calls) / self.anneal_calls, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        rate = self.rate()
        self.calls += 1
        return drop_block(x, rate, self.block_size) if rate > 0 else x


class ResidualStage(nn.Module):
    """Three 3x3 conv-BN-LeakyReLU(0.1) with a 1x1 conv-BN shortcut, then max-pool, then dropout or DropBlock."""

    def __init__(self, c_in: int, c_out: int, drop: float, drop_block: bool, block_size: int, anneal_calls: int):
        super().__init__()
        convs = []
        for i in range(3):
            convs += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
            if i < 2:
                convs.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*convs)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.drop = AnnealedDropBlock(drop, block_size, anneal_calls) if drop_block else nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.pool(F.leaky_relu(self.body(x) + self.shortcut(x), 0.1)))


class ResNet12(Backbone):
    """The MetaOptNet/CAN ResNet-12 (spec §3.2): stages of `widths`, dropout in the first two, DropBlock in the
    last two; 64x64 -> 512x4x4 with the default widths. Kaiming-normal (fan_out) init."""

    def __init__(
        self,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        widths: Sequence[int] = (64, 128, 256, 512),
        drop: float = 0.1,
        block_size: int = 4,
        anneal_calls: int = 40000,
    ):
        super().__init__()
        self.normalize = Normalize(mean, std)
        chans = [in_channels, *widths]
        self.stages = nn.Sequential(
            *[ResidualStage(chans[i], chans[i + 1], drop, i >= 2, block_size, anneal_calls) for i in range(len(widths))]
        )
        self.out_dim = int(widths[-1])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.normalize(x))


BACKBONES: dict[str, type[Backbone]] = {"conv4": Conv4, "resnet12": ResNet12}


def build_backbone(name: str, **kwargs) -> Backbone:
    """The backbone `name` from its config keys; keys of another backbone are a one-line error (not a TypeError)."""
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone.name={name!r}: expected one of {sorted(BACKBONES)}")
    params = inspect.signature(BACKBONES[name]).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        own = [k for k in params if k not in ("in_channels", "mean", "std")]
        raise ConfigError(
            f"model.backbone: {unknown} are not keys of backbone '{name}' (it takes {own}); choose the "
            f"backbone as a whole with model/backbone={name}"
        )
    return BACKBONES[name](**kwargs)


@dataclass(frozen=True)
class BackboneSpec:
    """`model.backbone` (conf/model/backbone/): one block for every architecture, so that a misspelt key fails before
    any work whichever is chosen. Each file sets its own keys and leaves the other architectures' null; a non-null key
    of another architecture, or a null one of its own, is a one-line error."""

    name: str
    width: int | None  # conv4
    depth: int | None  # conv4
    widths: list[int] | None  # resnet12
    drop: float | None  # resnet12
    block_size: int | None  # resnet12
    anneal_calls: int | None  # resnet12

    def __post_init__(self) -> None:
        if self.name not in BACKBONES:
            raise ConfigError(f"model.backbone.name={self.name!r}: expected one of {sorted(BACKBONES)}")
        own = [k for k in inspect.signature(BACKBONES[self.name]).parameters if k not in ("in_channels", "mean", "std")]
        keys = [f.name for f in dataclasses.fields(self) if f.name != "name"]
        stray = [k for k in keys if k not in own and getattr(self, k) is not None]
        unset = [k for k in own if getattr(self, k) is None]
        if stray or unset:
            raise ConfigError(
                f"model.backbone: backbone '{self.name}' takes {own}"
                + (f"; {stray} belong to another backbone (null them)" if stray else "")
                + (f"; {unset} are null" if unset else "")
                + f"; choose the backbone as a whole with model/backbone={self.name}"
            )

    def arguments(self) -> dict:
        """`build_backbone`'s keys without the other architectures' (null) ones, in the config's order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
