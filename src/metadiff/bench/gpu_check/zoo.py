"""Sections 7, 8 and 9: the data-free stages' sampling at real size, on a zoo of random real-size ADM members built
from the experiments' configs (the weights do not change the time per image).

7. one guided DDIM batch of dfml's pseudo data (`generate_chunks`: class-learner guidance through the meta-model's
   backbone, dfml_miniimagenet's batch, steps, spacing and scale), in fp32 as the stage runs it today and under bf16
   autocast;
8. one DiffusionMix call (`interpolate`: mix at diffusionmix_miniimagenet's `mix.t`, ancestral steps with the learned
   variance) on a batch of support images, in the trainer's precision (the stage mixes inside its test step);
9. with two or more GPUs, a round of pseudo data split over 2 NCCL ranks (each samples its share, `all_gather`)
   against the same round on one rank: equal to the bit (`generate_pseudo_data`'s per-chunk generators)."""

from __future__ import annotations

import math
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from omegaconf import DictConfig

from metadiff.bench.gpu_check.clip import autocast
from metadiff.bench.gpu_check.config import Settings, compose_experiment, or_config
from metadiff.bench.gpu_check.context import Context
from metadiff.bench.gpu_check.runner import Skipped, n_params, peak_memory, timed
from metadiff.config.typed import as_spec
from metadiff.data.images.partition import class_map, zoo_partition
from metadiff.dfml.diffusionmix import interpolate
from metadiff.dfml.pseudo_data import generate_chunks, generate_pseudo_data, plan_chunks
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.diffusion.zoo import DiffusionZoo
from metadiff.nets.backbones import build_backbone
from metadiff.nets.heads import MLPHead
from metadiff.nets.unet import ImageDenoiser
from metadiff.stages.diffusion_unet import UNetSpec


def zoo_configs(
    settings: Settings, overrides: tuple[str, ...] = (), unet_overrides: tuple[str, ...] = ()
) -> dict[str, DictConfig]:
    """The member's, the zoo's, dfml's and diffusionmix's configs (`unet_overrides`: the member's only; the tests
    shrink the UNet with them)."""
    e = settings.spec.experiments
    return {
        name: compose_experiment(getattr(e, name), [*overrides, *(unet_overrides if name == "unet" else ())])
        for name in ("unet", "zoo", "dfml", "diffusionmix")
    }


def random_zoo(
    cfgs: dict[str, DictConfig], members: int, device: str, seed: int = 0
) -> tuple[DiffusionZoo, torch.nn.Module, torch.nn.Module]:
    """`members` random ADM members as diffusion_unet builds them, the zoo's class map (zoo.classes_per_model each)
    and dfml's backbone and class-learner: what dfml and diffusionmix hold while they sample (the same construction
    as `metadiff.bench.pseudo_data.build_random_zoo`, at the miniimagenet experiments and member count)."""
    unet, zoo_cfg, dfml = cfgs["unet"], cfgs["zoo"], cfgs["dfml"]
    size, channels = int(unet.model.image_size), int(unet.model.channels)
    member = {
        "image_size": size,
        "channels": channels,
        "unet": as_spec(UNetSpec, unet.model.unet, "model.unet").kwargs(),
        "learn_sigma": unet.model.learn_sigma,
        "attention_heads": unet.model.attention_heads,
    }
    torch.manual_seed(seed)
    models = [ImageDenoiser.from_config(member).eval().requires_grad_(False).to(device) for _ in range(members)]
    schedule = dict(unet.model.schedule)
    per_model = int(zoo_cfg.zoo.classes_per_model)
    parts = zoo_partition(members * per_model, members, per_model)
    zoo = DiffusionZoo(
        models,
        NoiseSchedule.make(**schedule),
        schedule,
        class_map(parts),
        [str(c) for c in range(len(class_map(parts)))],
        size,
        channels,
    )
    source = instantiate(dfml.data.source)  # its channels and normalisation; no image is read
    backbone = build_backbone(**source.backbone_spec(dict(dfml.model.backbone))).to(device).eval()
    learner = (
        MLPHead(backbone.out_dim, len(zoo.class_map), norm=str(dfml.model.class_learner.norm), time_conditioned=True)
        .to(device)
        .eval()
    )
    return zoo, backbone, learner


def guided_plan(settings: Settings, cfgs: dict[str, DictConfig]) -> dict[str, int]:
    """Members in memory, images and DDIM steps of the timed batch: the check's, or the experiments' own."""
    gen = cfgs["dfml"].model.generation
    return {
        "members": or_config(settings.sizes.guided.members, cfgs["zoo"].zoo.n_models),
        "batch_size": or_config(settings.sizes.guided.batch_size, gen.batch_size),
        "steps": or_config(settings.sizes.guided.steps, gen.steps),
    }


def mix_plan(settings: Settings, cfgs: dict[str, DictConfig]) -> dict[str, Any]:
    """Images per UNet call (the experiment's mix.batch_size, or a batch's whole support set), the mix's noise step
    and the ancestral steps down from it (null: all of them, t + 1 UNet passes)."""
    mix, episodes = cfgs["diffusionmix"].model.mix, cfgs["diffusionmix"].data.episodes
    support = int(episodes.episodes_per_batch) * int(episodes.n_way) * max(int(k) for k in episodes.shots)
    batch = or_config(settings.sizes.mix.batch_size, mix.batch_size if mix.batch_size is not None else support)
    t = int(mix.t)
    denoise = settings.sizes.mix.denoise_steps if settings.sizes.mix.denoise_steps is not None else mix.denoise_steps
    passes = t + 1 if denoise is None else len(torch.linspace(t, 0, int(denoise)).round().long().unique_consecutive())
    return {"batch_size": batch, "t": t, "denoise_steps": denoise, "unet_passes": passes}


def section_guided(ctx: Context, cache: dict[str, Any]) -> dict[str, Any]:
    s = ctx.settings
    cfgs = zoo_configs(s, tuple(ctx.base_overrides()))
    gen = cfgs["dfml"].model.generation
    plan = guided_plan(s, cfgs)
    members, batch, steps = plan["members"], plan["batch_size"], plan["steps"]
    out: dict[str, Any] = {
        "members": members,
        "batch_size": batch,
        "ddim_steps": steps,
        "spacing": str(gen.spacing),
        "scale": float(gen.scale),
        "compat": str(cfgs["dfml"].model.compat),
    }
    with peak_memory(ctx.device) as memory:
        start = time.perf_counter()
        zoo, backbone, learner = random_zoo(cfgs, members, ctx.device)
        out["build_seconds"] = time.perf_counter() - start
        out["member_params"] = n_params(zoo.models[0])
        out["zoo_weight_bytes"] = sum(p.numel() * p.element_size() for m in zoo.models for p in m.parameters())
        per_class = math.ceil(batch / len(zoo.classes_of(0)))
        chunk = plan_chunks(zoo, per_class, batch)[0]
        for precision in ("32-true", "bf16-mixed"):

            def run(p: str = precision) -> list[torch.Tensor]:
                with autocast(ctx.device, p):
                    return generate_chunks(
                        zoo, backbone, learner, [chunk], steps, float(gen.scale), out["compat"], 0, str(gen.spacing)
                    )

            seconds, images = timed(run, ctx.device)
            out[precision] = {
                "seconds": seconds,
                "images": len(chunk.classes),
                "images_per_s": len(chunk.classes) / seconds,
                "seconds_per_image_step": seconds / (len(chunk.classes) * steps),
            }
        # what the stage runs today: generation is outside the trainer's autocast (issue 31, fault 7)
        out["images_per_s"] = out["32-true"]["images_per_s"]
        out["seconds_per_image_step"] = out["32-true"]["seconds_per_image_step"]
    cache["zoo"] = (zoo, backbone, learner, cfgs)
    return {**out, **memory}


def section_diffusionmix(ctx: Context, cache: dict[str, Any]) -> dict[str, Any]:
    s = ctx.settings
    if "zoo" in cache:
        zoo, _, _, cfgs = cache["zoo"]
    else:  # section 7 failed: one member of our own
        cfgs = zoo_configs(s, tuple(ctx.base_overrides()))
        zoo = random_zoo(cfgs, 1, ctx.device)[0]
    plan = mix_plan(s, cfgs)
    batch, t, denoise, passes = plan["batch_size"], plan["t"], plan["denoise_steps"], plan["unet_passes"]
    compat = str(cfgs["diffusionmix"].model.compat)
    size = (batch, zoo.channels, zoo.image_size, zoo.image_size)
    gen = torch.Generator().manual_seed(0)
    x_a, x_b = torch.rand(size, generator=gen).to(ctx.device), torch.rand(size, generator=gen).to(ctx.device)
    lam = torch.rand(batch, generator=gen).to(ctx.device)
    # the stage mixes inside its test_step: under the trainer's precision (bf16 autocast under trainer=gpu)
    precision = str(cfgs["diffusionmix"].trainer.precision)
    with peak_memory(ctx.device) as memory, torch.no_grad(), autocast(ctx.device, precision):
        interpolate(zoo, 0, x_a[:1], x_b[:1], t, lam[:1], compat, gen, 1)  # warm-up
        seconds, mixed = timed(lambda: interpolate(zoo, 0, x_a, x_b, t, lam, compat, gen, denoise), ctx.device)
    assert mixed.shape == x_a.shape and torch.isfinite(mixed).all(), "DiffusionMix gave non-finite images"
    return {
        "batch_size": batch,
        "t": t,
        "denoise_steps": denoise,
        "unet_passes": passes,
        "compat": compat,
        "precision": precision,
        "seconds": seconds,
        "images_per_s": batch / seconds,
        "seconds_per_image_step": seconds / (batch * passes),
        **memory,
    }


# -- section 9: two NCCL ranks ----------------------------------------------------------------------------------------


def section_nccl(ctx: Context) -> dict[str, Any]:
    count = torch.cuda.device_count() if ctx.device == "cuda" else 0
    if count < 2:
        raise Skipped(f"1 device ({count} CUDA device(s); the NCCL round needs >= 2)")
    return two_rank_round(ctx.settings, tuple(ctx.base_overrides()), backend="nccl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _round(
    settings: Settings,
    overrides: tuple[str, ...],
    unet_overrides: tuple[str, ...],
    device: str,
    rank: int = 0,
    world_size: int = 1,
):
    cfgs = zoo_configs(settings, overrides, unet_overrides)
    size = settings.sizes.nccl
    gen = cfgs["dfml"].model.generation
    zoo, backbone, learner = random_zoo(cfgs, size.members, "cpu")  # built on the CPU: the same weights everywhere
    zoo.to(device)
    backbone, learner = backbone.to(device), learner.to(device)

    def all_gather(local: torch.Tensor) -> torch.Tensor:
        local = local.to(device)
        out = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(out, local)
        return torch.stack(out)

    start = time.perf_counter()
    data = generate_pseudo_data(
        zoo,
        backbone,
        learner,
        size.per_class,
        int(gen.batch_size),
        size.steps,
        float(gen.scale),
        str(cfgs["dfml"].model.compat),
        0,
        spacing=str(gen.spacing),
        rank=rank,
        world_size=world_size,
        all_gather=all_gather if world_size > 1 else None,
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return data, time.perf_counter() - start


def _rank(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    settings: Settings,
    overrides: tuple[str, ...],
    unet_overrides: tuple[str, ...],
    results,
) -> None:
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        data, seconds = _round(settings, overrides, unet_overrides, device, rank, world_size)
        results.put((rank, seconds, int((data.ranks == rank).sum()), data.images if rank == 0 else None))
    finally:
        dist.destroy_process_group()


def two_rank_round(
    settings: Settings, overrides: tuple[str, ...], backend: str, unet_overrides: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One round on 1 rank (this process, device 0) and split over 2 spawned ranks (`backend` nccl: cuda:0 and
    cuda:1; gloo: the CPU, for the tests of this code path); equal when every pixel is."""
    device = "cuda:0" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    one, one_seconds = _round(settings, overrides, unet_overrides, device)
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    workers = [
        context.Process(
            target=_rank, args=(r, 2, port, backend, settings, overrides, unet_overrides, results), daemon=True
        )
        for r in range(2)
    ]
    for w in workers:
        w.start()
    reports = [results.get(timeout=int(os.environ.get("METADIFF_GPU_CHECK_RANK_TIMEOUT", "900"))) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    failed = [w.exitcode for w in workers if w.exitcode not in (0, None)]
    if failed:
        raise RuntimeError(f"a rank of the 2-rank round exited with {failed}")
    images = next(r[3] for r in reports if r[0] == 0)
    equal = torch.equal(images.cpu(), one.images.cpu())
    if not equal:
        raise AssertionError(
            f"the 2-rank round differs from the 1-rank round in {int((images.cpu() != one.images.cpu()).sum())} pixels"
        )
    return {
        "backend": backend,
        "images": len(one),
        "equal_to_one_rank": equal,
        "images_per_rank": [r[2] for r in sorted(reports)],
        "one_rank_seconds": one_seconds,
        "two_ranks_seconds": max(r[1] for r in reports),
        "two_ranks_over_one_time": max(r[1] for r in reports) / one_seconds,
        "seconds_per_rank": {str(r[0]): r[1] for r in reports},
        "median_rank_seconds": statistics.median(r[1] for r in reports),
    }
