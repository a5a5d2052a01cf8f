"""features_vqa hands uint8 images from its DataLoader workers and normalises them on the device (issue 31, fault 4).

Float32 [256, 3, 336, 336] batches are 347 MB through worker shared memory (a bus error in a container with the
default 64 MB /dev/shm) and 4x the bytes of uint8 to the GPU. The workers now decode and size the images (the CLIP
preprocessing's Resize / CenterCrop), the stage finishes it (ToTensor's /255 and Normalize) on the device: the same
operations in the same order, so the features are those of the old path."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from metadiff.data.meta_vqa.source import MetaVQASource, image_transform
from metadiff.features.clip_models import create_clip
from metadiff.features.store import FeatureStore
from metadiff.stages.features import FeatureExtractor, FeatureSourceDataModule

ARCH = "metadiff-tiny-vit"
BATCH = 8


@pytest.fixture(scope="module")
def task_dir(vqa_tree: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from metadiff.data.meta_vqa.__main__ import configured_rules
    from metadiff.data.meta_vqa.build import build_meta_vqa

    rules, files = configured_rules()
    root = tmp_path_factory.mktemp("uint8-tasks")
    build_meta_vqa(vqa_tree["vqa_dir"], root, rules, files, progress=False)
    return root


def _source(vqa_tree: dict, task_dir: Path, resize: str = "squash") -> MetaVQASource:
    return MetaVQASource(
        image_dir=str(vqa_tree["coco_dir"]),
        task_dir=str(task_dir),
        prompts=str(vqa_tree["prompts"]),
        meta_val={"fraction": 0.1, "seed": 0},
        resize=resize,
    )


def test_the_image_loader_hands_over_uint8(vqa_tree: dict, task_dir: Path) -> None:
    data = FeatureSourceDataModule(
        source=_source(vqa_tree, task_dir),
        arch=ARCH,
        batch_size=BATCH,
        text_batch_size=4,
        num_workers=0,
        pin_memory=True,
    )
    data.setup("predict")
    images, rows = next(iter(data.predict_dataloader()[0]))
    size = create_clip(ARCH).image_size
    assert images.dtype == torch.uint8 and images.shape == (BATCH, 3, size, size)
    assert rows.tolist() == list(range(BATCH))


@pytest.mark.parametrize("resize", ["squash", "shorter_side_center_crop"])
def test_normalised_uint8_images_are_the_old_float_images_to_the_bit(
    vqa_tree: dict, task_dir: Path, resize: str
) -> None:
    """Workers' part + the device part = the old worker pipeline (torchvision Resize/CenterCrop, ToTensor, Normalize)."""
    from metadiff.data.sources import ImageNormalizer

    bundle = create_clip(ARCH)
    source = _source(vqa_tree, task_dir, resize)
    source.prepare()
    names = source.image_names()[:5]
    raw = source.raw_image_dataset(names, bundle.image_size)
    normalize = ImageNormalizer(bundle.mean, bundle.std)
    old = image_transform(bundle.image_size, bundle.mean, bundle.std, resize)
    for i, name in enumerate(names):
        with Image.open(source.image_path(name)) as image:
            expected = old(image.convert("RGB"))
        got = normalize(raw[i][0][None])[0]
        assert got.dtype == torch.float32 and torch.equal(got, expected), name


def test_stored_features_equal_the_old_float_pipeline(vqa_tree: dict, task_dir: Path, tmp_path: Path) -> None:
    source = _source(vqa_tree, task_dir)
    data = FeatureSourceDataModule(
        source=source, arch=ARCH, batch_size=BATCH, text_batch_size=4, num_workers=0, pin_memory=True
    )
    model = FeatureExtractor(
        source=source, arch=ARCH, store_dir=str(tmp_path / "store"), pretrained=str(vqa_tree["checkpoint"])
    )
    pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    ).predict(model, datamodule=data, return_predictions=False)
    store = FeatureStore(tmp_path / "store")
    bundle = create_clip(ARCH, vqa_tree["checkpoint"])
    transform = image_transform(bundle.image_size, bundle.mean, bundle.std, "squash")
    names = source.image_names()
    old = []
    for start in range(0, len(names), BATCH):  # the old path: float images from the workers, the same batches
        batch = []
        for name in names[start : start + BATCH]:
            with Image.open(source.image_path(name)) as image:
                batch.append(transform(image.convert("RGB")))
        with torch.no_grad():
            old.append(bundle.model.eval().encode_image(torch.stack(batch)).float().numpy())
    np.testing.assert_allclose(store.images(names), np.concatenate(old), rtol=0, atol=1e-6)
