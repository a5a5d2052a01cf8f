"""Sections 2 and 3: the features stage's model, ViT-L-14-336 (features_vqa's `model.arch`), bare on preloaded
tensors, then the whole `features_vqa` stage (JPEG decoding and resizing in DataLoader workers, Lightning's predict
loop, the feature store's writes) at several worker counts, against that bare throughput.

Both run in the trainer's precision (bf16 autocast under trainer=gpu, fp32 on the CPU) at the stage's batch size, so
their ratio is what decoding and the store cost on top of the model (issue 31's target: >= 0.85 on a GPU)."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from functools import partial
from typing import Any

import hydra
import lightning.pytorch as pl
import torch

from metadiff.bench.gpu_check.config import or_config
from metadiff.bench.gpu_check.context import Context
from metadiff.bench.gpu_check.runner import (
    PartialFailure,
    n_params,
    one_line,
    peak_memory,
    synchronize,
    timed,
)
from metadiff.pipeline import instantiate_with_upstream

TARGET_RATIO = 0.85  # issue 31: decoding must not be the bottleneck


def autocast(device: str, precision: str):
    """What Lightning's `precision` does around a step: bf16 autocast for `bf16-mixed`, nothing for `32-true`."""
    if str(precision).startswith("bf16"):
        return torch.autocast(device, dtype=torch.bfloat16)
    return nullcontext()


def section_clip(ctx: Context) -> dict[str, Any]:
    from metadiff.features.clip_models import create_clip

    cfg = ctx.features_config()
    size = ctx.settings.sizes
    batch = or_config(size.features.batch_size, cfg.data.batch_size)
    precision = str(cfg.trainer.precision)
    with peak_memory(ctx.device) as memory:
        start = time.perf_counter()
        bundle = create_clip(cfg.model.arch)  # random weights: nothing downloaded
        build_seconds = time.perf_counter() - start
        ctx.clip_weights(bundle.model)  # the file features_vqa reads (sections 3 and 5)
        model: Any = bundle.model.eval().to(ctx.device)  # an open_clip CLIP (untyped): encode_image, encode_text
        # preloaded on the device: the model alone, no host-to-device copy (the pipeline's share of the cost)
        images = torch.randn(size.clip.images, 3, bundle.image_size, bundle.image_size, device=ctx.device)
        batches = list(images.split(batch))
        texts = bundle.tokenizer([f"a photo of thing {i}" for i in range(size.clip.texts)]).to(ctx.device)
        text_batches = list(texts.split(int(cfg.data.text_batch_size)))
        with torch.no_grad(), autocast(ctx.device, precision):
            for b in batches[: size.clip.warmup_batches]:
                model.encode_image(b)
            image_seconds, _ = timed(lambda: [model.encode_image(b) for b in batches], ctx.device)
            text_seconds, _ = timed(lambda: [model.encode_text(t) for t in text_batches], ctx.device)
    return {
        "arch": cfg.model.arch,
        "precision": precision,
        "batch_size": batch,
        "image_size": int(images.shape[-1]),
        "image_tower_params": _visual_params(cfg.model.arch),
        "build_seconds": build_seconds,
        "images": int(images.shape[0]),
        "images_per_s": images.shape[0] / image_seconds,
        "texts": int(texts.shape[0]),
        "texts_per_s": texts.shape[0] / text_seconds,
        **memory,
    }


def _visual_params(arch: str) -> int:
    """Parameters of the image tower, counted on the meta device (no memory)."""
    import open_clip

    with torch.device("meta"):
        model = open_clip.create_model(arch, pretrained=None, device="meta")
    return n_params(model.visual)


class ImageClock(pl.Callback):
    """Images and seconds of the image table's predict batches, from the start of the first to the end of the last
    (the stage's own `features/images_per_s` window): decoding that keeps up with the model is hidden in it."""

    def __init__(self, device: str):
        self.device, self.images = device, 0
        self.start: float | None = None
        self.end: float | None = None

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx == 0 and self.start is None:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx == 0:
            synchronize(self.device)
            self.end = time.perf_counter()
            self.images += int(batch[0].shape[0])

    @property
    def images_per_s(self) -> float:
        assert self.start is not None and self.end is not None, "no predict batch ran"
        return self.images / (self.end - self.start)


def section_features(ctx: Context, bare: dict[str, Any] | None) -> dict[str, Any]:
    """The features_vqa stage (its DataModule, module and trainer config) at each worker count; the store it writes
    last is the one the chain of section 5 reuses."""
    size = ctx.settings.sizes
    cfg = ctx.features_config()
    batch = or_config(size.features.batch_size, cfg.data.batch_size)
    ctx.clip_weights()
    runs: dict[str, Any] = {}
    errors: list[str] = []
    with peak_memory(ctx.device) as memory:
        start = time.perf_counter()
        module = instantiate_with_upstream(cfg.model, {})  # reads the weights file, as the stage does
        build_seconds = time.perf_counter() - start
        for workers in size.features.worker_counts:
            data = instantiate_with_upstream(
                ctx.features_config(f"data.num_workers={workers}", f"data.batch_size={batch}").data, {}
            )
            clock = ImageClock(ctx.device)
            trainer = hydra.utils.instantiate(
                cfg.trainer, callbacks=[clock], logger=False, enable_progress_bar=False, enable_model_summary=False
            )
            try:
                wall, _ = timed(partial(trainer.predict, module, datamodule=data, return_predictions=False), ctx.device)
            except Exception as error:  # noqa: BLE001 - e.g. workers killed by a small /dev/shm: the others still run
                errors.append(f"{workers} workers: {one_line(error)}")
                runs[str(workers)] = {"error": one_line(error)}
                continue
            rate = clock.images_per_s
            runs[str(workers)] = {
                "images_per_s": rate,
                "predict_seconds": wall,
                "images": clock.images,
                "over_bare": rate / bare["images_per_s"] if bare else None,
            }
    ok = {int(w): r for w, r in runs.items() if "images_per_s" in r}
    configured = int(cfg.data.num_workers)
    best = max(ok, key=lambda w: ok[w]["images_per_s"]) if ok else None
    results = {
        "arch": cfg.model.arch,
        "batch_size": batch,
        "precision": str(cfg.trainer.precision),
        "images": len(module.source.image_names()),
        "build_seconds": build_seconds,
        "workers": runs,
        "configured_workers": configured,
        "best_workers": best,
        "store_dir": str(module.store_dir),
        **memory,
    }
    if best is not None:
        results["images_per_s"] = ok[best]["images_per_s"]
        results["over_bare"] = ok[best]["over_bare"]
        if ctx.device == "cuda" and results["over_bare"] is not None:
            results["meets_target"] = results["over_bare"] >= TARGET_RATIO
        results["batches_per_run"] = math.ceil(ok[best]["images"] / batch)
    if errors:
        raise PartialFailure("; ".join(errors), results)
    return results
