"""Pseudo-data generation throughput (images/s) of the dfml stage: class-learner-guided DDIM vs unguided, same zoo,
same classes, same steps.

The zoo, meta-model and class-learner are built from the `dfml_glyphs` experiment's own configs (4 members of the
glyph UNet, 16 pseudo classes, Conv4) with random weights: the time per image does not depend on what the weights
learned, and the benchmark then needs no trained artifact. Runs alternate and the best of `repeats` is kept.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from metadiff.config.paths import CONF_DIR
from metadiff.data.images.partition import class_map
from metadiff.dfml.pseudo_data import generate_pseudo_data
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.diffusion.zoo import DiffusionZoo
from metadiff.nets.backbones import build_backbone
from metadiff.nets.heads import MLPHead
from metadiff.nets.unet import ImageDenoiser

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
    models = [ImageDenoiser(size, channels, dict(unet.model.unet)).eval().requires_grad_(False).to(device)
              for _ in range(n_models)]
    schedule_cfg = dict(unet.model.schedule)
    classes = [list(range(k * per_model, (k + 1) * per_model)) for k in range(n_models)]
    zoo = DiffusionZoo(models, NoiseSchedule.make(**schedule_cfg), schedule_cfg, class_map(classes),
                       [str(c) for c in range(n_models * per_model)], size, channels)
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
            data = generate_pseudo_data(zoo, backbone, learner, per_class, batch, steps, scale, "fixed",
                                        torch.Generator().manual_seed(0), spacing=generation.get("spacing", "leading"))
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
