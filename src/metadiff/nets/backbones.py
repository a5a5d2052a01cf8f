"""Few-shot image backbones (spec §3.1). Inputs are images in [0, 1]; each backbone normalises with its data's
mean/std itself, so callers never have to remember which domain a tensor is in (the original fed [-1, 1] diffusion
samples to an ImageNet-normalised classifier, spec §8 B5).

Hand-written: Conv4 is four conv blocks; torchvision ships no Conv4, and the layer layout is the benchmark's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


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


BACKBONES = {"conv4": Conv4}


def build_backbone(name: str, **kwargs) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"backbone '{name}' is not one of {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)
