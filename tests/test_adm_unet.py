"""The zoo UNet is the spec's ADM (§3.6): attention exactly at 16x16 and 8x8 with 4 heads, learned-range variance
(2C outputs) trained by the hybrid loss (§4.1), whose VLB pieces match closed forms, and ancestral steps that use
the learned variance (against a hand computation and diffusers' `learned_range`); a positive control learns the
known optimal reverse variance of Gaussian data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config, run_metrics, run_train, written_artifact
from metadiff.diffusion.losses import (
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    normal_kl,
    vb_terms_bpd,
)
from metadiff.diffusion.sampling import sample, step
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.nets.unet import ImageDenoiser, set_attention_heads

TINY = ["model.unet.block_out_channels=[16,32,48,64]", "model.unet.norm_num_groups=8"]


@pytest.mark.parametrize("bench", ["miniimagenet", "cifarfs"])
def test_real_data_unet_is_the_spec_adm(bench: str, tmp_path: Path) -> None:
    full = compose_config([f"experiment=diffusion_unet_{bench}"], tmp_path, tmp_path / "out").model
    assert list(full.unet.block_out_channels) == [128, 256, 384, 512] and full.unet.layers_per_block == 3
    assert full.attention_heads == 4 and full.learn_sigma is True and full.image_size == 64
    assert full.unet.resnet_time_scale_shift == "scale_shift" and full.unet.dropout == 0.0
    assert dict(full.schedule) == {"name": "cosine", "n_timesteps": 1000}

    cfg = compose_config([f"experiment=diffusion_unet_{bench}", *TINY], tmp_path, tmp_path / "out")
    denoiser = instantiate(cfg.model).denoiser  # the stage's own construction, channels shrunk
    seen: list[tuple[int, int, int, float]] = []

    def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        _, c, h, w = args[0].shape  # diffusers' UNet blocks call Attention on [B, C, H, W] maps
        assert h == w and c == module.inner_dim
        seen.append((h, module.heads, c // module.heads, module.scale))

    for module in denoiser.modules():
        if type(module).__name__ == "Attention":
            module.register_forward_hook(record)
    out = denoiser.unet(torch.randn(1, 3, 64, 64), torch.tensor([10])).sample
    # ADM, attention_resolutions 16,8 and 3 res blocks: 3 down + 4 up layers at 16x16; 3 down + 1 middle + 4 up at 8x8
    assert sorted(h for h, *_ in seen) == [8] * 8 + [16] * 7
    assert all(heads == 4 and scale == pytest.approx(width**-0.5) for _, heads, width, scale in seen)
    assert out.shape == (1, 6, 64, 64) and denoiser.unet.conv_out.out_channels == 6  # eps and v: 2 x 3 channels


@pytest.mark.parametrize("processor", ["AttnProcessor", "AttnProcessor2_0"])
def test_set_heads_equals_a_four_head_attention(processor: str) -> None:
    """Re-splitting a built diffusers Attention into 4 heads = constructing it with 4 heads (same weights)."""
    from diffusers.models import attention_processor as ap

    common = dict(
        rescale_output_factor=1.0,
        eps=1e-5,
        norm_num_groups=8,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    )  # as diffusers' AttnDownBlock2D builds it
    torch.manual_seed(0)
    one = ap.Attention(48, heads=1, dim_head=48, **common)
    with torch.no_grad():  # larger q/k weights, so that the head split visibly changes the softmax
        one.to_q.weight.mul_(8.0)
        one.to_k.weight.mul_(8.0)
    four = ap.Attention(48, heads=4, dim_head=12, **common)
    four.load_state_dict(one.state_dict())
    x = torch.randn(2, 48, 5, 5)
    for module in (one, four):
        module.set_processor(getattr(ap, processor)())
    single = one(x)
    set_attention_heads(one, 4)
    torch.testing.assert_close(one(x), four(x), rtol=1e-5, atol=1e-5)
    assert (single - four(x)).abs().max() > 1e-3  # the split matters, so the equality above is informative


def test_learn_sigma_interface_and_old_configs() -> None:
    unet = {
        "block_out_channels": [8, 8],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D"] * 2,
        "up_block_types": ["UpBlock2D"] * 2,
        "norm_num_groups": 4,
        "attention_head_dim": 4,
    }
    model = ImageDenoiser(8, 1, unet, learn_sigma=True, attention_heads=None)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 5, 9])
    eps, v = model.forward_with_variance(x, t)
    full = model.unet(x, t).sample
    assert full.shape == (3, 2, 8, 8)
    torch.testing.assert_close(eps, full[:, :1])
    torch.testing.assert_close(v, full[:, 1:])
    torch.testing.assert_close(model(x, t), eps)  # eps_model(x_t, t) -> eps for every existing caller
    assert model.sampling_model() == model.forward_with_variance
    config = json.loads(json.dumps(model.config))
    assert config["learn_sigma"] is True and config["attention_heads"] is None
    assert ImageDenoiser.from_config(config).learn_sigma
    old = {k: config[k] for k in ("image_size", "channels", "unet")}  # a zoo written before learn_sigma existed
    legacy = ImageDenoiser.from_config(old)
    assert not legacy.learn_sigma and legacy.unet.conv_out.out_channels == 1 and legacy.sampling_model() is legacy
    with pytest.raises(ValueError, match="learn_sigma"):
        legacy.forward_with_variance(x, t)


def test_normal_kl_closed_forms() -> None:
    m, lv = torch.randn(10), torch.randn(10)
    assert float(normal_kl(m, lv, m, lv).abs().max()) == 0.0
    m1, s1, m2, s2 = 0.3, 0.5, -1.2, 2.0
    expected = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    got = normal_kl(torch.tensor(m1), torch.tensor(2 * math.log(s1)), torch.tensor(m2), torch.tensor(2 * math.log(s2)))
    assert float(got) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mean, std", [(0.0, 0.1), (0.93, 0.004), (-1.4, 0.3), (0.5, 3.0), (0.999, 1e-4)])
def test_discretized_likelihood_is_a_distribution_over_the_256_levels(mean: float, std: float) -> None:
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(
        levels, torch.full_like(levels, mean), torch.full_like(levels, 2 * math.log(std))
    )
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-6)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    k, half = 128, 1 / 255
    x = float(levels[k])
    inner = phi((x + half - mean) / std) - phi((x - half - mean) / std)
    assert float(logp[k].exp()) == pytest.approx(inner, abs=1e-9)
    assert float(logp[0].exp()) == pytest.approx(phi((-1 + half - mean) / std), abs=1e-9)


def test_vb_term_is_zero_at_the_true_posterior_and_trains_only_the_variance() -> None:
    schedule = NoiseSchedule.make("cosine", 1000)
    x0 = (torch.randint(0, 256, (4, 3, 2, 2)) / 127.5 - 1).float()
    noise = torch.randn(x0.shape)
    t = torch.tensor([0, 1, 200, 999])
    x_t = schedule.add_noise(x0, noise, t)
    lower = torch.full_like(x0, -1.0)  # v = -1: the variance is beta_tilde, the true posterior's
    vb = vb_terms_bpd(schedule, x0, x_t, t, noise, lower)
    assert vb[1:].abs().max() < 1e-4  # eps = the true noise and beta_tilde: p = q, KL 0
    assert vb[0] > 0  # t = 0: the decoder NLL, -log P(bin) > 0
    eps = noise.clone().requires_grad_(True)
    v = torch.zeros_like(x0, requires_grad=True)
    terms = hybrid_loss(schedule, x0, noise, x_t, t, eps, v)
    torch.autograd.grad(terms["vb"], v)  # reaches v ...
    assert torch.autograd.grad(terms["vb"], eps, allow_unused=True)[0] is None  # ... and not eps (stop-gradient)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def _hand_step(
    schedule: NoiseSchedule, x: torch.Tensor, eps: torch.Tensor, v: torch.Tensor, t: int, t_prev: int, z: torch.Tensor
) -> torch.Tensor:
    ab, ab_prev = float(schedule.alphas_cumprod[t]), float(schedule.alphas_cumprod[t_prev])
    beta = 1 - ab / ab_prev
    beta_tilde = beta * (1 - ab_prev) / (1 - ab)
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    mean = math.sqrt(ab_prev) * beta / (1 - ab) * x0 + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * x
    frac = (v + 1) / 2
    return mean + torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(beta_tilde))) * z


def test_learned_variance_step_matches_hand_computation_and_diffusers() -> None:
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule.make("cosine", 1000)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    for v_value in (1.0, -1.0):  # the learned range's ends: beta, beta_tilde
        v = torch.full_like(x, v_value)
        ours = step(schedule, x, eps, 500, 460, eta=1.0, generator=torch.Generator().manual_seed(5), v=v)
        torch.testing.assert_close(ours, _hand_step(schedule, x, eps, v, 500, 460, z), rtol=1e-5, atol=1e-5)
    # respaced (leading, stride 20): diffusers' learned_range builds beta from the kept pair too
    theirs = DDPMScheduler(
        num_train_timesteps=1000,
        trained_betas=schedule.betas.float().numpy(),
        variance_type="learned_range",
        clip_sample=False,
    )
    theirs.set_timesteps(50)
    steps = schedule.set_timesteps(50, spacing="leading")
    assert steps.tolist() == theirs.timesteps.tolist()
    v = torch.rand_like(x) * 2 - 1
    for i in (0, 10, 48, 49):
        t, t_prev = int(steps[i]), int(steps[i + 1]) if i + 1 < 50 else -1
        expected = theirs.step(torch.cat([eps, v], 1), t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        got = step(schedule, x, eps, t, t_prev, eta=1.0, generator=torch.Generator().manual_seed(i), v=v)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eta = 0.5"):
        step(schedule, x, eps, 500, 460, eta=0.5, v=v)


def test_sample_uses_the_learned_variance_in_ancestral_steps_only() -> None:
    schedule = NoiseSchedule.make("cosine", 1000)
    steps = torch.tensor([300, 150, 0])
    x_start = torch.randn(3, 1, 2, 2, dtype=torch.float64) * 2

    def with_v(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 0.8 * x, torch.full_like(x, 1.0)

    def eps_only(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.8 * x

    kw = dict(x_start=x_start, noise_start=False, clip_x0=1.0)
    ddim = sample(with_v, schedule, steps, method="ddim", **kw)
    torch.testing.assert_close(ddim, sample(eps_only, schedule, steps, method="ddim", **kw))
    got = sample(with_v, schedule, steps, method="ddpm", generator=torch.Generator().manual_seed(0), **kw)
    gen, x = torch.Generator().manual_seed(0), x_start
    for t, t_prev in ((300, 150), (150, 0), (0, -1)):
        tb = torch.full((3,), t)
        x0 = schedule.predict_x0(x, 0.8 * x, tb).clamp(-1, 1)  # the clipped-x0 path still applies
        eps = schedule.predict_eps(x, x0, tb)
        if t_prev < 0:
            x = x0
        else:
            x = _hand_step(schedule, x, eps, torch.ones_like(x), t, t_prev, torch.randn(x.shape, generator=gen))
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    fixed = sample(eps_only, schedule, steps, method="ddpm", generator=torch.Generator().manual_seed(0), **kw)
    assert (fixed - got).abs().max() > 1e-3  # beta, not the posterior's beta_tilde


def test_diffusionmix_denoises_with_the_learned_variance(monkeypatch: pytest.MonkeyPatch) -> None:
    from metadiff.dfml.diffusionmix import interpolate
    from metadiff.diffusion.zoo import DiffusionZoo

    unet = {
        "block_out_channels": [8, 8],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D"] * 2,
        "up_block_types": ["UpBlock2D"] * 2,
        "norm_num_groups": 4,
        "attention_head_dim": 4,
    }
    model = ImageDenoiser(8, 1, unet, learn_sigma=True).eval()
    calls: list[int] = []
    with_variance = model.forward_with_variance
    monkeypatch.setattr(model, "forward_with_variance", lambda x, t: calls.append(int(t[0])) or with_variance(x, t))
    zoo = DiffusionZoo([model], NoiseSchedule.make("cosine", 1000), {}, [], [], 8, 1)
    a, b = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    out = interpolate(
        zoo, 0, a, b, t=50, lam=0.3, compat="fixed", generator=torch.Generator().manual_seed(0), denoise_steps=3
    )
    assert calls == [50, 25, 0] and out.shape == a.shape  # every ancestral step read (eps, v)


def test_learned_variance_finds_the_optimal_reverse_variance_of_gaussian_data() -> None:
    """Positive control: data N(0, s^2) with its exact eps, a per-t v table trained by the hybrid loss lowers L_vb
    and reaches the KL-optimal variance beta_tilde + c0^2 Var(x0 | x_t), known in closed form."""
    torch.manual_seed(0)
    schedule, s, n_t = NoiseSchedule.make("linear", 50, 1e-3, 0.2), 0.5, 50
    ab_all = schedule.alphas_cumprod.float()

    def exact_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = ab_all[t].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * x_t / (ab * s**2 + 1 - ab)

    table = torch.nn.Embedding(n_t, 1)
    torch.nn.init.zeros_(table.weight)
    opt = torch.optim.Adam(table.parameters(), lr=0.05)

    def vb_of(gen: torch.Generator, n: int) -> torch.Tensor:
        x0 = torch.randn((n, 1, 2, 2), generator=gen) * s
        t = torch.randint(1, n_t, (n,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = schedule.add_noise(x0, noise, t)
        v = table(t).view(-1, 1, 1, 1).expand_as(x0)
        return hybrid_loss(schedule, x0, noise, x_t, t, exact_eps(x_t, t), v)["vb"]

    def optimal_frac(t: int) -> float:
        ab, ab_prev = float(ab_all[t]), float(ab_all[t - 1])
        beta = 1 - ab / ab_prev
        beta_tilde = beta * (1 - ab_prev) / (1 - ab)
        c0 = math.sqrt(ab_prev) * beta / (1 - ab)
        optimal = beta_tilde + c0**2 * s**2 * (1 - ab) / (ab * s**2 + 1 - ab)
        return (math.log(optimal) - math.log(beta_tilde)) / (math.log(beta) - math.log(beta_tilde))

    with torch.no_grad():
        before = float(vb_of(torch.Generator().manual_seed(1), 4096))
        trained = table.weight.clone()
        table.weight[1:, 0] = torch.tensor([2 * optimal_frac(t) - 1 for t in range(1, n_t)])
        best = float(vb_of(torch.Generator().manual_seed(1), 4096))
        table.weight.copy_(torch.zeros_like(trained))
    gen = torch.Generator().manual_seed(2)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / 300)  # anneal the SGD noise away
    for _ in range(300):
        opt.zero_grad()
        vb_of(gen, 2048).backward()
        opt.step()
        decay.step()
    with torch.no_grad():
        after = float(vb_of(torch.Generator().manual_seed(1), 4096))
    assert after < before and after - best < 0.1 * (before - best)  # most of the reachable gain
    for t in (8, 14, 20, 26):
        assert 0.05 < optimal_frac(t) < 0.95  # an interior optimum: neither end of the range would pass by luck
        assert (float(table.weight[t].detach()) + 1) / 2 == pytest.approx(optimal_frac(t), abs=0.05)


def test_stage_trains_with_learn_sigma_and_records_it(cache_root: Path) -> None:
    proc = run_train(
        [
            "experiment=diffusion_unet_glyphs",
            "model.learn_sigma=true",
            "model.attention_heads=4",
            "model.unet.attention_head_dim=null",
            "trainer.max_steps=2",
            "test=false",
            "callbacks.ema.update_starting_at_step=0",
            "optimized_metric=null",
            "trainer.check_val_every_n_epoch=100",
            "task_name=unet_sigma",
            "trainer.enable_progress_bar=false",
        ],
        cache_root,
    )
    m = run_metrics(proc, "diffusion_unet")
    assert m["train/loss"] == pytest.approx(m["train/mse"] + m["train/vb"], rel=1e-5)  # the hybrid loss was trained
    path = written_artifact(proc.stdout + proc.stderr, "diffusion_unet")
    config = json.loads((path / "unet.json").read_text())["config"]
    assert config["learn_sigma"] is True and config["attention_heads"] == 4
    model = ImageDenoiser.from_config(config)
    model.load_state_dict(torch.load(path / "unet.pt", weights_only=True))
    assert model.unet.conv_out.out_channels == 2
    assert all(m.heads == 4 for m in model.modules() if type(m).__name__ == "Attention")
