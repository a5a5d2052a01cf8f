"""The diffusion zoo end to end on the embedded glyph set, with short members: members trained as a multirun are
reused by the zoo, the artifact holds the class map and the grids, a killed member resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_metrics, run_train, written_artifact
from metadiff.stages.diffusion_zoo import load_zoo
from metadiff.store import load_artifact

ZOO = ["zoo.n_models=2", "zoo.classes_per_model=3"]
MEMBER = [
    "trainer.max_steps=40",
    "callbacks.ema.update_starting_at_step=0",
    "model.grid.n=8",
    "model.grid.steps=3",
    "trainer.check_val_every_n_epoch=100",
    "optimized_metric=null",  # no validation pass: val/loss is not logged
    "trainer.enable_progress_bar=false",
]
JUDGE = ["trainer.max_epochs=2", "test=false", "trainer.enable_progress_bar=false"]


def zoo_overrides() -> list[str]:
    """The zoo with short members and a short judge, set through `upstream_overrides`."""
    return [
        *ZOO,
        "+upstream_overrides.diffusion_unet_glyphs=[" + ",".join(f"'{o}'" for o in MEMBER) + "]",
        "+upstream_overrides.classifier_glyphs=[" + ",".join(f"'{o}'" for o in JUDGE) + "]",
        "model.check.n_per_model=16",
        "model.check.steps=3",
        "model.grid.n_per_model=8",
        "trainer.enable_progress_bar=false",
    ]


def test_multirun_members_are_reused_by_the_zoo(cache_root: Path, tmp_path: Path) -> None:
    sweep = run_train(
        [
            "-m",
            "experiment=diffusion_unet_glyphs",
            *ZOO,
            *MEMBER,
            "data.class_subset.member=0,1",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cache_root,
    )
    assert sweep.stdout.count("(diffusion_unet) finished") == 2
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "samples.png").stat().st_size > 100  # the grid is in the run dir

    proc = run_train(["experiment=diffusion_zoo_glyphs", *zoo_overrides()], cache_root)
    log = proc.stdout + proc.stderr
    assert "upstream 'unet0': using" in log and "upstream 'unet1': using" in log, "members were trained again"
    m = run_metrics(proc, "diffusion_zoo")
    assert m["test/subset_accuracy_chance"] == pytest.approx(3 / 64, rel=1e-12)
    members = [m[f"test/member{k}_subset_accuracy"] for k in (0, 1)]
    assert all((16 * a).is_integer() for a in members), members  # a share of each member's 16 judged samples
    assert m["test/subset_accuracy"] == pytest.approx(sum(members) / 2, rel=1e-12)
    assert m["test/judge_real_subset_accuracy"] > 0.5  # the judge recognises real images of the covered classes

    path = written_artifact(log, "diffusion_zoo")
    art = load_artifact(path)
    assert {"diffusion_unet[member0]", "diffusion_unet[member1]", "classifier"} <= set(art.manifest["lineage"])
    zoo = load_zoo(art)
    assert zoo.n_models == 2 and zoo.classes_of(1) == [3, 4, 5]
    assert [c["class"] for c in zoo.class_map] == [0, 1, 2, 3, 4, 5]
    spec = json.loads((path / "zoo.json").read_text())
    assert spec["pixel_range"] == [-1.0, 1.0] and len(spec["confusion"]) == 2
    for name in ("samples_member0.png", "samples_member1.png", "samples_zoo.png"):
        assert (path / name).stat().st_size > 100
    images = zoo.sample(0, 4, steps=3, generator=torch.Generator().manual_seed(0))
    again = zoo.sample(0, 4, steps=3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 1, 32, 32) and torch.equal(images, again)  # the generator alone sets the samples
    assert float(images.std(dim=0).mean()) > 0.01  # 4 different images, not one repeated


@pytest.mark.slow
def test_killed_member_resumes_to_the_same_ema_weights(cache_root: Path, tmp_path: Path) -> None:
    common = [
        "experiment=diffusion_unet_glyphs",
        *ZOO,
        *MEMBER,
        "trainer.max_steps=30",
        "data.train.batch_size=16",
        "deterministic=true",
        "test=false",
        "task_name=unet_resume",
        "data.class_subset.member=1",
    ]
    artifacts = cache_root / "outputs" / "artifacts" / "diffusion_unet"
    run_train([*common, f"paths.output_dir={tmp_path / 'straight'}"], cache_root)
    (straight,) = artifacts.glob("unet_resume-*/unet.pt")
    expected = torch.load(straight, weights_only=True)
    straight.parent.rename(tmp_path / "straight_artifact")

    run_dir = tmp_path / "interrupted"
    killed = run_train(
        [*common, f"paths.output_dir={run_dir}", "debug=kill", "callbacks.kill.after=22"], cache_root, check=False
    )
    assert killed.returncode == -9 and not list(artifacts.glob("unet_resume-*"))
    run_train(
        [*common, f"paths.output_dir={run_dir}", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"], cache_root
    )
    (resumed,) = artifacts.glob("unet_resume-*/unet.pt")
    got = torch.load(resumed, weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
