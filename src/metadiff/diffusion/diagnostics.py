"""What a trained conditional denoiser has learnt, measured per timestep band (HyperLDM's stage diagnostics).

For clean samples x0 with their conditions c, at timesteps drawn uniformly inside each band with fixed noise:
- `eps_mse` and `x0_mse`: the error of the eps / x0 the model implies (whatever it predicts: eps, v or x0), in the
  model's normalised units. Predicting eps = 0 scores 1.0; at high t, eps is almost x_t itself, so a model that
  cannot pass x_t through shows eps_mse well above 0 there.
- `cond_effect`: mean |eps_c - eps_u| per element, how much the condition moves the prediction (a model that ignores
  its condition shows ~0, and no guidance scale can then help).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from metadiff.diffusion.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def denoiser_diagnostics(
    model: Denoiser,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    cond: torch.Tensor,
    prediction: str,
    bands: Sequence[int],
    seed: int,
) -> dict[str, float]:
    """{f"{name}_t{lo}-{hi}": value} for name in eps_mse, x0_mse, cond_effect and consecutive band edges."""
    gen = torch.Generator().manual_seed(seed)
    null = torch.zeros_like(cond)
    out: dict[str, float] = {}
    for lo, hi in zip(bands[:-1], bands[1:], strict=True):
        t = torch.randint(lo, hi, (x0.shape[0],), generator=gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        x_t = schedule.add_noise(x0, noise, t)
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null]))
        out_c, out_u = both.chunk(2)
        x0_c, eps_c = schedule.split_prediction(x_t, out_c, t, prediction)
        _, eps_u = schedule.split_prediction(x_t, out_u, t, prediction)
        tag = f"t{lo}-{hi}"
        out[f"eps_mse_{tag}"] = float(((eps_c - noise) ** 2).mean())
        out[f"x0_mse_{tag}"] = float(((x0_c - x0) ** 2).mean())
        out[f"cond_effect_{tag}"] = float((eps_c - eps_u).abs().mean())
    return out
