"""Sweeps: Hydra multirun with DDP, the joblib and SLURM launcher configs, and the Optuna searches of the HyperLDM
and DFML guidance scales (the run returns the metric the sweeper optimises)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import TWO_RANKS, compose_config, run_train, short_chain, smoke_budget, task_metrics

SHORT_CLIP = [
    "experiment=clip_synthvqa",
    "data.n_train_pairs=128",
    "data.batch_size=32",
    "data.n_val_tasks=10",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
]


@pytest.mark.slow
def test_multirun_with_ddp_runs_each_job_on_two_processes(cache_root: Path, tmp_path: Path) -> None:
    proc = run_train(
        [
            "-m",
            *SHORT_CLIP,
            "trainer=ddp_sim",
            "test=false",
            "optimized_metric=val/zeroshot_acc",
            "seed=1,2",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cache_root,
    )
    out = proc.stdout + proc.stderr
    assert out.count(TWO_RANKS) == 2, "each of the 2 jobs should start 2 processes"
    jobs = task_metrics(proc, "clip_synthvqa")
    assert len(jobs) == 2 and jobs[0]["train/loss"] != jobs[1]["train/loss"]


def test_joblib_launcher_runs_the_jobs_in_worker_processes(cache_root: Path, tmp_path: Path) -> None:
    proc = run_train(
        ["-m", *SHORT_CLIP, "hydra/launcher=local_parallel", "seed=1,2", f"hydra.sweep.dir={tmp_path}"], cache_root
    )
    assert "Joblib.Parallel(n_jobs=2,backend=loky,prefer=processes" in proc.stdout + proc.stderr
    for job in ("0", "1"):
        assert (tmp_path / job / "resolved_config.yaml").is_file()
        assert list((tmp_path / job / "csv").rglob("metrics.csv")), f"job {job} logged no metrics"


def test_slurm_launcher_config_targets_submitit_with_requeue(tmp_path: Path) -> None:
    cfg = compose_config(["hydra/launcher=slurm", "trainer=ddp"], tmp_path, tmp_path / "out")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.max_num_timeout == 3 and launcher.tasks_per_node == launcher.gpus_per_node


@pytest.mark.slow
def test_optuna_search_of_the_dfml_guidance_scale_returns_val_accuracy(
    cache_root: Path, image_tree: Path, tmp_path: Path
) -> None:
    proc = run_train(
        [
            "experiment=dfml_miniimagenet",
            *smoke_budget("dfml_miniimagenet", image_tree),
            "hparams_search=dfml_guidance",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            "trainer.max_epochs=1",
            "data.train.steps_per_epoch=2",
            "data.episodes.n_episodes=20",
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cache_root,
        timeout=1200,
    )
    trials = task_metrics(proc, "dfml_miniimagenet")
    assert len(trials) == 2
    result = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert result.best_value == pytest.approx(max(t["val/accuracy"] for t in trials), rel=1e-6)
    assert 0.1 <= result.best_params["model.generation.scale"] <= 20.0
    scales = [float(OmegaConf.load(tmp_path / job / "resolved_config.yaml").model.generation.scale) for job in "01"]
    assert scales[0] != scales[1], "the two trials tried the same scale"


@pytest.mark.slow
def test_optuna_search_of_the_hyperldm_guidance_scale_optimises_that_scale(cache_root: Path, tmp_path: Path) -> None:
    proc = run_train(
        [
            "experiment=hyperldm_synthvqa",
            *short_chain("synthvqa"),
            "hparams_search=hyperldm_guidance",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            "trainer.max_epochs=2",
            "trainer.check_val_every_n_epoch=2",
            "model.sampling.steps=5",
            "data.max_val_tasks=16",
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cache_root,
        timeout=1200,
    )
    trials = task_metrics(proc, "hyperldm_synthvqa")
    assert len(trials) == 2
    values = []
    for job, metrics in zip("01", trials, strict=True):
        scale = float(OmegaConf.load(tmp_path / job / "resolved_config.yaml").model.guidance_scales)
        assert 0.0 <= scale <= 15.0
        values.append(metrics[f"val/cfg{scale:g}"])  # the metric of the scale this trial tried
    result = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert result.best_value == pytest.approx(max(values), rel=1e-6)
