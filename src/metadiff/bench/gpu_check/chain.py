"""Section 5: chain A at real size and token budgets through the real run loop: `hyperldm_vqa` found or built by
the pipeline (`find_or_build` with `metadiff.run.train`, as `make bench` builds its chain), which builds its upstreams
features_vqa (the store section 3 wrote is reused when it matches), hnet_vqa, adaptation_vqa and multitask_vqa on
the generated VQA tree with the real ViT-L-14-336 features (e = 768) and the real-size HNET.

Each training stage gets a `StepTimer` callback (its step and validation times) through `upstream_overrides`; the
budgets are conf/gpu_check.yaml's `chain` overrides. Reported per stage: its wall time, step times, the size of its
artifact and of the checkpoints it wrote, and its peak memory (from its manifest)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict

from metadiff.bench.gpu_check.context import Context
from metadiff.bench.gpu_check.runner import peak_memory
from metadiff.pipeline import find_or_build, resolve_upstreams

TIMER = "metadiff.bench.gpu_check.timing.StepTimer"
TRAINED = ("hnet_vqa", "multitask_vqa", "hyperldm_vqa")  # the stages with training steps to time


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def timer_overrides(out_dir: Path, experiment: str) -> list[str]:
    return [
        f"+callbacks.step_timer._target_={TIMER}",
        f"+callbacks.step_timer.path={out_dir / 'step_times' / experiment}.json",
    ]


def section_chain(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    chain = s.sizes.chain
    out_dir = ctx.root / "outputs" / "chain"
    data = ctx.vqa_overrides()
    features = [f"data.batch_size={s.sizes.features.batch_size}"] if s.sizes.features.batch_size else []
    own = {
        "features_vqa": features,
        "hnet_vqa": list(chain.hnet_vqa),
        "multitask_vqa": list(chain.multitask_vqa),
        "adaptation_vqa": list(chain.adaptation_vqa),
    }
    top = s.spec.experiments.hyperldm
    cfg = ctx.compose(
        top,
        *data,
        f"paths.output_dir={out_dir}",
        *chain.hyperldm_vqa,
        *timer_overrides(out_dir, top),
        hydra_config=True,
    )
    upstream_overrides = {
        name: [*data, *extra, *(timer_overrides(out_dir, name) if name in TRAINED else [])]
        for name, extra in own.items()
    }
    with open_dict(cfg):
        cfg.upstream_overrides = OmegaConf.create(upstream_overrides)
    ctx.clip_weights()  # the random ViT-L weights features_vqa reads (written by section 2 if it ran)
    seconds: dict[str, float] = {}

    def timed_train(stage_cfg) -> dict[str, float]:
        """The stage runner, timed per stage: the pipeline hands it every stage it builds (upstreams first)."""
        start = time.perf_counter()
        metrics = ctx.runner(stage_cfg)
        seconds[str(stage_cfg.task_name)] = time.perf_counter() - start
        return metrics

    with peak_memory(ctx.device) as memory:
        top_artifact = find_or_build(cfg, timed_train)
        artifacts = {**resolve_upstreams(cfg), "hyperldm": top_artifact}
    stages: dict[str, Any] = {}
    for name, artifact in artifacts.items():
        manifest = artifact.manifest
        metrics = manifest.get("metrics", {})
        task = manifest.get("task_name", name)
        checkpoints = _checkpoints(out_dir, name, top_artifact is artifact)
        timer = out_dir / "step_times" / f"{task}.json"
        stages[task] = {
            "stage": manifest.get("stage"),
            "artifact_bytes": dir_bytes(artifact.path),
            "run_seconds": seconds.get(task),
            "built": task in seconds,
            "peak_rss_mib": metrics.get("sys/peak_rss_mib"),
            "peak_cuda_mib": metrics.get("sys/peak_cuda_mib"),
            "checkpoint_files": len(checkpoints),
            "checkpoint_bytes": max((p.stat().st_size for p in checkpoints), default=None),
            "timing": json.loads(timer.read_text()) if timer.is_file() else None,
        }
    return {
        "stages": stages,
        "budgets": {**{k: v for k, v in own.items() if v}, top: list(chain.hyperldm_vqa)},
        **memory,
    }


def _checkpoints(out_dir: Path, name: str, is_top: bool) -> list[Path]:
    """The checkpoint files a chain stage wrote into its run folder (an upstream's
    `<out>/upstream/<name>/<artifact folder>/checkpoints`, metadiff.pipeline; the top stage's `<out>/checkpoints`)."""
    pattern = "checkpoints/*.ckpt" if is_top else f"upstream/{name}/*/checkpoints/*.ckpt"
    return sorted(out_dir.glob(pattern))
