"""Latent denoisers of HyperLDM (spec §3.7): eps_theta(x_t [B, D], t [B], c [B, e]) -> eps [B, D].

The condition c is the task's raw question embedding, or the null token (zeros) for classifier-free dropout.
`v1` concatenates (x, c, temb) into a stack of FF blocks (Linear -> LayerNorm -> ReLU). `v2` re-injects (c, temb)
into every block with a linear residual path; `head_on: block` reproduces the original's head on the last block's
pre-residual activation, `head_on: residual` is the fixed variant that reads the residual stream (§8 B19).
`resmlp` (the project's default) is a pre-norm residual MLP: every block reads LayerNorm(stream) with (c, temb)
and adds its output to the stream, the head is zero-initialised, and the condition is normalised first (the null
token, zeros, stays zeros): `cond_norm: layer` per sample, `cond_norm: standard` per dimension with the training
questions' mean and std. `standard` is the default because question embeddings of one benchmark share almost all of
their direction (median cosine of a held-out question to its nearest meta-train question: 0.9999 on synthvqa), so
what tells tasks apart is a residual far below the shared part, which per-sample LayerNorm keeps tiny. Why:
the v1 stack squeezes (x, c, temb) through two 128-wide LayerNorm+ReLU blocks with no path for x, and on the
embedded twin it fitted eps no better than 0.30 MSE where the target is almost x_t itself.
Hand-written: these are ~160k-parameter MLPs specific to the paper; no library ships them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

VERSIONS = ("v1", "v2", "resmlp")
HEADS = ("block", "residual")
COND_NORMS = ("none", "layer", "standard")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t f_i) | sin(t f_i)], f_i = exp(-ln(1e4) i / (dim/2)), cos first as in the original; odd dim zero-padded."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


def _ff(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.LayerNorm(n_out), nn.ReLU())


class ResidualBlock(nn.Module):
    """stream + MLP(LayerNorm(stream), side): the pre-norm residual block of `resmlp`."""

    def __init__(self, width: int, side: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width + side, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))

    def forward(self, stream: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return stream + self.mlp(torch.cat([self.norm(stream), side], dim=-1))


class LatentDenoiser(nn.Module):
    cond_mean: torch.Tensor  # buffers, registered with cond_norm: standard
    cond_std: torch.Tensor

    def __init__(
        self,
        latent_dim: int,
        cond_dim: int,
        hidden: list[int] | tuple = (128, 128),
        time_dim: int = 100,
        version: str = "v1",
        head_on: str = "block",
        cond_norm: str = "none",
    ):
        super().__init__()
        if version not in VERSIONS:
            raise ValueError(f"denoiser version '{version}' is not one of {VERSIONS}")
        if head_on not in HEADS:
            raise ValueError(f"head_on '{head_on}' is not one of {HEADS}")
        if cond_norm not in COND_NORMS:
            raise ValueError(f"cond_norm '{cond_norm}' is not one of {COND_NORMS}")
        self.version, self.head_on, self.time_dim, self.cond_norm = version, head_on, time_dim, cond_norm
        self.latent_dim, self.cond_dim = latent_dim, cond_dim
        if cond_norm == "standard":  # per-dimension statistics of the training conditions (set_condition_stats)
            self.register_buffer("cond_mean", torch.zeros(cond_dim))
            self.register_buffer("cond_std", torch.ones(cond_dim))
        side = cond_dim + time_dim
        if version == "resmlp":
            if len(set(hidden)) != 1:
                raise ValueError(f"resmlp hidden = {list(hidden)}: expected one width repeated once per block")
            width = int(hidden[0])
            self.embed = nn.Linear(latent_dim + side, width)
            self.blocks = nn.ModuleList(ResidualBlock(width, side) for _ in hidden)
            out = nn.Linear(width, latent_dim)
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            self.head: nn.Module = nn.Sequential(nn.LayerNorm(width), out)
            return
        if version == "v1":
            dims = [latent_dim + side, *hidden]
            self.blocks = nn.ModuleList(_ff(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        else:
            dims = [latent_dim, *hidden]
            self.blocks = nn.ModuleList(_ff(a + side, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
            self.residuals = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.head = nn.Linear(hidden[-1], latent_dim)

    def set_condition_stats(self, conditions: torch.Tensor, std_min: float = 1e-6) -> None:
        """Per-dimension mean and std of the training conditions [N, e], for `cond_norm: standard`."""
        if self.cond_norm != "standard":
            raise ValueError(f"set_condition_stats needs cond_norm 'standard', not '{self.cond_norm}'")
        c = conditions.float()
        self.cond_mean.copy_(c.mean(0))
        if len(c) > 1:  # one condition has no spread (its std is NaN): it is only centred
            self.cond_std.copy_(c.std(0).clamp_min(std_min))
        else:
            self.cond_std.fill_(1.0)

    def normalize_condition(self, c: torch.Tensor) -> torch.Tensor:
        """The condition the blocks read; the null token (all zeros) stays zeros in every mode."""
        real = c.abs().sum(-1, keepdim=True) > 0
        if self.cond_norm == "layer":
            return nn.functional.layer_norm(c, c.shape[-1:]) * real
        if self.cond_norm == "standard":
            return (c - self.cond_mean.to(c.dtype)) / self.cond_std.to(c.dtype) * real
        return c

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c = self.normalize_condition(c.to(x.dtype))
        side = torch.cat([c, timestep_embedding(t, self.time_dim).to(x.dtype)], dim=-1)
        if self.version == "resmlp":
            stream = self.embed(torch.cat([x, side], dim=-1))
            for block in self.blocks:
                stream = block(stream, side)
            return self.head(stream)
        if self.version == "v1":
            h = torch.cat([x, side], dim=-1)
            for block in self.blocks:
                h = block(h)
            return self.head(h)
        stream, block_out = x, x
        for block, residual in zip(self.blocks, self.residuals, strict=True):
            block_out = block(torch.cat([stream, side], dim=-1))
            stream = block_out + residual(stream)
        return self.head(block_out if self.head_on == "block" else stream)
