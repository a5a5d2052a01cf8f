"""The hybrid loss of improved DDPM (Nichol & Dhariwal 2021), which the spec's zoo trains with (spec §4.1):
eps-MSE + L_vb, L_vb the variational bound's term at t in bits per dimension, computed with eps stop-gradiented so
that it trains only the learned-range variance (`schedule.learned_range_log_variance`), unweighted (guided-diffusion's
loss_type MSE with learn_sigma):

    t > 0:  KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
    t = 0:  -log p(x0 | x_1), p a Gaussian discretized to the 256 pixel levels of [-1, 1]

Textbook formulas, elementwise, in nats unless the name says bits; shapes [B, ...] with per-sample t [B].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import special

from metadiff.diffusion.schedule import (
    NoiseSchedule,
    _expand,
    learned_range_log_variance,
    posterior_coefficients,
)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, levels: int = 256
) -> torch.Tensor:
    """log P(x) per element, x on the `levels`-level grid of [-1, 1], under N(mean, exp(logvar)) integrated over x's
    bin [x - 1/(levels-1), x + 1/(levels-1)]; the end bins reach to -inf / +inf, so the levels' masses sum to 1."""
    half = 1.0 / (levels - 1)
    inv_std = torch.exp(-0.5 * logvar)
    upper, lower = (x - mean + half) * inv_std, (x - mean - half) * inv_std
    # the bin's mass from whichever tail is small, so a bin far in the upper tail does not cancel to 0
    mass = torch.where(
        lower > 0, special.ndtr(-lower) - special.ndtr(-upper), special.ndtr(upper) - special.ndtr(lower)
    )
    inner = torch.log(mass.clamp_min(1e-12))
    top = torch.where(x > 1 - half, special.log_ndtr(-lower), inner)
    return torch.where(x < -1 + half, special.log_ndtr(upper), top)


def vb_terms_bpd(
    schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """L_vb per sample [B] in bits per dim for x_t = add_noise(x0, ., t), the model's (eps, v) at (x_t, t). eps is
    detached here: the term trains the variance only (the mean is the MSE's job). Variances as improved DDPM:
    beta_tilde_0 = 0 is replaced by beta_tilde_1 (the learned range's lower end at t = 0)."""
    eps = eps.detach()
    ab_t, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t - 1)  # float64 [B]; alpha_bar(-1) = 1
    c0, ct, beta, beta_tilde = posterior_coefficients(ab_t, ab_prev)
    one = torch.ones_like(t)  # t = 1 where t lives: a host tensor here would cost a copy to the device every step
    beta_tilde_1 = posterior_coefficients(schedule.alpha_bar(one), schedule.alpha_bar(one - 1))[3]
    log_beta_tilde = torch.where(t == 0, beta_tilde_1, beta_tilde).log()
    c0, ct = _expand(c0, x_t), _expand(ct, x_t)
    log_beta, log_beta_tilde = _expand(beta.log(), x_t), _expand(log_beta_tilde, x_t)
    x0_hat = schedule.predict_x0(x_t, eps, t)
    true_mean, model_mean = c0 * x0 + ct * x_t, c0 * x0_hat + ct * x_t
    model_logvar = learned_range_log_variance(v, log_beta, log_beta_tilde)
    dims = tuple(range(1, x0.dim()))
    kl = normal_kl(true_mean, log_beta_tilde, model_mean, model_logvar).mean(dims)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, model_logvar).mean(dims)
    return torch.where(t == 0, nll, kl) / math.log(2.0)


def hybrid_loss(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    noise: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    v: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """{"loss", "mse", "vb"}: eps-MSE (mean over pixels and batch) + the batch mean of `vb_terms_bpd`, unweighted;
    without a variance output (`v` None) the loss is the MSE alone and no "vb" is returned."""
    mse = F.mse_loss(eps, noise)
    if v is None:
        return {"loss": mse, "mse": mse}
    vb = vb_terms_bpd(schedule, x0, x_t, t, eps, v).mean()
    return {"loss": mse + vb, "mse": mse, "vb": vb}
