"""Feature extraction on COCO-style JPEGs: the whole `features_vqa` pipeline vs a bare open_clip forward pass.

The pipeline decodes and resizes JPEGs in DataLoader workers while the model runs; the bare loop encodes the same
images from batches preloaded in memory. Their ratio shows whether decoding is the bottleneck (issue 3 asks for
>= 0.9). Images are synthetic 640x480 JPEGs (COCO's typical size) named and laid out like COCO, so the real
`MetaVQASource` reads them; the model is a real open_clip architecture with random weights (no download).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metadiff.bench.features import bare_images_per_s, pipeline_images_per_s
from metadiff.data.meta_vqa.source import MetaVQASource
from metadiff.data.sources import MetaValSplit
from metadiff.features.clip_models import create_clip


def write_coco_like(root: Path, n_images: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[str]:
    """Smooth colour fields with noise (JPEG-decodes like a photo, unlike pure noise) + a 2-task file using them."""
    rng = np.random.default_rng(seed)
    names = [f"COCO_val2014_{i:012d}" for i in range(n_images)]
    (root / "coco" / "val2014").mkdir(parents=True)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    for name in names:
        base = rng.uniform(0, 255, (3, 3))
        image = sum(base[:, k, None, None] * f for k, f in enumerate((xx, yy, 1 - xx)))
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(image).save(root / "coco" / "val2014" / f"{name}.jpg", quality=90)
    half = n_images // 2

    def task(imgs: list[str]) -> dict:
        return {
            "answers": ["a", "b"],
            "train": [[n, "a" if i % 2 else "b"] for i, n in enumerate(imgs)],
            "test": [[imgs[0], "a"]],
        }

    (root / "tasks").mkdir()
    (root / "tasks" / "meta_train.json").write_text(json.dumps({"what is a?": task(names[:half])}))
    (root / "tasks" / "meta_test.json").write_text(json.dumps({"what is b?": task(names[half:])}))
    return names


def bench_feature_extraction_vqa(
    data_dir: Path,
    device: str,
    arch: str = "ViT-B-32",
    n_images: int = 384,
    batch_size: int = 64,
    num_workers: int = 2,
    repeats: int = 2,
) -> dict:
    bundle = create_clip(arch)
    model = bundle.model.eval().to(device)
    bare, pipeline = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = write_coco_like(root, n_images)
        # one meta-train task, and timing only: no meta-val split
        source = MetaVQASource(
            image_dir=str(root / "coco"), task_dir=str(root / "tasks"), meta_val=MetaValSplit(fraction=0.0, seed=0)
        )
        source.prepare()
        dataset = source.image_dataset(names, bundle.image_size, bundle.mean, bundle.std)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        batches = [images for images, _ in loader]
        checkpoint = root / "clip.pt"
        torch.save(bundle.model.state_dict(), checkpoint)
        for i in range(repeats):
            bare.append(bare_images_per_s(model, batches, device))
            pipeline.append(
                pipeline_images_per_s(
                    source, arch, checkpoint, root / f"store{i}", batch_size, device, num_workers=num_workers
                )
            )
    return {
        "benchmark": f"feature extraction, {n_images} COCO-style 640x480 JPEGs, {arch}, {num_workers} workers",
        "batch_size": batch_size,
        "images": n_images,
        "bare_forward_images_per_s": max(bare),
        "pipeline_images_per_s": max(pipeline),
        "pipeline_over_bare": max(pipeline) / max(bare),
        "all_runs": {"bare": bare, "pipeline": pipeline},
    }
