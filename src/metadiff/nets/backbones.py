"""Few-shot image backbones (spec §3.1). Inputs are images in [0, 1]; each backbone normalises with its data's
mean/std itself, so callers never have to remember which domain a tensor is in (the original fed [-1, 1] diffusion
samples to an ImageNet-normalised classifier, spec §8 B5).

Hand-written: torchvision ships neither Conv4 nor the few-shot ResNet-12, and their layer layouts are the
benchmark's; DropBlock comes from torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import DropBlock2d


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


class Conv4(nn.Module):
    """[Conv3x3 -> BN -> ReLU -> MaxPool2] x depth, `width` channels: 64x64 -> 64x4x4, 32x32 -> 64x2x2."""

    def __init__(self, in_channels: int, mean: Sequence[float], std: Sequence[float], width: int = 64,
                 depth: int = 4):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.blocks = nn.Sequential(*[conv_block(in_channels if i == 0 else width, width) for i in range(depth)])
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps [B, D, h, w]."""
        return self.blocks(self.normalize(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """normalize(GAP(g(x))) [B, D]: the embedding every head and readout uses (spec §3.1)."""
        return F.normalize(self(x).mean(dim=(2, 3)), dim=-1, eps=1e-12)


class ResidualStage(nn.Module):
    """Three 3x3 conv-BN-LeakyReLU(0.1) with a 1x1 conv-BN shortcut, then max-pool, then dropout or DropBlock."""

    def __init__(self, c_in: int, c_out: int, drop: float, drop_block: bool, block_size: int):
        super().__init__()
        convs = []
        for i in range(3):
            convs += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
            if i < 2:
                convs.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*convs)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        # torchvision's DropBlock2d; the original anneals its keep rate from 1 to 0.9 over training, kept fixed here
        self.drop = DropBlock2d(drop, block_size) if drop_block else nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.pool(F.leaky_relu(self.body(x) + self.shortcut(x), 0.1)))


class ResNet12(nn.Module):
    """The MetaOptNet/CAN ResNet-12 (spec §3.2): stages of `widths`, dropout in the first two, DropBlock in the
    last two; 64x64 -> 512x4x4 with the default widths. Kaiming-normal (fan_out) init."""

    def __init__(self, in_channels: int, mean: Sequence[float], std: Sequence[float],
                 widths: Sequence[int] = (64, 128, 256, 512), drop: float = 0.1, block_size: int = 4):
        super().__init__()
        self.normalize = Normalize(mean, std)
        chans = [in_channels, *widths]
        self.stages = nn.Sequential(*[ResidualStage(chans[i], chans[i + 1], drop, i >= 2, block_size)
                                      for i in range(len(widths))])
        self.out_dim = int(widths[-1])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.normalize(x))

    embed = Conv4.embed


BACKBONES = {"conv4": Conv4, "resnet12": ResNet12}


def build_backbone(name: str, **kwargs) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"backbone '{name}' is not one of {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)
