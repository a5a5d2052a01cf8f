"""The feature store: complete, indexed, equal to a direct forward pass, reused on rerun, refused on mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import debug, run_metrics, run_train
from metadiff.config.resolvers import ASSETS_DIR
from metadiff.features.clip_models import create_clip
from metadiff.features.store import FeatureStore, FeatureStoreBuilder, FeatureStoreMismatchError, build_index


def test_builder_commits_atomically_and_refuses_incomplete(tmp_path: Path) -> None:
    index = build_index(["a", "b", "c"], ["q1", "q2"], {"q1": ["x", "y"], "q2": ["z", "w", "v"]})
    builder = FeatureStoreBuilder(tmp_path / "store", 4, index, "fp")
    builder.write("image", np.array([0, 1]), np.ones((2, 4), np.float32))
    with pytest.raises(RuntimeError, match="'image' is incomplete: 1 rows"):
        builder.commit("fp", {}, {})
    assert not (tmp_path / "store").exists(), "an incomplete store became visible"
    builder.write("image", np.array([2]), 2 * np.ones((1, 4), np.float32))
    builder.write("question", np.array([0, 1]), np.zeros((2, 4), np.float32))
    builder.write("answer", np.arange(5), np.arange(20, dtype=np.float32).reshape(5, 4))
    store = builder.commit("fp", {"arch": "x"}, {})
    assert not (tmp_path / "store.partial").exists()
    assert store.images(["c"]).tolist() == [[2, 2, 2, 2]]
    assert store.answers("q2").shape == (3, 4) and store.answers("q2")[0, 0] == 8
    with pytest.raises(KeyError, match="no image 'zz'"):
        store.images(["zz"])


# the tests read the session's store of the embedded twin, which the latent chain's tests build as an upstream: on
# their xdist worker, so no two runs write that store at once (a direct `experiment=features_synthvqa` run takes no
# build lock; make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("synthvqa_latent_chain")


@pytest.fixture(scope="module")
def built_store(cache_root: Path) -> tuple[Path, dict[str, float], str]:
    """The embedded twin's store from the pinned CLIP: the one every synthvqa chain of the session reads."""
    proc = run_train(["experiment=features_synthvqa", debug("short_chain")], cache_root)
    return cache_root, run_metrics(proc, "features"), proc.stdout + proc.stderr


def test_store_matches_direct_forward_pass(built_store) -> None:
    root, metrics, _ = built_store
    (store_dir,) = (root / "outputs" / "data" / "features").glob("synthvqa-metadiff-tiny-vit-*[!l]")
    store = FeatureStore(store_dir)
    assert store.tables["image"].shape[0] == 12000
    assert store.tables["question"].shape[0] == 1243
    assert store.tables["answer"].shape[0] == sum(n for _, n in store.index.answer.values())
    assert store.dim == 128 and json.loads((store_dir / "manifest.json").read_text())["images_per_s"] > 0
    assert metrics["meta_test/zeroshot_acc"] > metrics["meta_test/chance"]  # a trained CLIP's store (first or reused)
    bundle = create_clip("metadiff-tiny-vit", ASSETS_DIR / "clip_synthvqa" / "clip.pt")  # the pinned weights
    images = np.load(next((root / "outputs" / "data" / "synthvqa").glob("synthvqa-*/images.npy")), mmap_mode="r")
    from metadiff.data.sources import normalize_images

    x = normalize_images(torch.from_numpy(np.array(images[[0, 7, 11999]])), bundle.mean, bundle.std)
    with torch.no_grad():
        direct = bundle.model.encode_image(x).numpy()
    np.testing.assert_allclose(
        store.images(["synth_000000", "synth_000007", "synth_011999"]), direct, rtol=1e-4, atol=1e-5
    )
    question = next(iter(store.index.question))
    with torch.no_grad():
        direct_q = bundle.model.encode_text(bundle.tokenizer([question])).numpy()[0]
    np.testing.assert_allclose(store.question(question), direct_q, rtol=1e-4, atol=1e-5)


def test_second_run_reuses_store(built_store) -> None:
    root, _, _ = built_store
    (store_dir,) = (root / "outputs" / "data" / "features").glob("synthvqa-metadiff-tiny-vit-*[!l]")
    manifest = store_dir / "manifest.json"
    before = manifest.stat().st_mtime_ns
    proc = run_train(["experiment=features_synthvqa", debug("short_chain")], root)
    assert "is up to date: reusing it" in proc.stdout + proc.stderr
    assert manifest.stat().st_mtime_ns == before


def test_other_model_on_same_store_is_an_error(built_store, tmp_path: Path) -> None:
    root, _, _ = built_store
    torch.manual_seed(123)
    other = tmp_path / "other_tiny.pt"
    torch.save(create_clip("metadiff-tiny-vit").model.state_dict(), other)
    (store_dir,) = (root / "outputs" / "data" / "features").glob("synthvqa-metadiff-tiny-vit-*[!l]")
    proc = run_train(
        ["experiment=features_synthvqa", f"model.pretrained={other}", f"model.store_dir={store_dir}"],
        root,
        check=False,
    )  # a fixed folder, built for another model
    assert proc.returncode == 2
    assert "was built for a different model or data" in proc.stderr and "checkpoint_sha256" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_interrupted_build_resumes_only_for_the_same_fingerprint(tmp_path: Path) -> None:
    index = build_index(["a", "b", "c"], ["q"], {"q": ["x", "y"]})
    first = FeatureStoreBuilder(tmp_path / "store", 2, index, "fp")
    first.write("image", np.array([0, 2]), np.full((2, 2), 7, np.float32))
    del first  # the process dies here: values and markers of rows 0 and 2 are on disk
    again = FeatureStoreBuilder(tmp_path / "store", 2, index, "fp")
    assert again.resumed and again.pending("image").tolist() == [1] and again.pending("answer").tolist() == [0, 1]
    again.write("image", np.array([1]), np.full((1, 2), 5, np.float32))
    again.write("question", np.array([0]), np.zeros((1, 2), np.float32))
    again.write("answer", np.array([0, 1]), np.zeros((2, 2), np.float32))
    store = again.commit("fp", {}, {})
    assert store.images(["a", "b", "c"])[:, 0].tolist() == [7, 5, 7]
    other = FeatureStoreBuilder(tmp_path / "other", 2, index, "fp")
    other.write("image", np.array([0]), np.ones((1, 2), np.float32))
    fresh = FeatureStoreBuilder(tmp_path / "other", 2, index, "another-model")
    assert not fresh.resumed and fresh.pending("image").tolist() == [0, 1, 2]


def test_mismatch_error_names_differing_field(tmp_path: Path) -> None:
    from metadiff.features.store import check_existing

    index = build_index(["a"], ["q"], {"q": ["x", "y"]})
    builder = FeatureStoreBuilder(tmp_path / "s", 2, index, "fp-a")
    for table, n in (("image", 1), ("question", 1), ("answer", 2)):
        builder.write(table, np.arange(n), np.zeros((n, 2), np.float32))
    builder.commit("fp-a", {"arch": "A", "data": "synthvqa:1"}, {})
    assert check_existing(tmp_path / "s", "fp-a", {"arch": "A", "data": "synthvqa:1"})
    with pytest.raises(FeatureStoreMismatchError, match="data: store has 'synthvqa:1', config asks 'synthvqa:2'"):
        check_existing(tmp_path / "s", "fp-b", {"arch": "A", "data": "synthvqa:2"})
