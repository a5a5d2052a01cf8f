"""Feature extraction: the whole stage (DataLoader -> Lightning predict -> store writes) vs a bare forward pass.

Both encode the same images with the same model and batch size; the bare loop gets its batches preloaded in memory,
so the ratio shows what the data pipeline and the store cost on top of the model itself. Runs alternate (A B A B)
and the best of each is kept, because shared machines are noisy.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from metadiff.data.sources import MetaValSplit, TaskSource
from metadiff.data.synthvqa.build import SynthVQAConfig
from metadiff.data.synthvqa.source import SynthVQASource
from metadiff.features.clip_models import create_clip
from metadiff.stages.features import FeatureExtractor, FeatureSourceDataModule

ARCH = "metadiff-tiny-vit"


def bare_images_per_s(model: Any, batches: list[torch.Tensor], device: str) -> float:
    with torch.no_grad():
        model.encode_image(batches[0].to(device))
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            model.encode_image(batch.to(device))
        if device == "cuda":
            torch.cuda.synchronize()
    return sum(b.shape[0] for b in batches) / (time.perf_counter() - start)


def pipeline_images_per_s(
    source: TaskSource, arch: str, checkpoint: Path, store: Path, batch_size: int, device: str, num_workers: int = 0
) -> float:
    model = FeatureExtractor(source=source, arch=arch, store_dir=str(store), pretrained=str(checkpoint))
    data = FeatureSourceDataModule(source=source, arch=arch, batch_size=batch_size, num_workers=num_workers)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[],
    )
    trainer.predict(model, datamodule=data, return_predictions=False)
    return model.summary_metrics["features/images_per_s"]


def bench_feature_extraction(data_dir: Path, device: str, batch_size: int = 512, repeats: int = 2) -> dict:
    source = SynthVQASource(
        cache_dir=str(Path(data_dir) / "synthvqa"),
        generator=SynthVQAConfig(),
        answer_prompt=None,
        meta_val=MetaValSplit(fraction=0.0, seed=0),
    )  # timing only: the split is irrelevant
    source.prepare()
    bundle = create_clip(ARCH)
    model = bundle.model.eval().to(device)
    dataset = source.image_dataset(source.image_names(), bundle.image_size, bundle.mean, bundle.std)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    batches = [images for images, _ in loader]
    bare, pipeline = [], []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "clip.pt"
        torch.save(bundle.model.state_dict(), checkpoint)
        for i in range(repeats):
            bare.append(bare_images_per_s(model, batches, device))
            pipeline.append(
                pipeline_images_per_s(source, ARCH, checkpoint, Path(tmp) / f"store{i}", batch_size, device)
            )
    return {
        "benchmark": "feature extraction, synthvqa images (12000 x 48px), metadiff-tiny-vit",
        "batch_size": batch_size,
        "images": len(dataset),
        "bare_forward_images_per_s": max(bare),
        "pipeline_images_per_s": max(pipeline),
        "pipeline_over_bare": max(pipeline) / max(bare),
        "all_runs": {"bare": bare, "pipeline": pipeline},
    }
