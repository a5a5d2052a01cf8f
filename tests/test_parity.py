"""Every stage family on 2 gloo processes (`trainer=ddp_sim`; `trainer=ddp_cpu` for the stages that refuse spawn)
and with `trainer.precision=bf16-mixed`, against the same run in 1 process, fp32. Batch sizes are per rank
(Lightning's convention), so the DDP run halves them to keep the global batch; fixed evaluation episodes/tasks are
shared out over the ranks exactly and gathered before the metric.

Exact equality is not expected (the ranks draw their own noise; bf16 rounds), so the check is that each variant
trains (finite loss), evaluates the same number of episodes/tasks, and lands within a tolerance of the 1-process
metric. The bitwise DDP checks are elsewhere: meta-gradients (test_fewshot), episode sharding (test_images)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import dfml_smoke_overrides, image_smoke_overrides, parse_summary, run_train, summaries

pytestmark = pytest.mark.slow

# family -> (overrides of the 1-process run, overrides that halve the per-rank batch, metric, tolerance)
FAMILIES: dict[str, tuple[list[str], list[str], str, float]] = {
    # validation metric, no test phase: under ddp_sim every phase spawns its processes again
    "clip": (["experiment=clip_synthvqa", "data.n_train_pairs=256", "data.batch_size=32", "data.n_val_tasks=10",
              "trainer.max_epochs=1", "test=false"], ["data.batch_size=16"], "val/zeroshot_acc", 0.05),
    # conv stages: few steps and 8 fixed episodes (the runs are compared on the same ones), because bf16
    # convolutions are ~30x slower than fp32 on AVX2-only CPUs
    "image": (["experiment=classifier_glyphs", "trainer.max_steps=4", "data.train.batch_size=32",
               "data.episodes.n_episodes=8"],
              ["data.train.batch_size=16"], "test/trained_5shot", 0.1),
    "dfml": (["experiment=dfml_glyphs", "trainer.max_epochs=1", "data.train.steps_per_epoch=2",
              "data.episodes.n_episodes=8"],
             ["model.episodes.per_batch=1"], "test/trained_5shot", 0.1),
}


# the DDP variant of each family: spawned ranks (ddp_sim) where the stage allows it; classifier and dfml keep state
# beyond their parameters (metadiff.run) and run one launched process per rank instead (ddp_cpu, like trainer=ddp)
DDP_TRAINER = {"clip": "ddp_sim", "image": "ddp_cpu", "dfml": "ddp_cpu"}


def _overrides(family: str, images: Path) -> list[str]:
    base = FAMILIES[family][0]
    if family == "dfml":
        return [*base, *dfml_smoke_overrides("dfml_glyphs", images)]
    if family == "image":
        return [*base, *image_smoke_overrides("classifier_glyphs", images), "test=true"]
    return base


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ddp_and_bf16_match_one_process(family: str, cache_root: Path, image_tree: Path) -> None:
    _, per_rank, metric, tolerance = FAMILIES[family]
    common = [*_overrides(family, image_tree), "trainer.enable_progress_bar=false"]
    runs = {"single": parse_summary(run_train([*common, f"task_name=parity_{family}_1"], cache_root).stdout)}
    ddp = run_train([*common, *per_rank, f"trainer={DDP_TRAINER[family]}", f"task_name=parity_{family}_ddp"],
                    cache_root)
    assert "MEMBER: 2/2" in ddp.stdout + ddp.stderr
    ranks = summaries(ddp.stdout, f"parity_{family}_ddp")  # every rank runs the whole command
    # every rank that reports agrees on the evaluation: the episodes/tasks were gathered before the metric
    assert ranks and len({r[metric] for r in ranks}) == 1, [r[metric] for r in ranks]
    runs["ddp"] = ranks[-1]
    if DDP_TRAINER[family] == "ddp_cpu":  # the spawn launcher would hand back only parameters: refused in one line
        spawned = run_train([*common, "trainer=ddp_sim", f"task_name=parity_{family}_spawn"], cache_root, check=False)
        assert spawned.returncode == 2 and "cannot run under a spawn strategy" in spawned.stderr, spawned.stderr[-2000:]
    runs["bf16"] = parse_summary(run_train([*common, "trainer.precision=bf16-mixed", f"task_name=parity_{family}_bf16"],
                                           cache_root).stdout)
    for name, metrics in runs.items():
        losses = [v for k, v in metrics.items() if k.startswith("train/") and "loss" in k]
        assert losses and all(math.isfinite(v) for v in losses), f"{family}/{name}: {metrics}"
    for name in ("ddp", "bf16"):
        gap = abs(runs[name][metric] - runs["single"][metric])
        assert gap <= tolerance, f"{family}: {name} {metric} {runs[name][metric]:.4f} vs 1 process " \
                                 f"{runs['single'][metric]:.4f}"
