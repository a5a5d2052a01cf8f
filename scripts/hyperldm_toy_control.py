"""HyperLDM positive control, all denoiser/parameterisation/sampler combinations side by side (docs/hyperclip_family.md).

Latents that are a fixed linear map of a 64-d condition (200 training conditions, 50 held out); each denoiser is
trained with the stage's recipe and sampled at g = 0, 1, 2. Prints squared error to the true latent / the data's
spread, nearest-task retrieval and the per-dimension std. ~5 min on 2 CPU cores:
    python scripts/hyperldm_toy_control.py 3000
tests/test_hyperldm_sampler.py runs a smaller version on the stage's composed default."""

import sys
import time

import torch

from metadiff.diffusion.sampling import cfg_eps, sample, sample_health, sample_original
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.nets.latent_denoiser import LatentDenoiser

torch.set_num_threads(1)


def data(seed=0, n_train=200, n_test=50, c_dim=64, d=128, c_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n_train + n_test, c_dim, generator=g) * c_scale
    A = torch.randn(d, c_dim, generator=g) / c_dim**0.5
    z = c @ A.T / c_scale
    return c[:n_train], z[:n_train], c[n_train:], z[n_train:]


def train(net, sched, c, z, pred, steps=3000, bs=32, lr=1e-3, seed=0):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    mu, sd = z.mean(0), z.std(0)
    z0 = (z - mu) / sd
    for _k in range(steps):
        idx = torch.randint(0, len(z), (bs,), generator=g)
        x0, cond = z0[idx], c[idx].clone()
        cond[torch.randperm(bs, generator=g)[: int(0.2 * bs)]] = 0
        t = torch.randint(0, sched.n_timesteps, (bs,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        out = net(sched.add_noise(x0, noise, t), t, cond)
        loss = ((out - sched.training_target(x0, noise, t, pred)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mu, sd


def evaluate(
    net,
    sched,
    mu,
    sd,
    c,
    z,
    pred,
    steps,
    spacing,
    clip,
    method="ddim",
    scales=(0.0, 1.0, 2.0),
    original=False,
):
    z0 = (z - mu) / sd
    spread = z0.var(0).mean()
    res = {}
    for g in scales:
        gen = torch.Generator().manual_seed(1)
        null = torch.zeros(1, c.shape[1])

        def eps(x, t, null=null, g=g):  # bound now: used within this iteration
            return cfg_eps(net, x, t, c, null, g)

        if original:
            x = sample_original(eps, sched, (len(c), z.shape[1]), generator=gen)
        else:
            x = sample(
                eps,
                sched,
                sched.set_timesteps(steps, spacing),
                shape=(len(c), z.shape[1]),
                method=method,
                generator=gen,
                clip_x0=clip,
                prediction=pred,
            )
        err = float(((x - z0) ** 2).mean() / spread)
        d = torch.cdist(x, z0)
        retr = float((d.argmin(1) == torch.arange(len(c))).float().mean())
        h = sample_health(x)
        res[g] = (err, retr, h["std"])
    return res


if __name__ == "__main__":
    c, z, ct, zt = data()
    sched = NoiseSchedule.make("cosine", 1000)
    configs = [
        ("v1-eps", dict(version="v1", hidden=[128, 128]), "eps"),
        ("res-eps", dict(version="resmlp", hidden=[256] * 3, cond_norm="layer"), "eps"),
        ("res-v", dict(version="resmlp", hidden=[256] * 3, cond_norm="layer"), "v"),
        ("res-x0", dict(version="resmlp", hidden=[256] * 3, cond_norm="layer"), "x0"),
    ]
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    for name, kw, pred in configs:
        torch.manual_seed(0)
        net = LatentDenoiser(128, 64, **kw)
        t0 = time.time()
        mu, sd = train(net, sched, c, z, pred, steps=steps)
        print(f"{name}: trained in {time.time() - t0:.0f}s", flush=True)
        for spacing, clip, method, nsteps in [
            ("trailing", None, "ddim", 50),
            ("trailing", 4.0, "ddim", 50),
            ("leading", None, "ddim", 50),
            ("trailing", None, "ddpm", 1000),
            ("trailing", 4.0, "ddpm", 1000),
        ]:
            r = evaluate(net, sched, mu, sd, ct, zt, pred, nsteps, spacing, clip, method)
            print(
                f"  {method}-{nsteps} {spacing} clip={clip}: "
                + "  ".join(f"g={g}: err {e:.3g} retr {q:.2f} std {s:.3g}" for g, (e, q, s) in r.items()),
                flush=True,
            )
        if pred == "eps":
            r = evaluate(net, sched, mu, sd, ct, zt, pred, 1000, "trailing", None, original=True)
            print(
                "  original: "
                + "  ".join(f"g={g}: err {e:.3g} retr {q:.2f} std {s:.3g}" for g, (e, q, s) in r.items()),
                flush=True,
            )
