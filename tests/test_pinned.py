"""The pinned CLIP of the embedded twin (metadiff/assets/clip_synthvqa): its manifest describes the file shipped, a
changed file is refused in one line, pinning round-trips an artifact's weights, and the feature store built from the
asset through the real config reproduces the baselines the manifest recorded when it was pinned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import compose_config, run_metrics, run_train
from metadiff.config.resolvers import ASSETS_DIR
from metadiff.errors import UserError
from metadiff.features import pinned
from metadiff.utils.hashing import file_sha256

ASSET = ASSETS_DIR / pinned.CLIP_ASSET


def test_manifest_describes_the_shipped_weights() -> None:
    manifest = pinned.read_manifest()
    weights = ASSET / manifest["weights"]
    assert file_sha256(weights) == manifest["sha256"]
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert sum(v.numel() for v in state.values()) == manifest["parameters"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    built = manifest["built_by"]
    assert built["experiment"] == "clip_synthvqa" and built["config"]["task_name"] == "clip_synthvqa"
    assert len(built["commit"].split("+")[0]) == 40 and built["config_fingerprint"]
    assert "python train.py experiment=clip_synthvqa" in manifest["rebuild"]
    assert 0.4 < manifest["metrics_fp32"]["test/zeroshot_acc"] < 1.0  # a trained CLIP: chance is ~0.29


def test_features_synthvqa_reads_the_pinned_weights_by_default(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=features_synthvqa"], tmp_path, tmp_path / "out")
    assert Path(cfg.model.pretrained) == ASSET / "clip.pt"
    assert "clip" not in cfg.upstream
    trained = compose_config(["experiment=features_synthvqa", "synthvqa_clip=trained"], tmp_path, tmp_path / "out")
    assert trained.model.pretrained is None and trained.upstream.clip.experiment == "clip_synthvqa"


def test_a_changed_pinned_file_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assets = tmp_path / "assets"
    shutil.copytree(ASSET, assets / pinned.CLIP_ASSET)
    monkeypatch.setattr(pinned, "ASSETS_DIR", assets)
    copy = assets / pinned.CLIP_ASSET / "clip.pt"
    pinned.check_if_pinned(copy)  # the shipped bytes pass
    pinned.check_if_pinned(tmp_path / "elsewhere.pt")  # a file outside the assets is not checked
    state = torch.load(copy, weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1
    torch.save(state, copy)
    with pytest.raises(UserError) as err:
        pinned.check_if_pinned(copy)
    message = str(err.value)
    assert "\n" not in message and str(copy) in message and "manifest" in message


def test_pinning_an_artifact_round_trips_its_weights(tmp_path: Path) -> None:
    """A clip artifact (written here in the real layout) pinned: float16 file, manifest of its config and metrics."""
    from omegaconf import OmegaConf

    from metadiff.features.clip_models import CLIP_WEIGHTS, create_clip

    artifact = tmp_path / "clip_synthvqa-abc"
    artifact.mkdir()
    torch.manual_seed(0)
    state = create_clip("metadiff-tiny-vit").model.state_dict()
    torch.save(state, artifact / CLIP_WEIGHTS)
    metrics = {"test/zeroshot_acc": 0.5, "val/zeroshot_acc": 0.49, "train/loss": 3.0}
    manifest = {"stage": "clip", "task_name": "clip_synthvqa", "fingerprint": "abc", "metrics": metrics}
    (artifact / "manifest.json").write_text(json.dumps({**manifest, "lineage": {}, "upstream": {}, "variant": None}))
    OmegaConf.save(
        OmegaConf.create({"task_name": "clip_synthvqa", "seed": 7, "model": {"arch": "metadiff-tiny-vit"}}),
        artifact / "config.yaml",
    )
    out = tmp_path / "pinned"
    written = pinned.pin_clip(artifact, out, commit="0" * 40)
    assert written["built_by"]["seed"] == 7
    assert written["metrics_fp32"] == {"test/zeroshot_acc": 0.5, "val/zeroshot_acc": 0.49}  # not training's
    assert "seed=7" in written["rebuild"]
    loaded = torch.load(out / "clip.pt", weights_only=True)
    for name, value in state.items():
        expected = value.half() if value.is_floating_point() else value
        assert torch.equal(loaded[name], expected), name
    assert not list(out.glob(".*tmp*")), "a temporary file was left behind"


@pytest.mark.xdist_group("synthvqa_latent_chain")  # the session's store: written by one worker (test_feature_store.py)
def test_features_from_the_pinned_clip_reproduce_the_manifest(cache_root: Path) -> None:
    """The embedded twin's feature store, built from the asset through `experiment=features_synthvqa`, gives the CLIP
    baselines on meta-test that the manifest recorded when the weights were pinned (exactly: same file, same code)."""
    recorded = pinned.read_manifest()["metrics_pinned"]
    measured = run_metrics(run_train(["experiment=features_synthvqa"], cache_root), "features")
    for key, value in recorded.items():
        if key.startswith("meta_test/"):
            assert measured[key] == pytest.approx(value, abs=1e-6), key
