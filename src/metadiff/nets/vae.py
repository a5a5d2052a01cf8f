"""VAE over vectors: flat adapter weights ("HVAE", spec §3.5, losses §4.5) or hypernetwork latents.

Encoder Mlp(in -> hidden -> 2d) gives (mu, log sigma^2 - 1): the fixed -1 shift of the original starts every posterior
narrower than the prior. Decoder Mlp(d -> reversed hidden -> P). With `normalize`, inputs are standardised by the
per-dimension mean of the training weights and one scalar std (the original's choice, §8 B18), and the decoder
un-standardises, so the decoder alone maps a latent back to the input space (real adapter weights, or a latent the
HNET's hypernetwork turns into weights).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from metadiff.nets.hypernet import Mlp


class WeightDecoder(nn.Module):
    """z [T, d] -> vectors [T, in] (un-standardised)."""

    weight_mean: torch.Tensor  # buffers
    weight_std: torch.Tensor

    def __init__(self, latent_dim: int, hidden: list[int], in_dim: int):
        super().__init__()
        self.mlp = Mlp(latent_dim, list(reversed(hidden)), in_dim)
        self.register_buffer("weight_mean", torch.zeros(in_dim))
        self.register_buffer("weight_std", torch.ones(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(z) * self.weight_std + self.weight_mean


class WeightVAE(nn.Module):
    def __init__(
        self, in_dim: int, latent_dim: int = 128, hidden: list[int] | tuple = (128, 128), logvar_shift: float = -1.0
    ):
        super().__init__()
        self.in_dim, self.latent_dim, self.logvar_shift = in_dim, latent_dim, logvar_shift
        self.encoder = Mlp(in_dim, list(hidden), 2 * latent_dim)
        self.decoder = WeightDecoder(latent_dim, list(hidden), in_dim)

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise with these statistics from now on (shared by encoder input, decoder output and the loss)."""
        self.decoder.weight_mean.copy_(mean)
        self.decoder.weight_std.copy_(std)

    def standardize(self, w: torch.Tensor) -> torch.Tensor:
        return (w - self.decoder.weight_mean) / self.decoder.weight_std

    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z | w), each [T, d]."""
        mu, raw = self.encoder(self.standardize(w.float())).chunk(2, dim=-1)
        return mu, raw + self.logvar_shift

    def sample(self, mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * noise

    def reconstruct(self, w: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
        """G(E(w)): through the posterior mean by default (deterministic, §8 B33), or a posterior sample."""
        mu, logvar = self.encode(w)
        return self.decoder(self.sample(mu, logvar) if stochastic else mu)

    def losses(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The spec's terms, both divided by sqrt(in_dim) (only `kld_weight` sets their balance):
        rec = sum_dims mean_batch ((w_hat - w)/std)^2 / sqrt(in); kl = mean_batch KL(q(z|w) || N(0, I)) / sqrt(in)."""
        mu, logvar = self.encode(w)
        w_hat = self.decoder(self.sample(mu, logvar))
        scale = math.sqrt(self.in_dim)
        rec = (self.standardize(w_hat) - self.standardize(w.float())).pow(2).mean(0).sum() / scale
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean() / scale
        return {"rec": rec, "kl": kl, "mu_norm": mu.norm(dim=-1).mean()}
