"""The COCO images are checked by the stage that reads them (features_vqa), not by every `*_vqa` stage and rank that
reads only features: on a network filesystem the check is one stat per image (~100k for the real Meta-VQA)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from conftest import compose_config, vqa_data
from metadiff.stages.features import FeatureSourceDataModule
from test_meta_val import _fake_store

N_IMAGES = 40  # images the fixture's tasks name


def _count_image_checks(monkeypatch: pytest.MonkeyPatch, coco_dir: Path) -> list[Path]:
    """Every `Path.stat` call on a path under the COCO folder from now on (`is_file` and `exists` call it)."""
    seen: list[Path] = []
    original = Path.stat

    def counted(self: Path, *args, **kwargs):
        if str(self).startswith(str(coco_dir)):
            seen.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", counted)
    return seen


def test_a_stage_that_reads_features_only_never_checks_the_images(
    vqa_tree: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hnet_vqa's data setup (every rank of every features-only stage runs it): no filesystem check of an image;
    before, all 40 were checked again. The features stage's data preparation still checks each image once."""
    cfg = compose_config(["experiment=hnet_vqa", *vqa_data(vqa_tree)[:3]], tmp_path, tmp_path / "out")
    _fake_store(instantiate(cfg.data, store_dir=str(tmp_path / "store")).source, tmp_path / "store")
    data = instantiate(cfg.data, store_dir=str(tmp_path / "store"))  # a fresh source, as a new stage or rank has
    checks = _count_image_checks(monkeypatch, vqa_tree["coco_dir"])
    data.setup("fit")
    assert len(data.source.image_names()) == N_IMAGES and checks == []
    features = FeatureSourceDataModule(source=instantiate(cfg.data.source), arch="metadiff-tiny-vit")
    features.prepare_data()
    assert len(checks) == N_IMAGES and len(set(checks)) == N_IMAGES
