"""Pseudo-data generation of the dfml stage: throughput (images/s) of class-learner-guided DDIM vs unguided, same
zoo, same classes, same steps (`pseudo_data`); and the time of one round on 1 rank vs split over 2 gloo ranks
(`pseudo_data_ranks`).

The zoo, meta-model and class-learner are built from the `dfml_glyphs` experiment's own configs (4 members of the
glyph UNet, 16 pseudo classes, Conv4) with random weights: the time per image does not depend on what the weights
learned, and the benchmark then needs no trained artifact. `pseudo_data`: runs alternate and the best of `repeats` is
kept. `pseudo_data_ranks`: the two ways alternate `repeats` times after one untimed warm-up each; median and range.
"""

from __future__ import annotations

import queue
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from metadiff.config.paths import CONF_DIR
from metadiff.config.typed import as_spec
from metadiff.data.images.partition import class_map
from metadiff.dfml.pseudo_data import generate_pseudo_data
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.diffusion.zoo import DiffusionZoo
from metadiff.nets.backbones import build_backbone
from metadiff.nets.heads import MLPHead
from metadiff.nets.unet import ImageDenoiser
from metadiff.stages.diffusion_unet import UNetSpec

EXPERIMENT = "dfml_glyphs"


def _configs() -> tuple:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dfml = compose(config_name="train", overrides=[f"experiment={EXPERIMENT}"])
        unet = compose(config_name="train", overrides=["experiment=diffusion_unet_glyphs"])
        zoo = compose(config_name="train", overrides=["experiment=diffusion_zoo_glyphs"])
    return dfml, unet, zoo


def build_random_zoo(device: str) -> tuple[DiffusionZoo, torch.nn.Module, torch.nn.Module, dict]:
    dfml, unet, zoo_cfg = _configs()
    # the experiment's own image source: its shape and normalisation, nothing rendered (throughput needs no data)
    source = instantiate(dfml.data.source, cache_dir="unused")
    size, channels = source.image_size, source.channels
    n_models, per_model = int(zoo_cfg.zoo.n_models), int(zoo_cfg.zoo.classes_per_model)
    torch.manual_seed(0)
    member = {
        "image_size": size,
        "channels": channels,
        "unet": as_spec(UNetSpec, unet.model.unet, "model.unet").kwargs(),  # as the stage builds it
        "learn_sigma": unet.model.learn_sigma,
        "attention_heads": unet.model.attention_heads,
    }
    models = [ImageDenoiser.from_config(member).eval().requires_grad_(False).to(device) for _ in range(n_models)]
    schedule_cfg = dict(unet.model.schedule)
    classes = [list(range(k * per_model, (k + 1) * per_model)) for k in range(n_models)]
    zoo = DiffusionZoo(
        models,
        NoiseSchedule.make(**schedule_cfg),
        schedule_cfg,
        class_map(classes),
        [str(c) for c in range(n_models * per_model)],
        size,
        channels,
    )
    backbone = build_backbone(**source.backbone_spec(dict(dfml.model.backbone))).to(device).eval()
    learner = MLPHead(backbone.out_dim, len(zoo.class_map), norm="batch_stats", time_conditioned=True).to(device)
    return zoo, backbone, learner.eval(), dict(dfml.model.generation)


def bench_pseudo_data(data_dir: Path, device: str, per_class: int = 4, repeats: int = 2) -> dict:
    zoo, backbone, learner, generation = build_random_zoo(device)
    steps, batch = int(generation["steps"]), int(generation["batch_size"])
    n_images = per_class * len(zoo.class_map)
    seconds: dict[str, list[float]] = {"unguided": [], "guided": []}
    for _ in range(repeats):
        for name, scale in (("unguided", 0.0), ("guided", float(generation["scale"]) or 1.0)):
            start = time.perf_counter()
            data = generate_pseudo_data(
                zoo, backbone, learner, per_class, batch, steps, scale, "fixed", 0, spacing=generation["spacing"]
            )
            seconds[name].append(time.perf_counter() - start)
            assert len(data.labels) == n_images
    best = {k: min(v) for k, v in seconds.items()}
    return {
        "benchmark": f"dfml pseudo-data generation, {EXPERIMENT} configs: {zoo.n_models} UNet members, "
        f"{len(zoo.class_map)} classes x {per_class}, DDIM {steps} steps, batch {batch}",
        "images": n_images,
        "images_per_s": {k: n_images / v for k, v in best.items()},
        "guided_over_unguided_time": best["guided"] / best["unguided"],
        "all_runs_seconds": seconds,
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": float(statistics.median(values)), "min": min(values), "max": max(values)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_all_gather(local: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return torch.stack(out)


def _round(zoo, backbone, learner, generation: dict, per_class: int, rank: int = 0, world_size: int = 1):
    return generate_pseudo_data(
        zoo,
        backbone,
        learner,
        per_class,
        int(generation["batch_size"]),
        int(generation["steps"]),
        float(generation["scale"]) or 1.0,
        "fixed",
        0,
        spacing=generation["spacing"],
        rank=rank,
        world_size=world_size,
        all_gather=_gloo_all_gather if world_size > 1 else None,
    )


def _rank_worker(rank: int, world_size: int, port: int, threads: int, per_class: int, commands, results) -> None:
    """One gloo rank: on each command, one round split over the ranks (the stage's code path: generate_pseudo_data
    with this rank and an all_gather), timed from a barrier to its gathered result."""
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        zoo, backbone, learner, generation = build_random_zoo("cpu")
        while commands.get() == "round":
            dist.barrier()
            start = time.perf_counter()
            data = _round(zoo, backbone, learner, generation, per_class, rank, world_size)
            seconds = time.perf_counter() - start
            results.put((rank, seconds, int((data.ranks == rank).sum()), data.images if rank == 0 else None))
    finally:
        dist.destroy_process_group()


def bench_pseudo_data_ranks(
    data_dir: Path, device: str, per_class: int = 10, repeats: int = 5, threads: int = 1
) -> dict:
    """One round of pseudo data on 1 rank (this process) vs 2 gloo CPU ranks (spawned once, kept between runs),
    `threads` torch threads per rank (a rank stands for a device). The ways alternate `repeats` times after one
    untimed warm-up each; the 2-rank time of a run is its slowest rank's. Checks the 2-rank round equals the 1-rank
    one. CPU only (`device` is not used: one GPU cannot host 2 ranks)."""
    world_size = 2
    previous_threads = torch.get_num_threads()
    zoo, backbone, learner, generation = build_random_zoo("cpu")
    n_images = per_class * len(zoo.class_map)
    context = mp.get_context("spawn")
    commands, results = [context.Queue() for _ in range(world_size)], context.Queue()
    port = _free_port()
    workers = [
        context.Process(
            target=_rank_worker, args=(r, world_size, port, threads, per_class, commands[r], results), daemon=True
        )
        for r in range(world_size)
    ]
    for w in workers:
        w.start()
    seconds: dict[str, list[float]] = {"1_rank": [], "2_ranks": []}
    per_rank: dict[int, list[float]] = {r: [] for r in range(world_size)}
    shares: dict[int, int] = {}
    equal = True
    try:
        for run in range(repeats + 1):  # run 0: warm-up, not timed
            torch.set_num_threads(threads)
            start = time.perf_counter()
            one = _round(zoo, backbone, learner, generation, per_class)
            elapsed = time.perf_counter() - start
            torch.set_num_threads(previous_threads)
            for q in commands:
                q.put("round")
            reports = []
            for _ in range(world_size):
                try:
                    reports.append(results.get(timeout=1800))
                except queue.Empty as error:
                    raise RuntimeError("a gloo rank of the pseudo-data benchmark did not answer") from error
            for rank, rank_seconds, share, images in reports:
                shares[rank] = share
                if images is not None:
                    equal = equal and torch.equal(images, one.images)
                if run:
                    per_rank[rank].append(rank_seconds)
            if run:
                seconds["1_rank"].append(elapsed)
                seconds["2_ranks"].append(max(r[1] for r in reports))
    finally:
        torch.set_num_threads(previous_threads)
        for q in commands:
            q.put("stop")
        for w in workers:
            w.join(timeout=60)
            if w.is_alive():
                w.kill()
    one_rank, two_ranks = statistics.median(seconds["1_rank"]), statistics.median(seconds["2_ranks"])
    return {
        "benchmark": f"dfml pseudo data, one round on 1 rank vs 2 gloo CPU ranks ({threads} torch thread(s) each), "
        f"{EXPERIMENT} configs: {zoo.n_models} UNet members, {len(zoo.class_map)} classes x "
        f"{per_class}, DDIM {generation['steps']} steps, batch {generation['batch_size']}, guided",
        "images": n_images,
        "repeats": repeats,
        "threads_per_rank": threads,
        "images_per_rank": [shares[r] for r in range(world_size)],
        "seconds": {k: _spread(v) for k, v in seconds.items()},
        "seconds_per_rank_2_ranks": {str(r): _spread(v) for r, v in per_rank.items()},
        "two_ranks_over_one_time": two_ranks / one_rank,
        "equal_to_one_rank": equal,
        "all_runs_seconds": seconds,
    }
