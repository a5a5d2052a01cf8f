"""`experiment=features_vqa` on a self-written VQA v2 + COCO tree: builds the tasks, then the feature store; resumes
after an interruption; bad checkpoints and missing images stop it with one line."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from conftest import run_train, smoke_budget
from metadiff.data.meta_vqa.source import MetaVQASource, image_transform
from metadiff.features.clip_models import create_clip
from metadiff.features.store import FeatureStore
from metadiff.stages.features import FeatureExtractor, FeatureSourceDataModule

ARCH = "metadiff-tiny-vit"


def test_features_vqa_builds_tasks_then_store_and_reuses_it(vqa_tree: dict, tmp_path: Path) -> None:
    proc = run_train(["experiment=features_vqa", *smoke_budget("features_vqa", vqa_tree)], tmp_path)
    (store_dir,) = (tmp_path / "outputs" / "data" / "features").glob(f"meta_vqa-{ARCH}-*[!l]")  # not .partial
    store = FeatureStore(store_dir)
    assert store.tables["image"].shape[0] == 40 and store.tables["question"].shape[0] == 3
    # a stored embedding equals the model applied to the JPEG with the configured preprocessing
    bundle = create_clip(ARCH, vqa_tree["checkpoint"])
    name = "COCO_val2014_000000000104"
    from PIL import Image

    image = image_transform(bundle.image_size, bundle.mean, bundle.std, "squash")(
        Image.open(vqa_tree["coco_dir"] / "val2014" / f"{name}.jpg").convert("RGB")
    )
    with torch.no_grad():
        direct = bundle.model.eval().encode_image(image[None]).numpy()[0]
    np.testing.assert_allclose(store.images([name])[0], direct, rtol=1e-4, atol=1e-5)
    assert "meta_test/zeroshot_acc" in proc.stdout
    again = run_train(["experiment=features_vqa", *smoke_budget("features_vqa", vqa_tree)], tmp_path)
    assert "is up to date: reusing it" in again.stdout + again.stderr


def test_wrong_architecture_checkpoint_is_one_line(vqa_tree: dict, tmp_path: Path) -> None:
    weights = f"model.pretrained={vqa_tree['checkpoint']}"  # the tiny ViT's file, named explicitly: not RN50.pt
    proc = run_train(
        ["experiment=features_vqa", *smoke_budget("features_vqa", vqa_tree), weights, "model.arch=RN50"],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and str(vqa_tree["checkpoint"]) in errors[0] and "'RN50'" in errors[0], proc.stderr


def test_missing_image_stops_the_run_in_one_line(vqa_tree: dict, tmp_path: Path) -> None:
    import shutil

    coco = tmp_path / "coco"
    shutil.copytree(vqa_tree["coco_dir"], coco)
    (coco / "train2014" / "COCO_train2014_000000000007.jpg").unlink()
    proc = run_train(
        ["experiment=features_vqa", *smoke_budget("features_vqa", vqa_tree), f"paths.coco_dir={coco}"],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: 1 COCO image(s)" in proc.stderr and "COCO_train2014_000000000007.jpg" in proc.stderr


class _Interrupt(pl.Callback):
    """Dies after `after` image batches, like a killed job."""

    def __init__(self, after: int):
        self.after, self.seen = after, 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx == 0:
            self.seen += 1
            if self.seen == self.after:
                raise RuntimeError("simulated crash")


class _CountImages(pl.Callback):
    def __init__(self):
        self.images = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.images += batch[0].shape[0] if dataloader_idx == 0 else 0


def _extract(
    vqa_tree: dict, task_dir: Path, store_dir: Path, callback: pl.Callback, precision: str = "32-true"
) -> None:
    source = MetaVQASource(
        image_dir=str(vqa_tree["coco_dir"]),
        task_dir=str(task_dir),
        prompts=str(vqa_tree["prompts"]),
        meta_val={"fraction": 0.1, "seed": 0},
    )
    data = FeatureSourceDataModule(source=source, arch=ARCH, batch_size=8, text_batch_size=4)
    model = FeatureExtractor(
        source=source, arch=ARCH, store_dir=str(store_dir), pretrained=str(vqa_tree["checkpoint"]), precision=precision
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        precision=precision,
    )
    trainer.predict(model, datamodule=data, return_predictions=False)


def test_interrupted_extraction_resumes_where_it_stopped(vqa_tree: dict, tmp_path: Path) -> None:
    from metadiff.data.meta_vqa.__main__ import configured_rules
    from metadiff.data.meta_vqa.build import build_meta_vqa

    rules, files = configured_rules()
    build_meta_vqa(vqa_tree["vqa_dir"], tmp_path / "tasks", rules, files, progress=False)
    store_dir = tmp_path / "store"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _extract(vqa_tree, tmp_path / "tasks", store_dir, _Interrupt(after=2))
    assert not store_dir.exists() and (tmp_path / "store.partial").is_dir()
    counter = _CountImages()
    _extract(vqa_tree, tmp_path / "tasks", store_dir, counter)
    assert counter.images == 40 - 2 * 8, "the resumed run recomputed rows that were already stored"
    reference = tmp_path / "reference"
    _extract(vqa_tree, tmp_path / "tasks", reference, _CountImages())
    for table in ("image", "question", "answer"):
        np.testing.assert_allclose(
            FeatureStore(store_dir).tables[table], FeatureStore(reference).tables[table], rtol=1e-5, atol=1e-6
        )


def test_bf16_mixed_extraction_matches_fp32(vqa_tree: dict, tmp_path: Path) -> None:
    """`trainer=gpu` runs bf16-mixed; the same autocast path runs on CPU, so its numbers are checked here."""
    from metadiff.data.meta_vqa.__main__ import configured_rules
    from metadiff.data.meta_vqa.build import build_meta_vqa

    rules, files = configured_rules()
    build_meta_vqa(vqa_tree["vqa_dir"], tmp_path / "tasks", rules, files, progress=False)
    _extract(vqa_tree, tmp_path / "tasks", tmp_path / "fp32", _CountImages())
    _extract(vqa_tree, tmp_path / "tasks", tmp_path / "bf16", _CountImages(), precision="bf16-mixed")
    for table in ("image", "answer"):
        a = torch.from_numpy(np.asarray(FeatureStore(tmp_path / "fp32").tables[table]))
        b = torch.from_numpy(np.asarray(FeatureStore(tmp_path / "bf16").tables[table]))
        assert b.dtype == torch.float32 and not torch.equal(a, b), "bf16 autocast was not applied"
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99, table
