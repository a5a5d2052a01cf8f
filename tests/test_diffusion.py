"""The diffusion toolkit against closed forms, diffusers where diffusers is right, and a Gaussian whose exact
noise predictor is known (so a sampler must reproduce its mean and std)."""

from __future__ import annotations

import math

import pytest
import torch

from metadiff.diffusion.sampling import (
    cfg_eps,
    classifier_guidance,
    normalized_gradient_guidance,
    sample,
    step,
)
from metadiff.diffusion.schedule import NoiseSchedule, make_beta_schedule


def test_beta_schedules_closed_form() -> None:
    lin = make_beta_schedule("linear", 1000)
    assert lin.dtype == torch.float64
    assert float(lin[0]) == pytest.approx(1e-4) and float(lin[-1]) == pytest.approx(2e-2)
    assert float(lin[500]) == pytest.approx((1e-2 + 500 / 999 * (2e-2**0.5 - 1e-2)) ** 2)
    assert float(make_beta_schedule("sqrt_linear", 11)[5]) == pytest.approx((1e-4 + 2e-2) / 2)
    assert float(make_beta_schedule("sqrt", 11)[-1]) == pytest.approx(2e-2**0.5)
    assert float(make_beta_schedule("quad", 5)[-1]) == pytest.approx(2e-2)
    cos = make_beta_schedule("cosine", 1000)
    alpha_bar = torch.cumprod(1 - cos, 0)
    f = lambda k: math.cos((k / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for k in (1, 250, 500, 900):
        assert float(alpha_bar[k - 1]) == pytest.approx(f(k) / f(0), rel=1e-9)
    assert float(cos.max()) <= 0.999
    with pytest.raises(ValueError, match="beta schedule 'cosin'"):
        make_beta_schedule("cosin", 10)


def test_add_noise_matches_diffusers() -> None:
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule.make("linear", 1000)
    theirs = DDPMScheduler(num_train_timesteps=1000, trained_betas=schedule.betas.float().numpy())
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    latent, latent_noise = torch.randn(4, 7), torch.randn(4, 7)  # the same code serves latents [B, D]
    noisy = schedule.add_noise(latent, latent_noise, t)
    torch.testing.assert_close(schedule.predict_x0(noisy, latent_noise, t), latent, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(schedule.predict_eps(noisy, latent, t), latent_noise, rtol=1e-4, atol=1e-3)


def test_ddpm_step_mean_is_the_posterior_mean() -> None:
    schedule = NoiseSchedule.make("cosine", 1000)
    ab = schedule.alphas_cumprod
    x_t, eps = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    for t, t_prev in ((500, 499), (500, 380), (10, 0)):
        x0 = (x_t - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        beta = 1 - ab[t] / ab[t_prev]
        mean = (ab[t_prev].sqrt() * beta / (1 - ab[t])) * x0 + (
            (1 - beta).sqrt() * (1 - ab[t_prev]) / (1 - ab[t])
        ) * x_t
        draws = torch.stack(
            [
                step(schedule, x_t, eps, t, t_prev, eta=1.0, generator=torch.Generator().manual_seed(s))
                for s in range(4000)
            ]
        )
        torch.testing.assert_close(draws.mean(0), mean, atol=0.01 * float(beta.sqrt()) * 10, rtol=0)
        var = beta * (1 - ab[t_prev]) / (1 - ab[t])
        assert float(draws.var(0).mean()) == pytest.approx(float(var), rel=0.1)


def test_ddim_step_matches_diffusers_on_uniform_spacing() -> None:
    from diffusers import DDIMScheduler

    schedule = NoiseSchedule.make("linear", 1000)
    theirs = DDIMScheduler(
        num_train_timesteps=1000,
        trained_betas=schedule.betas.float().numpy(),
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
    )
    theirs.set_timesteps(50)
    ours = schedule.set_timesteps(50, spacing="leading")
    assert ours.tolist() == theirs.timesteps.tolist()
    x = torch.randn(2, 4, 8, 8)
    for i in (0, 25, 49):
        eps = torch.randn_like(x)
        t, t_prev = int(ours[i]), int(ours[i + 1]) if i + 1 < 50 else -1
        expected = theirs.step(eps, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(step(schedule, x, eps, t, t_prev, eta=0.0), expected, rtol=1e-4, atol=1e-4)


def test_timestep_lists() -> None:
    schedule = NoiseSchedule.make("cosine", 1000)
    trailing = schedule.set_timesteps(50)
    assert int(trailing[0]) == 999 and len(trailing) == 50 and bool((trailing.diff() < 0).all())
    assert schedule.set_timesteps(1000).tolist() == list(range(999, -1, -1))
    half = schedule.set_timesteps(50, start_frac=0.5)
    assert int(half[0]) < 500 and len(half) == 25
    with pytest.raises(ValueError, match="spacing 'even'"):
        schedule.set_timesteps(10, spacing="even")


def _gaussian_eps(schedule: NoiseSchedule, mu: torch.Tensor, std: float):
    """Exact eps-predictor for data ~ N(mu, std^2 I): E[eps | x_t]."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.alpha_bar(t).to(x.dtype)[:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * std**2 + 1 - ab)

    return eps


@pytest.mark.parametrize("method, n_steps", [("ddpm", 1000), ("ddim", 50), ("ddpm", 100)])
def test_samplers_reproduce_a_known_gaussian(method: str, n_steps: int) -> None:
    schedule = NoiseSchedule.make("cosine", 1000)
    mu, std = torch.tensor([2.0, -1.0, 0.5]), 0.3
    x = sample(
        _gaussian_eps(schedule, mu, std),
        schedule,
        schedule.set_timesteps(n_steps),
        shape=(4000, 3),
        method=method,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(x.mean(0), mu, atol=0.03, rtol=0)
    assert float(x.std(0).mean()) == pytest.approx(std, rel=0.08)


def test_sdedit_start_keeps_what_the_start_says() -> None:
    """From a clean start at 30% of the schedule, noised first: the samples stay near the start sample."""
    schedule = NoiseSchedule.make("cosine", 1000)
    mu, std = torch.zeros(3), 1.0
    start = torch.full((500, 3), 1.5)
    x = sample(
        _gaussian_eps(schedule, mu, std),
        schedule,
        schedule.set_timesteps(50, start_frac=0.3),
        x_start=start,
        generator=torch.Generator().manual_seed(0),
    )
    assert 1.0 < float(x.mean()) < 1.5  # pulled slightly toward the data mean, far from a fresh sample (mean 0)


def test_cfg_is_one_batched_forward_and_matches_two_passes() -> None:
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        return x * 0.5 + c

    x, t = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    cond, null = torch.randn(4, 3), torch.zeros(1, 3)
    guided = cfg_eps(model, x, t, cond, null, 3.0)
    assert calls == [8]
    eps_c, eps_u = x * 0.5 + cond, x * 0.5
    torch.testing.assert_close(guided, eps_u + 3.0 * (eps_c - eps_u))
    torch.testing.assert_close(cfg_eps(model, x, t, cond, null, 1.0), eps_c)
    torch.testing.assert_close(cfg_eps(model, x, t, cond, null, 0.0), eps_u)
    scales = torch.tensor([0.0, 1.0, 2.0, 4.0])  # one scale per sample, still one pass
    per = cfg_eps(model, x, t, cond, null, scales)
    torch.testing.assert_close(per, eps_u + scales[:, None] * (eps_c - eps_u))


def test_gradient_guidance_pushes_samples_to_the_target() -> None:
    schedule = NoiseSchedule.make("cosine", 1000)
    mu, std, target = torch.zeros(2), 1.0, torch.tensor([2.0, 0.0])
    eps = _gaussian_eps(schedule, mu, std)
    steps = schedule.set_timesteps(50)

    def log_prob(x, t):  # a "classifier" that prefers samples near the target
        return -((x - target) ** 2).sum(-1)

    free = sample(eps, schedule, steps, shape=(2000, 2), generator=torch.Generator().manual_seed(0))
    guided = sample(
        eps,
        schedule,
        steps,
        shape=(2000, 2),
        guidance=classifier_guidance(log_prob, 0.5, schedule),
        generator=torch.Generator().manual_seed(0),
    )
    assert float(free[:, 0].mean()) == pytest.approx(0.0, abs=0.1)
    assert float(guided[:, 0].mean()) > 0.5
    fewshot = sample(
        eps,
        schedule,
        steps,
        shape=(2000, 2),
        generator=torch.Generator().manual_seed(0),
        guidance=normalized_gradient_guidance(lambda x, t: ((x - target) ** 2).sum(-1), 0.3),
    )
    assert float(fewshot[:, 0].mean()) > 0.3


def test_timestep_embedding_layout() -> None:
    from metadiff.nets.latent_denoiser import timestep_embedding

    emb = timestep_embedding(torch.tensor([0, 7]), 100)
    assert emb.shape == (2, 100)
    torch.testing.assert_close(emb[0, :50], torch.ones(50))  # cos first: cos(0) = 1
    torch.testing.assert_close(emb[0, 50:], torch.zeros(50))
    assert float(emb[1, 1]) == pytest.approx(math.cos(7 * math.exp(-math.log(1e4) / 50)), rel=1e-5)
    assert timestep_embedding(torch.tensor([3]), 7).shape == (1, 7)


def test_latent_denoisers_shapes_and_sizes() -> None:
    from metadiff.nets.latent_denoiser import LatentDenoiser

    v1 = LatentDenoiser(latent_dim=128, cond_dim=768)
    assert sum(p.numel() for p in v1.parameters()) == 161_152  # the spec's ~161k
    x, t, c = torch.randn(5, 128), torch.randint(0, 1000, (5,)), torch.randn(5, 768)
    assert v1(x, t, c).shape == (5, 128)
    for head in ("block", "residual"):
        v2 = LatentDenoiser(latent_dim=16, cond_dim=8, hidden=[32, 24], version="v2", head_on=head)
        out = v2(torch.randn(3, 16), torch.tensor([1, 2, 3]), torch.randn(3, 8))
        assert out.shape == (3, 16)
    v2 = LatentDenoiser(latent_dim=16, cond_dim=8, version="v2", head_on="residual")
    x = torch.randn(3, 16, requires_grad=True)
    v2(x, torch.tensor([1, 2, 3]), torch.zeros(3, 8)).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
