"""The bad-input catalogue: each kind of bad input a user can give, through the real entry point, fails before any
work is lost with exit status 2 and ONE line on stderr that names the file, key or value and what was expected,
and leaves no half-written artifact behind. Plus the NaN/inf guard, which stops a diverging run naming stage and step.

| bad input                              | the error names                                   |
|----------------------------------------|---------------------------------------------------|
| wrong config type                      | the key, the value and the expected type          |
| unknown config key                     | the key and the closest valid one                 |
| missing data directory                 | the split and the path                            |
| corrupt image file                     | the image file                                    |
| missing / truncated / non-torch ckpt   | `ckpt_path` and what is wrong with the file       |
| upstream artifact of another stage     | `upstream.<name>.path`, its stage, the one needed |
| corrupt artifact manifest              | the manifest file                                 |
| ddp_sim without a device count         | `trainer.devices` and what the launcher needs     |
| a bad input met inside a spawned rank  | the same line as in one process (corrupt image)   |
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import run_train, smoke_budget

BadInput = Callable[[Path, Path], list[str]]  # (tmp dir, image tree) -> train.py arguments


def _wrong_type(tmp: Path, images: Path) -> list[str]:
    return ["experiment=clip_synthvqa", "trainer.max_epochs=ten"]


def _unknown_key(tmp: Path, images: Path) -> list[str]:
    return ["experiment=clip_synthvqa", "+model.lr_warmup=5"]


def _missing_data_dir(tmp: Path, images: Path) -> list[str]:
    return ["experiment=classifier_miniimagenet", f"paths.miniimagenet_dir={tmp / 'no_such_dir'}"]


def _corrupt_image(tmp: Path, images: Path) -> list[str]:
    tree = tmp / "images"
    shutil.copytree(images, tree)
    for file in (tree / "meta_train").rglob("*.png"):
        file.write_bytes(b"\x89PNG but not really")
    return ["experiment=classifier_miniimagenet", *smoke_budget("classifier_miniimagenet", tree, "fdr")]


def _missing_checkpoint(tmp: Path, images: Path) -> list[str]:
    return ["experiment=clip_synthvqa", f"ckpt_path={tmp / 'gone.ckpt'}"]


def _truncated_checkpoint(tmp: Path, images: Path) -> list[str]:
    path = tmp / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 3}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # as an interrupted copy leaves it
    return ["experiment=clip_synthvqa", f"ckpt_path={path}"]


def _not_a_checkpoint(tmp: Path, images: Path) -> list[str]:
    path = tmp / "notes.ckpt"
    shutil.make_archive(str(tmp / "notes"), "zip", root_dir=tmp, base_dir=".")
    (tmp / "notes.zip").rename(path)
    return ["experiment=clip_synthvqa", f"ckpt_path={path}"]


def _fake_artifact(tmp: Path, manifest: str) -> Path:
    path = tmp / "artifact"
    path.mkdir()
    (path / "manifest.json").write_text(manifest)
    return path


def _artifact_of_another_stage(tmp: Path, images: Path) -> list[str]:
    path = _fake_artifact(tmp, json.dumps({"stage": "diffusion_zoo", "fingerprint": "0" * 64, "lineage": {}}))
    return ["experiment=features_synthvqa", "synthvqa_clip=trained", f"+upstream.clip.path={path}"]


def _corrupt_manifest(tmp: Path, images: Path) -> list[str]:
    path = _fake_artifact(tmp, '{"stage": "cl')
    return ["experiment=features_synthvqa", "synthvqa_clip=trained", f"+upstream.clip.path={path}"]


def _ddp_sim_without_a_device_count(tmp: Path, images: Path) -> list[str]:
    return ["experiment=clip_synthvqa", "trainer=ddp_sim", "trainer.devices=auto"]


def _corrupt_image_in_a_spawned_rank(tmp: Path, images: Path) -> list[str]:
    return [*_corrupt_image(tmp, images), "trainer=ddp_sim"]  # read in the ranks' setup(), sent back as itself


CATALOGUE: dict[str, tuple[BadInput, str]] = {
    "wrong_config_type": (_wrong_type, r"config key 'trainer\.max_epochs' = 'ten' has the wrong type"),
    "unknown_config_key": (_unknown_key, r"unknown config key 'model\.lr_warmup'"),
    "missing_data_dir": (_missing_data_dir, r"split 'meta_train' not found: .*no_such_dir"),
    "corrupt_image": (_corrupt_image, r"unreadable image .*images/meta_train/n\d+/\d+\.png"),
    "missing_checkpoint": (_missing_checkpoint, r"ckpt_path=.*gone\.ckpt: no such checkpoint file"),
    "truncated_checkpoint": (_truncated_checkpoint, r"ckpt_path=.*last\.ckpt: not a readable checkpoint, truncated"),
    "not_a_checkpoint": (_not_a_checkpoint, r"ckpt_path=.*notes\.ckpt: a zip file but not a torch checkpoint"),
    "artifact_of_another_stage": (
        _artifact_of_another_stage,
        r"upstream\.clip\.path=.*artifact holds a 'diffusion_zoo' artifact, but upstream "
        r"'clip' \(clip_synthvqa\) must be a 'clip' artifact",
    ),
    "corrupt_artifact_manifest": (_corrupt_manifest, r"artifact manifest .*manifest\.json is not valid JSON"),
    "ddp_sim_without_a_device_count": (
        _ddp_sim_without_a_device_count,
        r"trainer\.devices: 'auto', but .*StageRanksDDPStrategy needs the number of "
        r"ranks to spawn",
    ),
    "corrupt_image_in_a_spawned_rank": (
        _corrupt_image_in_a_spawned_rank,
        r"unreadable image .*images/meta_train/n\d+/\d+\.png",
    ),
}


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_bad_input_fails_in_one_line_and_writes_nothing(case: str, tmp_path: Path, image_tree: Path) -> None:
    make_args, expected = CATALOGUE[case]
    root = tmp_path / "root"
    proc = run_train(make_args(tmp_path, image_tree), root, check=False, timeout=300)
    assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"{case}: expected one 'error:' line\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(expected, errors[0]), f"{case}: {errors[0]!r} does not match {expected!r}"
    artifacts = root / "outputs" / "artifacts"
    half_written = (
        [p for p in artifacts.rglob("*") if p.is_dir() and p.parent.parent == artifacts] if artifacts.exists() else []
    )
    assert not half_written, f"{case}: artifact dirs left behind: {half_written}"


def test_diverging_run_stops_naming_stage_and_step(tmp_path: Path) -> None:
    """A weight turned NaN after 3 batches: the next loss is NaN, and the guard stops the run before that step's
    update, in one line that names stage, task, epoch, step and batch (exit 2), with no artifact written."""
    proc = run_train(
        [
            "experiment=clip_synthvqa",
            "debug=diverge",
            "callbacks.poison.after=3",
            "data.n_train_pairs=256",
            "data.batch_size=32",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
        ],
        tmp_path,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error == (
        "error: stage 'clip' (clip_synthvqa): the training loss is nan at epoch 0, global step 3, "
        "batch 3; lower the learning rate or check the inputs"
    ), error
    assert not (tmp_path / "outputs" / "artifacts" / "clip").exists()


def test_diverging_manual_optimisation_stage_is_stopped_too(cache_root: Path, image_tree: Path) -> None:
    """dfml optimises by hand (two optimisers, `manual_backward`): the same guard sees its losses."""
    proc = run_train(
        [
            "experiment=dfml_miniimagenet",
            *smoke_budget("dfml_miniimagenet", image_tree, "diverge"),
            "callbacks.poison.after=1",
            "trainer.max_epochs=1",
            "data.train.steps_per_epoch=3",
            "trainer.enable_progress_bar=false",
        ],
        cache_root,
        check=False,
        timeout=900,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in proc.stderr
    assert error.startswith("error: stage 'dfml' (dfml_miniimagenet): the training loss is nan at epoch 0, "), error
