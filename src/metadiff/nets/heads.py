"""The MLP head of the data-free family (spec §3.3), used as the meta-model's global head, as the time-conditioned
class-learner and as the per-episode head of DiffusionMix.

Linear(D->O) -> norm -> SiLU -> Linear(O->O), Xavier-uniform weights. `norm`: `batch_stats` is the original's
BatchNorm1d(track_running_stats=False), which normalises with the current batch even in eval mode (transductive,
spec §8 B9); `batchnorm` keeps running statistics; `layernorm` and `none` do not mix samples at all. With
`time_conditioned`, a sinusoidal embedding of t (size 2·O) -> Linear(2O->D) -> SiLU -> Linear(D->D) is added to the
input feature.
"""

from __future__ import annotations

import torch
from torch import nn

from metadiff.nets.latent_denoiser import timestep_embedding

NORMS = ("batch_stats", "batchnorm", "layernorm", "none")


def _norm(kind: str, dim: int) -> nn.Module:
    if kind not in NORMS:
        raise ValueError(f"head norm '{kind}' is not one of {NORMS}")
    return {
        "batch_stats": lambda: nn.BatchNorm1d(dim, track_running_stats=False),
        "batchnorm": lambda: nn.BatchNorm1d(dim),
        "layernorm": lambda: nn.LayerNorm(dim),
        "none": nn.Identity,
    }[kind]()


class MLPHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, norm: str = "batch_stats", time_conditioned: bool = False):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, out_dim), _norm(norm, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim)
        )
        self.out_dim = out_dim
        self.time = (
            nn.Sequential(nn.Linear(2 * out_dim, in_dim), nn.SiLU(), nn.Linear(in_dim, in_dim))
            if time_conditioned
            else None
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, features: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if self.time is not None:
            if t is None:
                raise ValueError("this head is time-conditioned: pass t")
            features = features + self.time(timestep_embedding(t, 2 * self.out_dim))
        return self.net(features)
