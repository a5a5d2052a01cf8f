"""DiffusionMix (spec §4.6): mix two support images in the noised space of a zoo model and denoise the mix with
that model, a mixup whose result lies on the model's image manifold.

fixed (default) vs faithful (the original):
* domain: fixed converts [0, 1] images to the model's [-1, 1] and back; faithful runs the model on the classifier's
  input as is (§8 B6; here that input is [0, 1], the original's was ImageNet-normalised);
* noise: fixed keeps the mixed noise at the schedule's level, ((1-λ) ε1 + λ ε2) / sqrt((1-λ)² + λ²);
  faithful mixes two independently noised images, whose noise is then too weak (§8 B7);
* start: fixed denoises from step t; faithful from t - 1 after noising to t (§8 B8);
* labels: fixed weights y_a by (1 - λ), the weight of x_a in the pixels; faithful by λ (swapped, §8 B7).
"""

from __future__ import annotations

import torch

from metadiff.dfml.guidance import check_compat
from metadiff.diffusion.sampling import sample
from metadiff.diffusion.zoo import DiffusionZoo, eps_model_of, from_diffusion, to_diffusion
from metadiff.utils.transfer import host_to_device


def denoise_timesteps(start: int, steps: int | None) -> torch.Tensor:
    """The ancestral chain from step `start` to 0: every step (the original), or `steps` evenly spaced ones."""
    if steps is None or steps > start:
        return torch.arange(start, -1, -1)
    return torch.linspace(start, 0, steps).round().long().unique_consecutive()


def interpolate(
    zoo: DiffusionZoo,
    model: int,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    t: int,
    lam: float | torch.Tensor,
    compat: str,
    generator: torch.Generator,
    denoise_steps: int | None = None,
) -> torch.Tensor:
    """Mix [0, 1] images x_a, x_b [N, C, H, W] with weight lam (a float or one per image [N]) on x_b at noise step
    t, denoise with zoo model `model` by ancestral (DDPM) steps, all t of them or `denoise_steps` respaced ones, with
    the model's learned variance when it has one (respaced betas between the kept steps);
    returns [0, 1] images (fixed) or the model's raw output (faithful)."""
    check_compat(compat)
    fixed = compat == "fixed"
    a, b = (to_diffusion(x_a), to_diffusion(x_b)) if fixed else (x_a, x_b)
    lam = torch.as_tensor(lam, dtype=a.dtype, device=a.device).reshape(-1, *[1] * (a.dim() - 1))
    ab = float(zoo.schedule.alpha_bar(torch.tensor(t)))
    eps_a = host_to_device(torch.randn(a.shape, generator=generator), a.device, a.dtype)
    eps_b = host_to_device(torch.randn(b.shape, generator=generator), b.device, b.dtype)
    noise = (1 - lam) * eps_a + lam * eps_b
    if fixed:
        noise = noise / ((1 - lam) ** 2 + lam**2).sqrt()
    x_t = ab**0.5 * ((1 - lam) * a + lam * b) + (1 - ab) ** 0.5 * noise
    start = t if fixed else t - 1
    timesteps = denoise_timesteps(start, denoise_steps)
    denoiser = zoo.models[model]  # a learned variance (spec §4.6) is used by these ancestral steps
    out = sample(
        eps_model_of(denoiser),
        zoo.schedule,
        timesteps,
        x_start=x_t,
        noise_start=False,
        method="ddpm",
        generator=generator,
        device=x_t.device,
        clip_x0=1.0,
    )
    return from_diffusion(out) if fixed else out


def mixup_label_weights(lam: float | torch.Tensor, compat: str) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """(weight of y_a, weight of y_b) in the mixup loss."""
    check_compat(compat)
    return (1 - lam, lam) if compat == "fixed" else (lam, 1 - lam)
