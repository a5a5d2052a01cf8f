"""Noise schedules and the forward process, for tensors of any shape (latents [B, D] or images [B, C, H, W]).

`make_beta_schedule` gives the spec's five schedules (hyperclip.md §3.9) in float64; `NoiseSchedule` holds the
derived quantities and follows the diffusers contract: `add_noise`, `set_timesteps` (respaced, descending
timesteps), and a sampler `step` (in `metadiff.diffusion.sampling`) that reads the previous timestep from that list,
so any spacing is handled exactly (the original mixed a respaced alpha-bar with un-respaced alphas, §8 B8). No model
lives in a schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

# The choices as types: the stage specs annotate their fields with them, so `validate_config` rejects a misspelt
# value when the config is composed, naming the key, before any upstream is built (metadiff.config.typed)
ScheduleName = Literal["linear", "cosine", "sqrt_linear", "sqrt", "quad"]
Spacing = Literal["leading", "trailing", "linspace"]
Prediction = Literal[
    "eps", "v", "x0"
]  # what a denoiser outputs (diffusers' `prediction_type`: epsilon, v_prediction, sample)
SCHEDULES, SPACINGS, PREDICTIONS = get_args(ScheduleName), get_args(Spacing), get_args(Prediction)


def make_beta_schedule(
    name: str, n_timesteps: int, linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3
) -> torch.Tensor:
    """Betas [T] in float64 (spec §3.9)."""
    t = n_timesteps
    if name == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, t, dtype=torch.float64) ** 2
    if name == "cosine":
        k = torch.arange(t + 1, dtype=torch.float64) / t
        alpha_bar = torch.cos((k + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0, 0.999)
    if name == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, t, dtype=torch.float64)
    if name == "sqrt":
        return torch.linspace(linear_start, linear_end, t, dtype=torch.float64) ** 0.5
    if name == "quad":
        return torch.linspace(linear_start**0.25, linear_end**0.25, t, dtype=torch.float64) ** 4
    raise ValueError(f"beta schedule '{name}' is not one of {SCHEDULES}")


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] per-sample values -> [B, 1, 1, ...] broadcastable against `like`."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def posterior_coefficients(ab_t: torch.Tensor, ab_prev: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(c0, ct, beta, beta_tilde) of q(x_prev | x_t, x0) = N(c0 x0 + ct x_t, beta_tilde) between steps t > prev with
    alpha-bars ab_t, ab_prev (any shapes that broadcast; prev may be any earlier kept step of a respaced list):

        beta = 1 - ab_t / ab_prev,  beta_tilde = (1 - ab_prev) / (1 - ab_t) beta,
        c0 = sqrt(ab_prev) beta / (1 - ab_t),  ct = sqrt(1 - beta) (1 - ab_prev) / (1 - ab_t)

    (DDPM eq. 7; respaced as improved DDPM / guided-diffusion, which rebuild the betas from the kept alpha-bars)."""
    beta = 1 - ab_t / ab_prev
    c0 = ab_prev.sqrt() * beta / (1 - ab_t)
    ct = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t)
    return c0, ct, beta, (1 - ab_prev) / (1 - ab_t) * beta


def learned_range_log_variance(
    v: torch.Tensor, log_beta: torch.Tensor | float, log_beta_tilde: torch.Tensor | float
) -> torch.Tensor:
    """Improved DDPM's learned-range variance: log sigma^2 = frac log beta + (1 - frac) log beta_tilde with
    frac = (v + 1) / 2, v the model's raw output (v = 1: beta, the upper bound; v = -1: beta_tilde, the lower)."""
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde


@dataclass
class NoiseSchedule:
    betas: torch.Tensor  # [T], float64
    # the alpha-bar table per device it was asked on (see `_alpha_bar_table`); not part of the schedule's identity
    _tables: dict[torch.device, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, torch.Tensor]:
        return {"betas": self.betas}  # the cache stays behind: a pickled copy may go to a process without that GPU

    def __setstate__(self, state: dict[str, torch.Tensor]) -> None:
        self.betas, self._tables = state["betas"], {}

    @classmethod
    def make(
        cls,
        name: str = "cosine",
        n_timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> NoiseSchedule:
        return cls(make_beta_schedule(name, n_timesteps, linear_start, linear_end, cosine_s))

    @property
    def n_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.exp(torch.cumsum(torch.log1p(-self.betas), 0))

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha-bar at integer timesteps t (any shape), float64 on t's device; t = -1 means "before step 0"
        (alpha-bar 1)."""
        return self._alpha_bar_table(t.device)[t.long() + 1]

    def _alpha_bar_table(self, device: torch.device) -> torch.Tensor:
        """[1, alpha-bar_0, ..., alpha-bar_{T-1}] on `device`: computed once on the CPU and copied once per device,
        so that a step indexes it where its timesteps live. Indexing a CPU table with a GPU t would copy t to the
        host, and the host would wait for the GPU's queue, on every call (2-4 times per UNet step)."""
        table = self._tables.get(device)
        if table is None:
            cpu = torch.device("cpu")
            if cpu not in self._tables:
                self._tables[cpu] = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
            table = self._tables[device] = self._tables[cpu].to(device)
        return table

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample of q(x_t | x_0) = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise, per-sample timesteps t [B]."""
        ab = _expand(self.alpha_bar(t), x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = _expand(self.alpha_bar(t), x_t)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def predict_eps(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = _expand(self.alpha_bar(t), x_t)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ab_t) noise - sqrt(1 - ab_t) x_0 (Salimans & Ho's v-prediction target, diffusers' `get_velocity`)."""
        ab = _expand(self.alpha_bar(t), x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
        """What a denoiser of the given parameterisation is trained to output for x_t = add_noise(x0, noise, t)."""
        if prediction == "eps":
            return noise
        if prediction == "v":
            return self.velocity(x0, noise, t)
        if prediction == "x0":
            return x0
        raise ValueError(f"prediction '{prediction}' is not one of {PREDICTIONS}")

    def split_prediction(
        self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor, prediction: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) of a denoiser output. Why both: at the cosine schedule's last steps alpha-bar is ~2e-9,
        and x0_hat = (x_t - sqrt(1 - ab) eps) / sqrt(ab) multiplies any eps error by ~2e4; a v- or x0-prediction
        gives x0_hat directly, with no division by sqrt(ab)."""
        ab = _expand(self.alpha_bar(t), x_t)
        if prediction == "eps":
            return self.predict_x0(x_t, out, t), out
        if prediction == "v":
            return ab.sqrt() * x_t - (1 - ab).sqrt() * out, (1 - ab).sqrt() * x_t + ab.sqrt() * out
        if prediction == "x0":
            return out, self.predict_eps(x_t, out, t)
        raise ValueError(f"prediction '{prediction}' is not one of {PREDICTIONS}")

    def set_timesteps(self, n_steps: int, spacing: str = "trailing", start_frac: float = 1.0) -> torch.Tensor:
        """Descending timesteps of a respaced sampler with `n_steps` steps, optionally starting part-way
        (`start_frac` < 1: SDEdit / init-from-pretrained start at t ~ start_frac * T).

        `trailing` always includes T-1 (the pure-noise end) and is the spacing whose first step sees pure noise;
        `leading` is the original DDIM/diffusers default (0, k, 2k, ...); `linspace` rounds an even grid."""
        big_t = self.n_timesteps
        if not 1 <= n_steps <= big_t:
            raise ValueError(f"n_steps = {n_steps} must be in [1, {big_t}]")
        if spacing == "trailing":
            steps = torch.round(torch.arange(big_t, 0, -big_t / n_steps, dtype=torch.float64)) - 1
        elif spacing == "leading":
            steps = torch.arange(0, n_steps, dtype=torch.float64).flip(0) * (big_t // n_steps)
        elif spacing == "linspace":
            steps = torch.linspace(0, big_t - 1, n_steps, dtype=torch.float64).round().flip(0)
        else:
            raise ValueError(f"timestep spacing '{spacing}' is not one of {SPACINGS}")
        steps = steps.long()
        if start_frac < 1.0:
            steps = steps[steps < max(1, round(start_frac * big_t))]
        return steps
