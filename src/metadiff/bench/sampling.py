"""HyperLDM sampling: DDIM (10, 25, 50 steps) vs DDPM (1000 steps), and batched classifier-free guidance vs two passes.

Uses the trained `hyperldm_synthvqa` artifact and its held-out tasks (found, or built first by `metadiff.pipeline` with
the stage runner that `python -m metadiff.bench` passes in). Both samplers score the same tasks with the same guidance
scale; the CFG comparison times one sampler run over the same latents with the cond/uncond predictions from one
doubled batch vs two forward passes per step.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from metadiff.diffusion.sampling import cfg_eps, sample

if TYPE_CHECKING:
    from metadiff.pipeline import StageRunner

EXPERIMENT = "hyperldm_synthvqa"


def _module_and_batches(device: str, overrides: list[str], build: StageRunner | None):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from metadiff.config.paths import CONF_DIR
    from metadiff.pipeline import find_or_build, instantiate_with_upstream, resolve_upstreams
    from metadiff.stages.hyperldm import load_denoiser_state

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=[f"experiment={EXPERIMENT}", "paths.output_dir=outputs/bench/sampling", *overrides],
        )
        HydraConfig.instance().set_config(cfg)
    artifact = find_or_build(cfg, build)
    upstream = resolve_upstreams(cfg)  # all found now
    data = instantiate_with_upstream(cfg.data, upstream)
    data.setup("test")
    module = instantiate_with_upstream(cfg.model, upstream)
    state = load_denoiser_state(artifact)
    module.denoiser.load_state_dict(state["denoiser"])
    module.latent_mean.copy_(state["latent_mean"])
    module.latent_std.copy_(state["latent_std"])
    module.to(device).eval()
    batches = list(data.test_dataloader())
    return module, batches


def _sample_all(module, batches, scale: float, method: str, steps: int, device: str) -> list[torch.Tensor]:
    """Normalised latents of every meta-test batch (the noise of a batch is fixed by its first task)."""
    module.sampling = dataclasses.replace(module.sampling, method=method, steps=steps)  # the bench switches them
    out = []
    for batch in batches:
        gen = torch.Generator().manual_seed(int(batch.task_index[0]))
        with torch.no_grad():
            out.append(
                module.sample_latents(
                    batch.question.to(device), torch.full((batch.n_tasks,), scale, device=device), gen
                )
            )
    return out


def _accuracy(module, batches, latents: list[torch.Tensor], device: str) -> float:
    accs = []
    for batch, x in zip(batches, latents, strict=True):
        batch = module.transfer_batch_to_device(batch, torch.device(device), 0)
        with torch.no_grad():
            accs.append(module._accuracy(module.raw(x), batch))
    return float(torch.cat(accs).mean())


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": float(statistics.median(values)), "min": min(values), "max": max(values)}


def bench_sampling(
    data_dir: Path,
    device: str,
    scale: float = 1.0,
    repeats: int = 5,
    ddim_steps: tuple[int, ...] = (10, 25, 50),
    overrides: tuple[str, ...] = (),
    build: StageRunner | None = None,
) -> dict:
    """DDIM at several step counts vs DDPM-1000 on the same tasks and noise: accuracy (deterministic given the seeds)
    and sampler time, the ways alternated `repeats` times (median and range; this machine is noisy). `overrides`
    of the experiment (e.g. `seed=1`) pick which chain's artifact is measured; `build` (the stage runner, which the
    entry point passes in) builds it first if missing, `None` requires it to exist."""
    module, batches = _module_and_batches(device, list(overrides), build)
    ways = [("ddpm", 1000)] + [("ddim", k) for k in ddim_steps]
    seconds: dict[str, list[float]] = {f"{m}{k}": [] for m, k in ways}
    accuracy: dict[str, float] = {}
    for _ in range(repeats):
        for method, k in ways:
            start = time.perf_counter()
            latents = _sample_all(module, batches, scale, method, k, device)
            seconds[f"{method}{k}"].append(time.perf_counter() - start)
            accuracy.setdefault(f"{method}{k}", _accuracy(module, batches, latents, device))
    ddpm = statistics.median(seconds["ddpm1000"])
    rows: dict[str, dict[str, Any]] = {
        name: {
            "accuracy": accuracy[name],
            "seconds": _spread(seconds[name]),
            "speedup_over_ddpm1000": ddpm / statistics.median(seconds[name]),
            "accuracy_minus_ddpm1000": accuracy[name] - accuracy["ddpm1000"],
        }
        for name in seconds
    }
    close = [name for name in rows if name != "ddpm1000" and abs(rows[name]["accuracy_minus_ddpm1000"]) <= 0.01]
    fastest_close = max(close, key=lambda n: rows[n]["speedup_over_ddpm1000"]) if close else None

    question = torch.cat([b.question for b in batches]).to(device)
    null = torch.zeros(1, question.shape[-1], device=device)
    steps = module.schedule.set_timesteps(50)

    def batched(x, t):  # what the stage samples with
        return cfg_eps(module.denoiser, x, t, question, null, scale)

    def two_passes(x, t):
        c, u = module.denoiser(x, t, question), module.denoiser(x, t, null.expand_as(question))
        return u + scale * (c - u)

    times: dict[str, list[float]] = {"batched": [], "two_passes": []}
    for _ in range(repeats):  # alternate, keep the best: this machine is noisy
        for name, fn in (("batched", batched), ("two_passes", two_passes)):
            start = time.perf_counter()
            with torch.no_grad():
                sample(
                    fn,
                    module.schedule,
                    steps,
                    shape=(question.shape[0], module.base.latent_dim),
                    generator=torch.Generator().manual_seed(0),
                    device=device,
                )
            times[name].append(time.perf_counter() - start)
    return {
        "experiment": EXPERIMENT,
        "overrides": list(overrides),
        "n_tasks": int(question.shape[0]),
        "guidance_scale": scale,
        "repeats": repeats,
        "samplers": rows,
        "fastest_within_1pt_of_ddpm1000": fastest_close,
        "ddim_minus_ddpm_accuracy": rows["ddim50"]["accuracy_minus_ddpm1000"],
        "ddpm_over_ddim_time": rows["ddim50"]["speedup_over_ddpm1000"],
        "cfg_sampler_seconds": {k: min(v) for k, v in times.items()},
        "two_passes_over_batched_time": min(times["two_passes"]) / min(times["batched"]),
    }
