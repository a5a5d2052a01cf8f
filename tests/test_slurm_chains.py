"""The SLURM launcher configs of the real chains (one job per zoo member, then one job per later stage), checked as
far as a machine without a cluster can: the configs compose to submitit's SLURM launcher with requeue, and a
multirun over the zoo's fan-out key under submitit's LOCAL executor (the same launcher code, jobs as local
processes) builds the members that the zoo stage then finds instead of building them."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import compose_config, run_train, smoke_budget, written_artifacts

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


@pytest.mark.parametrize(("launcher", "limit_min"), [("slurm_zoo_member", 180), ("slurm_chain", 360)])
def test_real_chain_launchers_are_one_gpu_slurm_jobs_that_requeue(
    launcher: str, limit_min: int, tmp_path: Path
) -> None:
    cfg = compose_config([f"hydra/launcher={launcher}", "trainer=gpu"], tmp_path, tmp_path / "out")
    conf = cfg.hydra.launcher
    assert conf._target_ == SLURM_LAUNCHER
    assert conf.timeout_min == limit_min and conf.signal_delay_s < 60 * conf.timeout_min
    assert conf.max_num_timeout >= 1 and conf.additional_parameters.requeue is True
    assert conf.nodes == conf.tasks_per_node == conf.gpus_per_node == 1


def test_the_member_sweep_key_is_the_zoo_fan_out_key(tmp_path: Path) -> None:
    """slurm_zoo_member.yaml's command sweeps data.class_subset.member over range(13): the key and count of the
    miniimagenet zoo's fan-out, so the 13 jobs build the zoo's upstreams unet0..unet12."""
    cfg = compose_config(["experiment=diffusion_zoo_miniimagenet"], tmp_path, tmp_path / "out")
    assert cfg.upstream.unet.fan_out.key == "data.class_subset.member" and cfg.zoo.n_models == 13
    doc = (Path(__file__).parents[1] / "conf" / "hydra" / "launcher" / "slurm_zoo_member.yaml").read_text()
    assert "experiment=diffusion_unet_miniimagenet" in doc and "'data.class_subset.member=range(13)'" in doc


@pytest.mark.slow
def test_members_swept_as_submitit_jobs_are_reused_by_the_zoo(tmp_path: Path) -> None:
    """A 2-member glyph zoo at smoke budgets: the members as a multirun over the fan-out key on submitit's local
    executor (each job its own process, as on SLURM; ckpt_path=last as the SLURM command has it), then the zoo stage:
    it uses both members' artifacts and builds no diffusion_unet artifact (only its judge)."""
    member = [*smoke_budget("diffusion_unet_glyphs"), "trainer.max_steps=1"]  # as the zoo's smoke budget builds it
    no_validation = "optimized_metric=null"  # a 1-step member validates never: no val/loss for the sweep to report
    sweep = tmp_path / "sweep"
    run_train(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=15",
            "experiment=diffusion_unet_glyphs",
            *member,
            "data.class_subset.member=0,1",
            "ckpt_path=last",
            no_validation,
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path / "root",
        timeout=600,
    )
    members = sorted((tmp_path / "root" / "outputs" / "artifacts" / "diffusion_unet").glob("*/manifest.json"))
    assert len(members) == 2, members
    assert all((sweep / job / "resolved_config.yaml").is_file() for job in "01")
    proc = run_train(
        [
            "experiment=diffusion_zoo_glyphs",
            *smoke_budget("diffusion_zoo_glyphs", None, "fdr"),
            "trainer.enable_progress_bar=false",
        ],
        tmp_path / "root",
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    for k, manifest in enumerate(members):
        assert (
            f"upstream 'unet{k}': using {manifest.parent}" in log
            or f"upstream 'unet{1 - k}': using {manifest.parent}" in log
        ), log[-3000:]
    assert not [p for p in written_artifacts(log) if p.parent.name == "diffusion_unet"], "a member was rebuilt"
    assert len(list((tmp_path / "root" / "outputs" / "artifacts" / "diffusion_unet").iterdir())) == 2
