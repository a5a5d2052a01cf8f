"""Section 6: the spec's ADM UNet (diffusion_unet_miniimagenet: ~121 M parameters, 64 x 64, learned sigma) trained
a few steps by Lightning on generated miniImageNet pickles, in fp32 and in bf16 (the stage's module, DataModule,
trainer config and callbacks, EMA included), then its checkpoint written as the stage's checkpoint callback writes
it (`Trainer.save_checkpoint`: weights, AdamW's two moments, the EMA copy, the callbacks' states): seconds and bytes.

The checkpoint callback itself is left out of the timed fit (its cadence is the projection's business): the save
is timed on its own, once, after the fit in the trainer's precision."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from metadiff.bench.gpu_check.config import Settings, or_config
from metadiff.bench.gpu_check.context import Context
from metadiff.bench.gpu_check.data import write_miniimagenet
from metadiff.bench.gpu_check.runner import n_params, peak_memory, synchronize
from metadiff.bench.gpu_check.timing import StepTimer
from metadiff.pipeline import instantiate_with_upstream

LEFT_OUT = ("model_checkpoint", "progress", "model_summary")  # timed separately / console only


def write_train_pickle(ctx: Context, cfg, batch: int, holdout: int) -> Path:
    """miniImageNet's meta-train split with every class (the zoo partition needs them) and enough images per class
    for the hold-out and one batch of the member's classes."""
    stats = ctx.settings.spec.datasets.miniimagenet
    per_class = holdout + math.ceil(batch / int(cfg.data.class_subset.classes_per_model)) + 1
    root = Path(cfg.data.source.root)
    name = str(cfg.data.source.pickle_files.meta_train[0])
    if not (root / name).is_file():
        write_miniimagenet(root, name, stats.train_classes, per_class)
    return root


def unet_plan(settings: Settings, unet: DictConfig) -> dict[str, int]:
    """Batch and hold-out of the timed fit: the check's, or diffusion_unet_miniimagenet's own where left null."""
    return {
        "batch_size": or_config(settings.sizes.unet.batch_size, unet.data.train.batch_size),
        "holdout_per_class": or_config(settings.sizes.unet.holdout_per_class, unet.data.train.holdout_per_class),
        "steps": settings.sizes.unet.warmup_steps + settings.sizes.unet.steps,
    }


def section_unet(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    plan = unet_plan(s, ctx.compose(s.spec.experiments.unet))
    batch, holdout, steps = plan["batch_size"], plan["holdout_per_class"], plan["steps"]
    cfg = ctx.compose(
        s.spec.experiments.unet,
        f"data.train.batch_size={batch}",
        f"data.train.holdout_per_class={holdout}",
        f"trainer.max_steps={steps}",
        "++trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
    )
    write_train_pickle(ctx, cfg, batch, holdout)
    trainer_precision = str(cfg.trainer.precision)
    out: dict[str, Any] = {
        "batch_size": batch,
        "image_size": int(cfg.model.image_size),
        "trainer_precision": trainer_precision,
        "timed_steps": s.sizes.unet.steps,
    }
    for precision in ("32-true", "bf16-mixed"):
        with peak_memory(ctx.device) as memory:
            torch.manual_seed(0)
            module = instantiate_with_upstream(cfg.model, {})
            out["params"] = n_params(module.denoiser)
            data = instantiate_with_upstream(cfg.data, {})
            timer = StepTimer(str(ctx.settings.work / f"unet_steps_{precision}.json"))
            callbacks = [
                hydra.utils.instantiate(node)
                for name, node in cfg.callbacks.items()
                if name not in LEFT_OUT and node is not None and "_target_" in node
            ]
            trainer = hydra.utils.instantiate(
                cfg.trainer,
                precision=precision,
                callbacks=[*callbacks, timer],
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
            )
            trainer.fit(module, datamodule=data)
            timed_steps = timer.steps[s.sizes.unet.warmup_steps :] or timer.steps
            seconds = statistics.median(timed_steps)
            entry: dict[str, Any] = {
                "seconds_per_step": seconds,
                "images_per_s": batch / seconds,
                "all_step_seconds": timer.steps,
                "loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
            }
            if precision == _saved_precision(trainer_precision):
                path = ctx.settings.work / "adm_member.ckpt"
                synchronize(ctx.device)
                start = time.perf_counter()
                trainer.save_checkpoint(path)
                save = time.perf_counter() - start
                size = path.stat().st_size
                out["checkpoint"] = {
                    "seconds": save,
                    "bytes": size,
                    "bytes_per_s": size / save,
                    "weights_bytes": sum(p.numel() * p.element_size() for p in module.denoiser.parameters()),
                    "entries": _entries(path),
                }
                path.unlink()
        out[precision] = {**entry, **memory}
        del module, trainer, data
    trained = out[_saved_precision(trainer_precision)]
    out["seconds_per_step"] = trained["seconds_per_step"]
    out["images_per_s"] = trained["images_per_s"]
    for key in ("peak_cuda_mib", "peak_rss_mib", "peak_child_rss_mib"):  # the section's: the larger of the two fits
        values = [out[p][key] for p in ("32-true", "bf16-mixed") if key in out[p]]
        if values:
            out[key] = max(values)
    return out


def _entries(path: Path) -> list[str] | None:
    """The top-level entries of a checkpoint (state_dict, optimizer_states, callbacks, ...), read lazily."""
    try:
        return sorted(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # noqa: BLE001 - only informative: a checkpoint that weights_only refuses still has a size
        return None


def _saved_precision(trainer_precision: str) -> str:
    return "bf16-mixed" if trainer_precision.startswith("bf16") else "32-true"
