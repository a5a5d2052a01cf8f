"""HyperLDM's denoiser and sampler: a positive control on latents that their condition determines, the original's
update rule against the spec's formula, and the parameterisations against each other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from metadiff.diffusion.sampling import cfg_eps, sample, sample_health, sample_original
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.nets.latent_denoiser import LatentDenoiser


def _toy(seed: int = 0, n_train: int = 120, n_test: int = 40, c_dim: int = 24, d: int = 16, shared: float = 0.0):
    """Latents that are a fixed linear map of their condition: the right sample for a held-out condition is known.
    `shared`: norm of a direction every condition shares, on top of a unit-norm part that tells them apart (CLIP
    question embeddings of one benchmark: nearest-neighbour cosine ~0.9999)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n_train + n_test, c_dim, generator=g) * 3.0  # raw-embedding-like scale
    z = c @ (torch.randn(d, c_dim, generator=g) / c_dim**0.5).T / 3.0
    z = (z - z[:n_train].mean(0)) / z[:n_train].std(0)  # normalised units, as the stage trains
    if shared:
        c = c / c.norm(dim=-1, keepdim=True) + shared * torch.nn.functional.normalize(
            torch.randn(c_dim, generator=g), dim=0
        )
    return c[:n_train], z[:n_train], c[n_train:], z[n_train:]


def _net(model: dict, c: torch.Tensor, d: int, **changes) -> LatentDenoiser:
    """The stage's denoiser, its condition statistics taken from the training conditions as the stage does."""
    torch.manual_seed(0)
    net = LatentDenoiser(d, c.shape[1], **{**model["denoiser"], **changes})
    if net.cond_norm == "standard":
        net.set_condition_stats(c)
    return net


def _train(net: LatentDenoiser, schedule: NoiseSchedule, c, z, prediction: str, steps: int) -> None:
    """The stage's recipe: MSE to the parameterisation's target, 20% of each batch with the null token."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(z), (32,), generator=g)
        x0, cond = z[idx], c[idx].clone()
        cond[torch.randperm(32, generator=g)[:6]] = 0.0
        t = torch.randint(0, schedule.n_timesteps, (32,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = (
            (net(schedule.add_noise(x0, noise, t), t, cond) - schedule.training_target(x0, noise, t, prediction)) ** 2
        ).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _scores(x: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(squared error to the true latent / the data's spread, nearest-task retrieval accuracy)."""
    err = float(((x - truth) ** 2).mean() / truth.var(0).mean())
    hits = (torch.cdist(x, truth).argmin(1) == torch.arange(len(truth))).float().mean()
    return err, float(hits)


def _stage_defaults(tmp_path: Path, compat: str):
    cfg = compose_config(["experiment=hyperldm_synthvqa", f"compat={compat}"], tmp_path, tmp_path / "run")
    return OmegaConf.to_container(cfg.model, resolve=True)


def _draw(model: dict, net: LatentDenoiser, schedule: NoiseSchedule, c: torch.Tensor, d: int, g: float) -> torch.Tensor:
    null = torch.zeros(1, c.shape[1])
    s = model["sampling"]
    eps = lambda x, t: cfg_eps(net, x, t, c, null, g, rescale=s["guidance_rescale"])  # noqa: E731
    gen = torch.Generator().manual_seed(1)
    if s["method"] == "original":
        return sample_original(eps, schedule, (len(c), d), respacing=schedule.n_timesteps // s["steps"], generator=gen)
    return sample(
        eps,
        schedule,
        schedule.set_timesteps(s["steps"], s["spacing"]),
        shape=(len(c), d),
        method=s["method"],
        eta=s["eta"],
        generator=gen,
        clip_x0=s["clip_x0"],
        prediction=model["prediction"],
    )


def test_default_sampler_recovers_condition_determined_latents(tmp_path: Path) -> None:
    """Positive control with the stage's default (compat=fixed) denoiser, parameterisation and sampler: held-out
    conditions give their own latent (error well below the spread, retrieval ~1) at g >= 1, and a draw from the
    marginal at g = 0 (error ~2x the spread: an independent sample of the same distribution), all in range."""
    model = _stage_defaults(tmp_path, "fixed")
    c, z, c_test, z_test = _toy()
    schedule = NoiseSchedule.make(**model["schedule"])
    net = _net(model, c, z.shape[1], hidden=[128] * 3)
    _train(net, schedule, c, z, model["prediction"], steps=2000)
    for g in (1.0, 2.0):
        x = _draw(model, net, schedule, c_test, z.shape[1], g)
        err, hits = _scores(x, z_test)
        assert err < 0.35 and hits >= 0.9, (g, err, hits)
        assert 0.5 <= sample_health(x)["std"] <= 2.0
    err, hits = _scores(_draw(model, net, schedule, c_test, z.shape[1], 0.0), z_test)
    assert 1.3 < err < 2.7 and hits < 0.25, (err, hits)


def test_standardised_condition_tells_apart_conditions_that_share_their_direction(tmp_path: Path) -> None:
    """Positive control of `cond_norm: standard` (the default): the same toy, but every condition is a shared
    direction of norm 30 plus a unit part that carries the task (cosine between conditions ~0.999, as CLIP question
    embeddings). The default recovers the held-out latents; per-sample LayerNorm, which keeps the shared part, does
    not (the finding behind the default)."""
    model = _stage_defaults(tmp_path, "fixed")
    assert model["denoiser"]["cond_norm"] == "standard"
    c, z, c_test, z_test = _toy(shared=30.0)
    assert float(torch.nn.functional.cosine_similarity(c[:1], c[1:]).min()) > 0.995
    schedule = NoiseSchedule.make(**model["schedule"])
    errors = {}
    for norm in ("standard", "layer"):
        net = _net(model, c, z.shape[1], hidden=[128] * 3, cond_norm=norm)
        _train(net, schedule, c, z, model["prediction"], steps=2000)
        errors[norm] = _scores(_draw(model, net, schedule, c_test, z.shape[1], 1.0), z_test)
    assert errors["standard"][0] < 0.35 and errors["standard"][1] >= 0.9, errors
    assert errors["layer"][0] > 3 * errors["standard"][0], errors


def test_faithful_mode_is_the_original_and_leaves_the_data_range(tmp_path: Path) -> None:
    """compat=faithful composes the original's v1 net, eps-prediction and update rule; on the same toy it diverges
    (the finding behind the fixed default), and the health report says so."""
    model = _stage_defaults(tmp_path, "faithful")
    assert model["denoiser"]["version"] == "v1" and model["prediction"] == "eps"
    assert model["sampling"]["method"] == "original"
    c, z, c_test, _ = _toy()
    schedule = NoiseSchedule.make(**model["schedule"])
    torch.manual_seed(0)
    net = LatentDenoiser(z.shape[1], c.shape[1], **model["denoiser"])
    _train(net, schedule, c, z, model["prediction"], steps=600)
    health = sample_health(_draw(model, net, schedule, c_test, z.shape[1], 1.0))
    assert health["std"] > 2.0 and health["outside"] > 0.05, health


@pytest.mark.parametrize("k", [1, 4])
def test_original_sampler_follows_the_spec_update_rule(k: int) -> None:
    """x <- (x - (1 - a_t)/sqrt(1 - ab'_t) eps(x, t k)) / sqrt(a_t) + sigma'_t z, with a_t of the UN-respaced schedule
    (spec §4.8, §8 B8), computed here in float64 from the formula, with the same noise draws."""
    schedule = NoiseSchedule.make("cosine", 40)
    w = torch.randn(5, 5, generator=torch.Generator().manual_seed(3)) * 0.1
    eps_model = lambda x, t: torch.tanh(x @ w.to(x.dtype)) + 0.01 * t[:, None].to(x.dtype)  # noqa: E731
    got = sample_original(eps_model, schedule, (3, 5), respacing=k, generator=torch.Generator().manual_seed(0))

    ab = torch.cumprod(1 - schedule.betas, 0)[::k]
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    beta = 1 - ab / ab_prev
    sigma = (beta * (1 - ab_prev) / (1 - ab)).sqrt()
    alpha = 1 - schedule.betas
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3, 5), generator=gen).double()
    for t in range(len(ab) - 1, -1, -1):
        e = eps_model(x, torch.full((3,), t * k))
        x = (x - (1 - alpha[t]) / (1 - ab[t]).sqrt() * e) / alpha[t].sqrt()
        if t > 0:
            x = x + sigma[t] * torch.randn((3, 5), generator=gen).double()
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_parameterisations_invert_their_training_target(prediction: str) -> None:
    schedule = NoiseSchedule.make("cosine", 1000)
    x0, noise = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 300, 700, 990, 999])
    x_t = schedule.add_noise(x0, noise, t)
    got_x0, got_eps = schedule.split_prediction(x_t, schedule.training_target(x0, noise, t, prediction), t, prediction)
    torch.testing.assert_close(got_eps, noise, rtol=1e-6, atol=1e-6 if prediction != "x0" else 1e-3)
    torch.testing.assert_close(got_x0, x0, rtol=1e-6, atol=1e-6 if prediction != "eps" else 1e-3)


def test_noise_repeats_gives_every_block_the_same_noise() -> None:
    """Paired comparisons: with noise_repeats = r, block i of the batch sees exactly block 0's noise (DDPM: every
    step's noise too), so an identical model gives identical samples per block."""
    schedule = NoiseSchedule.make("cosine", 100)
    model = lambda x, t: 0.3 * x  # noqa: E731
    x = sample(
        model,
        schedule,
        schedule.set_timesteps(20),
        shape=(12, 3),
        method="ddpm",
        generator=torch.Generator().manual_seed(0),
        noise_repeats=3,
    )
    torch.testing.assert_close(x[:4], x[4:8], rtol=0, atol=0)
    torch.testing.assert_close(x[:4], x[8:], rtol=0, atol=0)
    assert not torch.equal(x[0], x[1])
    with pytest.raises(ValueError, match="noise_repeats = 5"):
        sample(model, schedule, schedule.set_timesteps(5), shape=(12, 3), noise_repeats=5)


def test_guidance_rescale_matches_the_published_formula_and_bounds_the_spread() -> None:
    """cfg_eps(rescale=phi) is Lin et al.'s (diffusers' rescale_noise_cfg): phi * guided * std(cond) / std(guided)
    + (1 - phi) * guided, per row; phi = 1 gives the conditional output's std at any scale."""
    torch.manual_seed(0)
    net = torch.nn.Linear(8 + 1 + 4, 8)
    model = lambda x, t, c: net(torch.cat([x, t[:, None].float(), c], -1))  # noqa: E731
    x, t, c, null = torch.randn(5, 8), torch.full((5,), 3), torch.randn(5, 4), torch.zeros(1, 4)
    eps_c, eps_u = model(x, t, c), model(x, t, null.expand_as(c))
    guided = eps_u + 7.5 * (eps_c - eps_u)
    rescaled = guided * eps_c.std(1, keepdim=True) / guided.std(1, keepdim=True)
    got = cfg_eps(model, x, t, c, null, 7.5, rescale=0.7)
    torch.testing.assert_close(got, 0.7 * rescaled + 0.3 * guided)
    torch.testing.assert_close(cfg_eps(model, x, t, c, null, 7.5, rescale=0.0), guided)
    torch.testing.assert_close(cfg_eps(model, x, t, c, null, 15.0, rescale=1.0).std(1), eps_c.std(1))
    # one scale per row, as the stage evaluates every scale in one batch: only the rows with g > 1 are rescaled
    scales = torch.tensor([0.0, 0.5, 1.0, 7.5, 7.5])
    per_row = cfg_eps(model, x, t, c, null, scales, rescale=0.7)
    plain = eps_u + scales[:, None] * (eps_c - eps_u)
    torch.testing.assert_close(per_row[:3], plain[:3])
    torch.testing.assert_close(per_row[3:], (0.7 * rescaled + 0.3 * guided)[3:])


def test_standardised_condition_of_a_single_training_condition_is_finite() -> None:
    """One meta-train task (a tiny fixture benchmark) has no per-dimension spread: the condition is only centred,
    not divided by a NaN std (the NaN reached the first training loss of hyperldm_vqa's smoke run)."""
    net = LatentDenoiser(4, 3, hidden=[8], version="resmlp", cond_norm="standard")
    c = torch.tensor([[1.0, 2.0, 3.0]])
    net.set_condition_stats(c)
    out = net.normalize_condition(torch.tensor([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]))
