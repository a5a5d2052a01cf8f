"""Kill -9 and resume, one test per stage family not covered where the stage is tested (diffusion_unet: test_zoo,
adaptation: test_latent_stages, hyperldm: test_hyperldm): a deterministic run is SIGKILLed part way, then its own
command is rerun with `ckpt_path=last` in the same run dir; every final metric equals an uninterrupted run's."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import debug, dfml_smoke_overrides, run_metrics, run_train, with_debug

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
    args = ["experiment=clip_synthvqa", "data.n_train_pairs=128", "data.batch_size=32", "data.n_val_tasks=10",
            "trainer.max_epochs=2"]  # 4 batches an epoch: killed in epoch 1
    assert_resume_matches(args, cache_root, tmp_path, 6, ["train/loss", "val/zeroshot_acc", "test/zeroshot_acc"])


def test_fewshot_pretraining_resumes_to_the_same_metrics(cache_root: Path, tmp_path: Path) -> None:
    # no validation and one test batch (128 meta-test tasks): evaluation is most of this run's time, and the test
    # metrics of the final weights are what a resumed run must reproduce
    args = ["experiment=hnet_synthvqa", debug("short_chain"), "trainer.max_epochs=2",
            "+trainer.limit_train_batches=4", "trainer.check_val_every_n_epoch=3", "+trainer.limit_test_batches=1",
            "model.n_shot_max=0"]
    assert_resume_matches(args, cache_root, tmp_path, 6, ["train/query_loss", "test/fewshot_acc", "test/zeroshot_acc"])


def test_dfml_resumes_mid_round_to_the_same_metrics(cache_root: Path, image_tree: Path, tmp_path: Path) -> None:
    """Killed in epoch 1 (round 1): the resumed run reloads round 1's pseudo data or regenerates it identically,
    and keeps the round-0 selection state, so selection and test match."""
    args = ["experiment=dfml_miniimagenet", *dfml_smoke_overrides("dfml_miniimagenet", image_tree),
            "trainer.max_epochs=2", "data.train.steps_per_epoch=2", "data.episodes.n_episodes=4"]  # exact equality: 4 do
    assert_resume_matches(args, cache_root, tmp_path, 3, ["test/trained_1shot", "test/trained_5shot",
                                                          "val/selected_epoch", "val/accuracy"])
