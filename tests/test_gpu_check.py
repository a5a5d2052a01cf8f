"""`make gpu-check`: its section runner (a failing section is reported in one line, the others still run, the JSON is
on disk after every section), its checkpoint arithmetic, its 2-rank round (the NCCL section's code path, on gloo),
and the whole `--quick` check: every section ok at real size (NCCL skipped on one device), the real models' sizes,
positive throughputs, and a projection of every stage of both real chains."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from metadiff.bench.gpu_check.config import load_settings
from metadiff.bench.gpu_check.projection import checkpoint_plan
from metadiff.bench.gpu_check.runner import PartialFailure, Section, Skipped, run_sections

REPO = Path(__file__).resolve().parents[1]
CHAIN_A = ["features_vqa", "hnet_vqa", "multitask_vqa", "adaptation_vqa", "hyperldm_vqa"]
CHAIN_B = [
    "diffusion_unet_miniimagenet",
    "diffusion_zoo_miniimagenet",
    "dfml_miniimagenet",
    "diffusionmix_miniimagenet",
]


def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    seen_on_disk = {}

    def second(results):
        raise ValueError("the device fell over\nsecond line of the message")

    def fourth(results):
        seen_on_disk.update(json.loads(path.read_text())["sections"])  # what a run killed here would have left
        raise PartialFailure("2 workers: bus error", {"images_per_s": 3.0})

    sections = [
        Section("first", lambda r: {"images_per_s": 1.0}),
        Section("second", second),
        Section("third", lambda r: (_ for _ in ()).throw(Skipped("1 device"))),
        Section("fourth", fourth),
        Section("fifth", lambda r: {"seen": list(r)}),
    ]
    report = run_sections(sections, {"mode": "test"}, path)
    on_disk = json.loads(path.read_text())["sections"]
    assert on_disk == json.loads(json.dumps(report["sections"]))
    assert [on_disk[n]["status"] for n in ("first", "second", "third", "fourth", "fifth")] == [
        "ok",
        "failed",
        "skipped",
        "failed",
        "ok",
    ]
    assert on_disk["second"]["error"].startswith("ValueError: the device fell over [test_gpu_check.py:")
    assert "\n" not in on_disk["second"]["error"]
    assert on_disk["third"]["reason"] == "1 device"
    assert on_disk["fourth"] == {
        "status": "failed",
        "error": "2 workers: bus error",
        "images_per_s": 3.0,
        "seconds": on_disk["fourth"]["seconds"],
    }
    assert sorted(seen_on_disk) == ["first", "second", "third"]  # written after each section, before the next
    assert on_disk["fifth"]["seen"] == ["first", "second", "third", "fourth"]
    assert all(entry["seconds"] >= 0 for entry in on_disk.values())


def test_checkpoint_plan_counts_the_writes_of_each_callback_kind() -> None:
    spaced = OmegaConf.create(
        {
            "model_checkpoint": {
                "_target_": "metadiff.checkpointing.SpacedCheckpoint",
                "min_interval_s": 600,
                "max_io_fraction": 0.02,
            }
        }
    )
    # 10 h of training: one write per 600 s, unless a write takes longer than 2% of 600 s (12 s): then per 50 x it
    assert checkpoint_plan(spaced, epochs=1000, validations=40, train_seconds=36000, save_seconds=2.0) == (60, 1)
    assert checkpoint_plan(spaced, epochs=1000, validations=40, train_seconds=36000, save_seconds=20.0) == (36, 1)
    assert checkpoint_plan(spaced, epochs=10, validations=0, train_seconds=36000, save_seconds=2.0) == (10, 1)
    every_epoch = OmegaConf.create(
        {
            "model_checkpoint": {
                "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                "save_last": True,
                "save_top_k": 1,
                "save_on_train_epoch_end": True,
            },
            "progress": {"_target_": "metadiff.progress.ProgressLines"},
        }
    )
    assert checkpoint_plan(every_epoch, epochs=549, validations=27, train_seconds=1.0, save_seconds=None) == (1098, 2)
    best = OmegaConf.create(
        {
            "best": {
                "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                "monitor": "val/a",
                "save_top_k": 1,
                "save_last": False,
            }
        }
    )
    assert checkpoint_plan(best, epochs=90, validations=9, train_seconds=1.0, save_seconds=None) == (9, 1)
    assert checkpoint_plan(None, epochs=90, validations=9, train_seconds=1.0, save_seconds=None) == (0, 0)


@pytest.mark.parametrize("quick", [False, True])
def test_the_sizes_come_from_the_experiments_where_the_check_leaves_them_null(quick: bool, tmp_path: Path) -> None:
    """The full check (a GPU) runs each model at its experiment's own batch, tasks, steps and member count; the
    quick one at conf/gpu_check.yaml's tiny counts."""
    from metadiff.bench.gpu_check.config import compose_experiment
    from metadiff.bench.gpu_check.fewshot import hnet_plan
    from metadiff.bench.gpu_check.unet import unet_plan
    from metadiff.bench.gpu_check.zoo import guided_plan, mix_plan, zoo_configs

    settings = load_settings(quick=quick, device="cpu", work=tmp_path)
    cfgs = zoo_configs(settings)
    hnet = hnet_plan(settings, compose_experiment("hnet_vqa"))
    unet = unet_plan(settings, cfgs["unet"])
    guided, mix = guided_plan(settings, cfgs), mix_plan(settings, cfgs)
    if quick:
        assert hnet == {"tasks": 2, "inner_steps": 1}
        assert unet == {"batch_size": 2, "holdout_per_class": 1, "steps": 1}
        assert guided == {"members": 1, "batch_size": 2, "steps": 2}
        assert mix == {"batch_size": 2, "t": 200, "denoise_steps": 2, "unet_passes": 2}
    else:  # hnet_vqa: 32 tasks x 10 inner steps; the ADM at batch 24; dfml's DDIM-25 batches of 100 over 13 members
        assert hnet == {"tasks": 32, "inner_steps": 10}
        assert unet == {"batch_size": 24, "holdout_per_class": 50, "steps": 13}
        assert guided == {"members": 13, "batch_size": 100, "steps": 25}
        assert mix == {"batch_size": 125, "t": 200, "denoise_steps": None, "unet_passes": 201}


@pytest.mark.slow  # ~35 s: three processes import torch and build the zoo
def test_the_two_rank_round_equals_the_one_rank_round(tmp_path: Path) -> None:
    """The NCCL section's code path on gloo ranks (CPU), with the UNet shrunk: 2 members, one chunk per rank."""
    from metadiff.bench.gpu_check.zoo import two_rank_round

    settings = load_settings(quick=True, device="cpu", work=tmp_path)
    sizes = dataclasses.replace(settings.sizes, nccl=dataclasses.replace(settings.sizes.nccl, members=2))
    settings = dataclasses.replace(settings, sizes=sizes)
    tiny = (
        "model.unet.block_out_channels=[32,32,32,32]",
        "model.unet.norm_num_groups=8",
        "model.unet.layers_per_block=1",
    )
    out = two_rank_round(settings, (f"paths.root_dir={tmp_path}",), backend="gloo", unet_overrides=tiny)
    assert out["equal_to_one_rank"] is True
    assert out["images"] == 2 * 4 * settings.sizes.nccl.per_class  # 2 members x 4 classes x per_class
    assert out["images_per_rank"] == [out["images"] // 2] * 2


@pytest.mark.slow
def test_quick_check_runs_every_section_at_real_size(tmp_path: Path) -> None:
    """`python -m metadiff.bench.gpu_check --quick` on this CPU: every section ok (NCCL: skipped, one device), the
    real models' sizes, positive throughputs, and a projection of every stage of both real chains."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    # one torch thread, as every process of the xdist workers (conftest.py): under `make test-slow` the other worker
    # computes too, and two threads spin-waiting on each other for one free core ran this check 2x slower
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "metadiff.bench.gpu_check",
            "--quick",
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path),
            "--device",
            "cpu",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert proc.returncode == 0, (_statuses(report), proc.stderr[-4000:])
    tables = (tmp_path / "out" / "gpu_check.md").read_text()
    assert tables in proc.stdout and "Projection on this CPU" in tables
    assert_quick_report(report)


def _statuses(report: dict) -> dict:
    return {
        name: (entry["status"], entry.get("error") or entry.get("reason")) for name, entry in report["sections"].items()
    }


def assert_quick_report(report: dict) -> None:
    """What a `--quick` report on a CPU must hold (also usable on a report written by hand: `make gpu-check-quick`)."""
    sections = report["sections"]
    statuses = _statuses(report)
    assert list(sections) == [
        "environment",
        "clip_throughput",
        "features_pipeline",
        "hnet_step",
        "vqa_chain",
        "adm_step",
        "guided_ddim",
        "diffusionmix_step",
        "nccl_round",
    ]
    assert all(status == "ok" for name, (status, _) in statuses.items() if name != "nccl_round"), statuses
    assert statuses["nccl_round"] == ("skipped", "1 device (0 CUDA device(s); the NCCL round needs >= 2)")
    assert report["mode"] == "quick" and report["device"] == "cpu"
    # the real sizes
    assert sections["clip_throughput"]["arch"] == "ViT-L-14-336"
    assert sections["clip_throughput"]["image_size"] == 336
    assert 300e6 < sections["clip_throughput"]["image_tower_params"] < 310e6  # ViT-L/14's image tower: ~304 M
    hnet = sections["hnet_step"]
    assert hnet["embed_dim"] == 768 and hnet["adapter_weights"] == 394_240  # 2 x 768 x 256 + 256 + 768
    assert 50e6 < hnet["learner_params"] < 52e6  # 128 -> 394,240 weights: ~51 M
    assert 120e6 < sections["adm_step"]["params"] < 122e6  # the spec's ADM: ~121 M
    assert sections["adm_step"]["checkpoint"]["bytes"] > 3.5 * sections["adm_step"]["checkpoint"]["weights_bytes"]
    assert sections["guided_ddim"]["member_params"] == sections["adm_step"]["params"]
    # positive throughputs and the bf16 comparison
    for name in ("clip_throughput", "features_pipeline", "hnet_step", "adm_step", "guided_ddim", "diffusionmix_step"):
        assert sections[name]["images_per_s" if name != "hnet_step" else "tasks_per_s"] > 0, name
    assert set(sections["features_pipeline"]["workers"]) == {"2"}
    assert all(run["over_bare"] > 0 for run in sections["features_pipeline"]["workers"].values())
    assert sections["adm_step"]["32-true"]["seconds_per_step"] > 0 and sections["adm_step"]["bf16-mixed"]["loss"] > 0
    accuracy = hnet["bf16_vs_fp32"]
    assert 0 <= accuracy["meta_loss_abs_diff"] < 1 and 0 <= accuracy["logits_max_abs_diff"] < accuracy["logits_max_abs"]
    chain = sections["vqa_chain"]["stages"]
    assert set(chain) == set(CHAIN_A) and all(chain[s]["built"] for s in CHAIN_A)
    assert all(chain[s]["timing"]["steps"] >= 1 for s in ("hnet_vqa", "multitask_vqa", "hyperldm_vqa"))
    # the projection: every stage of both chains, each with a time
    projection = report["projection"]
    assert [row["stage"] for row in projection["chain_a"]] == CHAIN_A
    assert [row["stage"] for row in projection["chain_b"]] == CHAIN_B
    for row in projection["chain_a"] + projection["chain_b"]:
        assert row["seconds"] is not None and row["seconds"] > 0, row
        assert row["disk_bytes"] is not None and row["memory_mib"], row
    assert projection["chain_b"][0]["runs"] == 13
    assert projection["totals"]["chain_a_one_device_s"] > 0 and projection["totals"]["chain_b_eight_devices_s"] > 0
