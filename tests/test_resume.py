"""Kill -9 and resume, one test per stage family not covered where the stage is tested (diffusion_unet: test_zoo,
adaptation: test_latent_stages, hyperldm: test_hyperldm): a deterministic run is SIGKILLed part way, then its own
command is rerun with `ckpt_path=last` in the same run dir; every final metric equals an uninterrupted run's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import (
    _quoted,
    debug,
    run_metrics,
    run_train,
    smoke_budget,
    with_debug,
    written_artifact,
)

pytestmark = pytest.mark.slow


def assert_resume_matches(args: list[str], root: Path, tmp: Path, kill_after: int, keys: list[str]) -> None:
    """Straight run vs killed-then-resumed run (own task names, so each publishes its own artifact)."""
    common = [*args, "deterministic=true", "trainer.enable_progress_bar=false"]
    straight = run_metrics(run_train([*common, f"paths.output_dir={tmp / 'straight'}", "task_name=straight"], root))
    run_dir = tmp / "interrupted"
    again = [*common, f"paths.output_dir={run_dir}", "task_name=interrupted"]
    killed = run_train([*with_debug(again, "kill"), f"callbacks.kill.after={kill_after}"], root, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file(), "the killed run left no checkpoint to resume from"
    resumed_proc = run_train([*again, "ckpt_path=last"], root)
    assert "Restoring states from the checkpoint path" in resumed_proc.stdout + resumed_proc.stderr
    resumed = run_metrics(resumed_proc)  # full precision: a resumed run is the same computation
    for key in keys:
        assert resumed[key] == straight[key], f"{key}: resumed {resumed[key]} vs uninterrupted {straight[key]}"


def test_clip_resumes_to_the_same_metrics(cache_root: Path, tmp_path: Path) -> None:
    args = [
        "experiment=clip_synthvqa",
        "data.n_train_pairs=128",
        "data.batch_size=32",
        "data.n_val_tasks=10",
        "trainer.max_epochs=2",
    ]  # 4 batches an epoch: killed in epoch 1
    assert_resume_matches(args, cache_root, tmp_path, 6, ["train/loss", "val/zeroshot_acc", "test/zeroshot_acc"])


def test_fewshot_pretraining_resumes_to_the_same_metrics(cache_root: Path, tmp_path: Path) -> None:
    # no validation and one test batch (128 meta-test tasks): evaluation is most of this run's time, and the test
    # metrics of the final weights are what a resumed run must reproduce
    args = [
        "experiment=hnet_synthvqa",
        debug("short_chain"),
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=4",
        "trainer.check_val_every_n_epoch=3",
        "+trainer.limit_test_batches=1",
        "model.n_shot_max=0",
    ]
    assert_resume_matches(args, cache_root, tmp_path, 6, ["train/query_loss", "test/fewshot_acc", "test/zeroshot_acc"])


def test_dfml_resumes_mid_round_to_the_same_metrics(cache_root: Path, image_tree: Path, tmp_path: Path) -> None:
    """Killed in epoch 1 (round 1): the resumed run reloads round 1's pseudo data or regenerates it identically,
    and keeps the round-0 selection state, so selection and test match."""
    args = [
        "experiment=dfml_miniimagenet",
        *smoke_budget("dfml_miniimagenet", image_tree),
        "trainer.max_epochs=2",
        "data.train.steps_per_epoch=2",
        "data.episodes.n_episodes=4",
    ]  # exact equality: 4 do
    assert_resume_matches(
        args,
        cache_root,
        tmp_path,
        3,
        ["test/trained_1shot", "test/trained_5shot", "val/selected_epoch", "val/accuracy"],
    )


def test_resumed_run_resumes_the_upstream_it_was_building(cache_root: Path, tmp_path: Path) -> None:
    """A job killed while it builds a missing upstream (a requeue, or a crash rerun with `ckpt_path=last` in its run
    dir) resumes that upstream from its `last.ckpt`, not from step 0: `features_synthvqa` builds its CLIP, the drill
    (`debug=kill`, which the CLIP inherits with the `debug` group) kills the CLIP in its second epoch, and the rerun
    restores the CLIP's checkpoint and publishes the weights of an uninterrupted build. Before (the upstream got no
    `ckpt_path` and a run folder not keyed by its identity), the rerun trained the CLIP again from step 0."""
    budget = [
        "data.n_train_pairs=128",
        "data.batch_size=32",
        "data.n_val_tasks=10",
        "trainer.max_epochs=2",
        "trainer.max_steps=-1",
    ]  # 4 batches an epoch: killed in epoch 1
    clip = f"+upstream_overrides.clip_synthvqa={_quoted(budget)}"
    common = [
        "experiment=features_synthvqa",
        "synthvqa_clip=trained",
        clip,
        "deterministic=true",
        "trainer.enable_progress_bar=false",
    ]

    def run(name: str, *extra: str, check: bool = True):
        return run_train(
            [
                *common,
                f"paths.artifacts_dir={tmp_path / name / 'artifacts'}",
                f"paths.output_dir={tmp_path / name / 'run'}",
                f"task_name={name}",
                *extra,
            ],
            cache_root,
            check=check,
        )

    first = run("straight")
    straight = written_artifact(first.stdout + first.stderr, "clip")
    killed = run("interrupted", "debug=kill", "callbacks.kill.after=6", "ckpt_path=last", check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpts = list((tmp_path / "interrupted" / "run" / "upstream" / "clip").rglob("last.ckpt"))
    assert len(ckpts) == 1, f"the killed CLIP build left {len(ckpts)} checkpoints in its run folder"
    resumed = run("interrupted", "ckpt_path=last")
    log = resumed.stdout + resumed.stderr
    assert f"Restoring states from the checkpoint path at {ckpts[0]}" in log, log[-3000:]
    rebuilt = written_artifact(log, "clip")
    assert rebuilt.name == straight.name  # the same identity: the drill's callbacks and ckpt_path are not in it
    files = sorted(p.name for p in straight.glob("*.pt"))
    assert files, f"no weights in {straight}"
    for weights in files:
        a, b = torch.load(straight / weights, weights_only=True), torch.load(rebuilt / weights, weights_only=True)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{weights}:{key}: the resumed CLIP differs from an uninterrupted one"
