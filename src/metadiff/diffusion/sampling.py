"""Samplers over a `NoiseSchedule`: DDIM / DDPM steps on any timestep list, classifier-free guidance in one batched
forward pass, and gradient guidance through a hook. Shape-agnostic: latents [B, D] and images [B, C, H, W] alike.

Why not diffusers' schedulers: `DDIMScheduler.step` derives the previous timestep as t - T // n, which is wrong for
`trailing`/`linspace` spacings and for truncated (SDEdit) lists; here every step reads it from the list. The step
itself is the closed form below; the tests compare it with diffusers where diffusers is right.

    x0_hat  = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
    sigma   = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)
    x_prev  = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps + sigma z

eta = 0 is DDIM; eta = 1 is the (respaced) DDPM ancestral step with the posterior variance. A model with a
learned variance (improved DDPM, `metadiff.nets.unet.ImageDenoiser.sampling_model`) returns (eps, v); its ancestral
steps then draw x_prev ~ N(posterior mean, sigma^2) with log sigma^2 = frac log beta + (1 - frac) log beta_tilde,
frac = (v + 1) / 2, beta and beta_tilde of the step's own pair t -> t_prev (the respaced betas, as guided-diffusion's
respacing). DDIM ignores v.

Guidance convention (one, documented): eps_hat = eps_u + g * (eps_c - eps_u). g = 1 is the conditional model, g = 0
the unconditional one, g > 1 extrapolates. This equals the original's (1 - g) eps_u + g eps_c and diffusers'
`guidance_scale`; the classifier-free guidance paper's w is g - 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from metadiff.diffusion.schedule import (
    NoiseSchedule,
    _expand,
    learned_range_log_variance,
    posterior_coefficients,
)
from metadiff.utils.transfer import host_to_device

# (x_t, t [B]) -> eps (or the `prediction` parameterisation), or (eps, v) with a learned variance (see above)
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
Guidance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, eps) -> guided eps
METHODS = {"ddim": None, "ddpm": 1.0}  # method -> forced eta (None: the configured eta)


def _noise(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str,
    repeats: int = 1,
) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (the same numbers on every device) and copied without a host wait
    (`host_to_device`); `repeats` > 1 draws shape[0] // repeats rows and tiles them on the device, so the r groups of
    a batch (e.g. one per guidance scale) share their noise."""
    if shape[0] % repeats:
        raise ValueError(f"noise_repeats = {repeats} does not divide the batch of {shape[0]}")
    rows = torch.randn((shape[0] // repeats, *shape[1:]), generator=generator, dtype=dtype, device="cpu")
    return host_to_device(rows, device).repeat(repeats, *([1] * (len(shape) - 1)))


def step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    x0: torch.Tensor | None = None,
    noise_repeats: int = 1,
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step from timestep t to t_prev (< t; -1 = the clean end). `x0`: the x0_hat that goes with `eps`, when the
    caller has it without dividing by sqrt(alpha-bar) (v- or x0-prediction, a clipped x0_hat). `v`: a learned
    variance's raw output, used by the ancestral step (eta = 1) to t_prev >= 0 (the step to -1 adds no noise)."""
    ab_t = float(schedule.alpha_bar(torch.tensor(t)))
    ab_prev = float(schedule.alpha_bar(torch.tensor(t_prev)))
    if x0 is None:
        x0 = (x_t - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5
    if v is not None and eta > 0 and t_prev >= 0:
        if eta != 1.0:
            raise ValueError(f"a learned variance defines the ancestral step (eta = 1), not eta = {eta}")
        c0, ct, beta, beta_tilde = posterior_coefficients(
            torch.tensor(ab_t, dtype=torch.float64), torch.tensor(ab_prev, dtype=torch.float64)
        )
        log_var = learned_range_log_variance(v, float(beta.log()), float(beta_tilde.log()))
        z = _noise(tuple(x_t.shape), generator, x_t.dtype, x_t.device, noise_repeats)
        return float(c0) * x0 + float(ct) * x_t + torch.exp(0.5 * log_var) * z
    sigma = eta * ((1 - ab_prev) / (1 - ab_t)) ** 0.5 * (1 - ab_t / ab_prev) ** 0.5
    out = ab_prev**0.5 * x0 + max(1 - ab_prev - sigma**2, 0.0) ** 0.5 * eps
    if sigma > 0:
        out = out + sigma * _noise(tuple(x_t.shape), generator, x_t.dtype, x_t.device, noise_repeats)
    return out


def cfg_eps(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    null_cond: torch.Tensor,
    scale: float | torch.Tensor,
    rescale: float = 0.0,
) -> torch.Tensor:
    """Classifier-free guided eps with conditional and unconditional predictions from ONE forward pass over the
    doubled batch. `scale` may be a tensor [B]: several guidance scales evaluated in the same batch.

    `rescale` (phi, Lin et al. 2024, diffusers' `guidance_rescale`): the guided output is scaled to the per-row std
    of the conditional one and mixed, phi * rescaled + (1 - phi) * guided, so that large scales sharpen the condition
    without inflating the sample's spread (0 = plain CFG). Applied only to rows whose scale is above 1 (as diffusers,
    which rescales only when it extrapolates past the conditional prediction): the unconditional rows of a batched
    evaluation (g = 0) stay unconditional."""
    if isinstance(scale, int | float) and scale == 1.0:
        return model(x, t, cond)
    if isinstance(scale, int | float) and scale == 0.0:
        return model(x, t, null_cond.expand_as(cond))
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null_cond.expand_as(cond)]))
    eps_c, eps_u = both.chunk(2)
    g = _expand(torch.as_tensor(scale, dtype=x.dtype).expand(x.shape[0]), x) if torch.is_tensor(scale) else scale
    guided = eps_u + g * (eps_c - eps_u)
    extrapolates = torch.as_tensor(g > 1, device=x.device)  # [B, 1, ...] or a scalar
    if not rescale or not extrapolates.any():
        return guided
    dims = tuple(range(1, x.ndim))
    ratio = eps_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return torch.where(extrapolates, rescale * guided * ratio + (1 - rescale) * guided, guided)


def _grad(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(fn(x, t).sum(), x)[0]


def classifier_guidance(
    log_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale: float, schedule: NoiseSchedule
) -> Guidance:
    """Gradient (classifier) guidance: eps <- eps - scale * sqrt(1 - ab_t) * grad_x log p(y | x_t), where
    `log_prob(x_t, t)` returns [B] log-probabilities of the wanted outcome (Dhariwal & Nichol's eps form, valid for
    DDIM and DDPM alike)."""

    def guide(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        sigma = _expand((1 - schedule.alpha_bar(t)).sqrt(), x)
        return eps - scale * sigma * _grad(log_prob, x, t)

    return guide


def normalized_gradient_guidance(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale: float) -> Guidance:
    """The HyperLDM few-shot guidance (spec §4.8): eps <- eps + scale * |eps| * g / |g| with g = grad_x loss(x_t),
    norms per sample (the original had one sample per call, so this is the same rule batched)."""

    def guide(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        g = _grad(loss, x, t)
        dims = tuple(range(1, x.dim()))
        unit = g / g.norm(dim=dims, keepdim=True).clamp_min(1e-12)
        return eps + scale * eps.norm(dim=dims, keepdim=True) * unit

    return guide


def sample(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor,
    shape: tuple[int, ...] | None = None,
    method: str = "ddim",
    eta: float = 0.0,
    guidance: Guidance | None = None,
    x_start: torch.Tensor | None = None,
    noise_start: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip_x0: float | None = None,
    reclip_guided: bool = False,
    prediction: str = "eps",
    noise_repeats: int = 1,
) -> torch.Tensor:
    """Run the reverse process over `timesteps` (descending, from `schedule.set_timesteps`).

    `eps_model` outputs the `prediction` parameterisation ('eps', 'v' or 'x0'; classifier-free guidance is linear in
    any of them, so `cfg_eps` combines them alike), or a pair (that, v) with a learned variance v, which the
    ancestral steps (method 'ddpm') use and DDIM ignores. `clip_x0` clamps x0_hat to [-c, c] (diffusers'
    `clip_sample`), in the units the model denoises (normalised latents for HyperLDM, [-1, 1] pixels for images).

    `reclip_guided`: clip x0_hat again after guidance. Without it (the original), a guidance gradient at a step
    where alpha-bar is ~0 (t = T - 1, the first step of a `trailing` list) is divided by sqrt(alpha-bar) ~ 3e-5 on its
    way into x0_hat and the sample explodes into noise; the original's `leading` "ddim25" never visited t > 960.

    From noise (`x_start=None`, `shape` given), or from a clean sample `x_start` at the list's first timestep:
    noised to that level first (SDEdit, `noise_start=True`) or used as is (the original's init-from-pretrained,
    §8 B9). `noise_repeats` = r: the r consecutive blocks of the batch get the same noise (paired comparisons)."""
    if method not in METHODS:
        raise ValueError(f"sampling method '{method}' is not one of {sorted(METHODS)}")
    forced_eta = METHODS[method]
    eta = forced_eta if forced_eta is not None else eta
    steps = [int(t) for t in timesteps]
    if x_start is None:
        if shape is None:
            raise ValueError("sample() needs a shape or an x_start")
        x = _noise(tuple(shape), generator, torch.float32, device, noise_repeats)
    else:
        x = x_start.to(device)
        if noise_start:
            noise = _noise(tuple(x.shape), generator, x.dtype, device, noise_repeats)
            x = schedule.add_noise(x, noise, torch.full((x.shape[0],), steps[0], device=x.device))
    for i, t in enumerate(steps):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        with torch.no_grad():
            out = eps_model(x, t_batch)
        out, v = out if isinstance(out, tuple) else (out, None)
        # eps-prediction keeps x0_hat implicit (step() derives it), as every earlier figure of the project did
        x0, eps = (None, out) if prediction == "eps" else schedule.split_prediction(x, out, t_batch, prediction)
        if clip_x0 is not None:  # clamp x0_hat to [-c, c], use the eps consistent with it, guide after (spec §4.4)
            x0 = (schedule.predict_x0(x, eps, t_batch) if x0 is None else x0).clamp(-clip_x0, clip_x0)
            eps = schedule.predict_eps(x, x0, t_batch)
        if guidance is not None:
            eps, x0 = guidance(x, t_batch, eps).detach(), None
            if reclip_guided and clip_x0 is not None:
                x0 = schedule.predict_x0(x, eps, t_batch).clamp(-clip_x0, clip_x0)
                eps = schedule.predict_eps(x, x0, t_batch)
        x = step(
            schedule,
            x,
            eps,
            t,
            steps[i + 1] if i + 1 < len(steps) else -1,
            eta,
            generator,
            x0=None if prediction == "eps" else x0,
            noise_repeats=noise_repeats,
            v=v if eta > 0 else None,
        )
    return x


def sample_original(
    eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    respacing: int = 1,
    start_frac: float = 1.0,
    x_start: torch.Tensor | None = None,
    guidance: Guidance | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    noise_repeats: int = 1,
) -> torch.Tensor:
    """The original HyperLDM sampler, formula for formula (spec §4.8), kept for `compat=faithful`:

        ab' = ab[::k], ab'_prev = [1, ab'[:-1]], beta' = 1 - ab' / ab'_prev, sigma'^2 = beta' (1 - ab'_prev) / (1 - ab')
        x  <- (x - (1 - alpha_t) / sqrt(1 - ab'_t) * eps_theta(x, t * k)) / sqrt(alpha_t) + sigma'_t z,   z = 0 at t = 0

    with alpha_t the UN-respaced schedule's alpha at index t (§8 B8: inconsistent for k > 1), from
    t = floor(len(ab') * t_frac) - 1 down to 0, and a start latent used as is, not noised to its level (§8 B9).
    With k = 1 it is the textbook DDPM ancestral sampler. eps-prediction only, as the original."""
    ab = schedule.alphas_cumprod
    alphas = 1 - schedule.betas
    ab_k = ab[::respacing]
    ab_k_prev = torch.cat([ab_k.new_ones(1), ab_k[:-1]])
    beta_k = 1 - ab_k / ab_k_prev
    sigma_k = (beta_k * (1 - ab_k_prev) / (1 - ab_k)).sqrt()
    x = _noise(tuple(shape), generator, torch.float32, device, noise_repeats) if x_start is None else x_start.to(device)
    for t in range(int(len(ab_k) * start_frac) - 1, -1, -1):
        t_model = torch.full((x.shape[0],), t * respacing, device=x.device, dtype=torch.long)
        with torch.no_grad():
            eps = eps_model(x, t_model)
        if guidance is not None:
            eps = guidance(x, t_model, eps).detach()
        a_t, ab_t = float(alphas[t]), float(ab_k[t])
        x = (x - (1 - a_t) / (1 - ab_t) ** 0.5 * eps) / a_t**0.5
        if t > 0:
            x = x + float(sigma_k[t]) * _noise(tuple(x.shape), generator, x.dtype, x.device, noise_repeats)
    return x


def sample_health(x: torch.Tensor, bound: float = 5.0) -> dict[str, float]:
    """How far samples in normalised units (the data has per-dimension std ~1) are from the data's range: the mean
    per-dimension std, the largest |x|, and the share of entries outside +-bound. A diverged sampler shows std in
    the thousands; a collapsed one std near 0."""
    x = x.detach().float()
    out = {"max_abs": float(x.abs().max()), "outside": float((x.abs() > bound).float().mean())}
    if x.shape[0] > 1:  # a spread needs two samples (a one-task split has none to report)
        out["std"] = float(x.std(0).mean())
    return out
