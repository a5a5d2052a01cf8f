"""Few-shot image data: the embedded glyph set, folder datasets (miniImageNet / CIFAR-FS layout), episodes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metadiff.config import ConfigError
from metadiff.data.images import glyphs
from metadiff.data.images.episodes import EpisodeCollate, EpisodeSampler, EpisodeShape
from metadiff.data.images.folders import FolderImageSplit
from metadiff.data.images.partition import class_map, zoo_partition
from metadiff.data.images.sources import GlyphSource
from metadiff.data.samplers import StepOrder
from metadiff.errors import InputFileError, MissingInputError
from metadiff.eval.fewshot import episode_accuracy, prototype_logits

# a GlyphSpec names every value (specs have no defaults): a tiny set, drawn as the set's first version was
TINY = {
    "n_classes": 6,
    "images_per_class": 24,
    "image_size": 16,
    "supersample": 2,
    "min_strokes": 4,
    "max_strokes": 12,
    "pen_width": (4.0, 7.0),
    "rotation_deg": 12.0,
    "scale": (0.75, 1.0),
    "shear": 0.15,
    "shift": 0.08,
    "stroke_shift": 3.0,
    "stroke_rotation_deg": 8.0,
    "stroke_scale": (0.9, 1.1),
    "stroke_drop": 0.0,
    "wobble": 0.0,
    "points_per_stroke": 24,
    "seed": 0,
}


def test_glyphs_are_deterministic_per_seed_and_vary_per_drawing() -> None:
    a = glyphs.render_glyphs(glyphs.GlyphSpec(**TINY))
    b = glyphs.render_glyphs(glyphs.GlyphSpec(**TINY))
    c = glyphs.render_glyphs(glyphs.GlyphSpec(**{**TINY, "seed": 1}))
    assert a["images"].shape == (6 * 24, 1, 16, 16) and a["images"].dtype == torch.uint8
    assert torch.equal(a["images"], b["images"]) and a["classes"] == b["classes"]
    assert a["classes"] != c["classes"]  # another seed picks other characters
    assert len(set(a["classes"])) == 6
    first = a["images"][:24].float()
    assert (first - first.mean(0)).abs().mean() > 5  # jittered drawings of one character differ
    ink = a["images"].float().mean(dim=(1, 2, 3))
    assert (ink > 5).all() and (ink < 128).all()  # every image has strokes and background


def test_glyphs_are_cached_and_not_rendered_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = glyphs.GlyphSpec(**TINY)
    first = glyphs.load_glyphs(spec, tmp_path)
    assert len(list(tmp_path.glob("glyphs-*.pt"))) == 1 and not list(tmp_path.glob(".*tmp*"))
    monkeypatch.setattr(glyphs, "render_glyphs", lambda spec: pytest.fail("rendered again"))
    assert torch.equal(glyphs.load_glyphs(spec, tmp_path)["images"], first["images"])


def test_glyph_source_splits_classes_disjointly(tmp_path: Path) -> None:
    source = GlyphSource(str(tmp_path), [3, 2, 1], [0.2], [0.35], render=TINY)
    splits = {name: source.split(name) for name in ("meta_train", "meta_val", "meta_test")}
    assert [len(s.classes) for s in splits.values()] == [3, 2, 1]
    assert len({c for s in splits.values() for c in s.classes}) == 6
    image, label = splits["meta_val"][30]
    assert image.shape == (1, 16, 16) and 0.0 <= image.min() and image.max() <= 1.0 and label == 1
    with pytest.raises(ConfigError, match="split_sizes"):
        GlyphSource(str(tmp_path), [3, 2], [0.2], [0.35], render=TINY)


def _write_folder_dataset(root: Path, classes: dict[str, dict[str, int]], size: int = 20) -> None:
    rng = np.random.default_rng(0)
    for split, per_class in classes.items():
        for name, n in per_class.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for j in range(n):
                pixels = rng.integers(0, 255, size=(size + j, size, 3), dtype=np.uint8)  # sizes vary
                Image.fromarray(pixels).save(root / split / name / f"{j}.{'jpg' if j % 2 else 'png'}")


def test_folder_split_reads_resizes_and_orders_classes(tmp_path: Path) -> None:
    _write_folder_dataset(tmp_path, {"meta_test": {"n02": 3, "n01": 4}})
    split = FolderImageSplit(tmp_path, "meta_test", image_size=12, extensions=[".jpg", ".png"])
    assert split.classes == ["n01", "n02"] and split.targets.tolist() == [0] * 4 + [1] * 3
    image, label = split[5]
    assert image.shape == (3, 12, 12) and label == 1 and 0.0 <= image.min() and image.max() <= 1.0


def test_folder_split_errors_name_the_split_class_and_file(tmp_path: Path) -> None:
    _write_folder_dataset(tmp_path, {"meta_val": {"a": 2, "b": 2}})
    with pytest.raises(MissingInputError, match="split 'meta_test' not found: .*meta_test"):
        FolderImageSplit(tmp_path, "meta_test", 12)
    (tmp_path / "meta_val" / "empty_class").mkdir()
    with pytest.raises(InputFileError, match="empty_class"):
        FolderImageSplit(tmp_path, "meta_val", 12)
    (tmp_path / "meta_val" / "empty_class").rmdir()
    (tmp_path / "meta_val" / "b" / "0.png").write_bytes(b"not a png")
    split = FolderImageSplit(tmp_path, "meta_val", 12)
    with pytest.raises(InputFileError, match=r"unreadable image .*b/0\.png"):
        split[2]


def _episodes(seed: int = 42, fixed: bool = True, **kwargs) -> EpisodeSampler:
    targets = torch.arange(10).repeat_interleave(25)
    return EpisodeSampler(
        targets, EpisodeShape(5, 2, 3), n_episodes=12, episodes_per_batch=4, seed=seed, fixed=fixed, **kwargs
    )


def test_episodes_have_the_class_major_layout_and_distinct_images() -> None:
    targets = torch.arange(10).repeat_interleave(25)
    for episode in _episodes().all_episodes():
        classes = targets[episode]
        support, query = classes[:10].view(5, 2), classes[10:].view(5, 3)
        assert (support == support[:, :1]).all() and (query == support[:, :1]).all()
        assert len(set(support[:, 0].tolist())) == 5
        assert len(set(episode.tolist())) == 25


def test_fixed_episodes_are_identical_across_runs_and_processes() -> None:
    here = _episodes().all_episodes()
    assert torch.equal(here, _episodes().all_episodes())
    assert not torch.equal(here, _episodes(seed=7).all_episodes())
    code = (
        "import torch, sys; sys.path.insert(0, 'tests'); from test_images import _episodes; "
        "print(_episodes().all_episodes().flatten().tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    ).stdout
    assert eval(out) == here.flatten().tolist()  # noqa: S307 - our own subprocess's list literal


def test_training_episodes_depend_on_seed_and_epoch_only() -> None:
    a, b = _episodes(fixed=False), _episodes(fixed=False)
    a.set_epoch(3)
    b.set_epoch(3)
    assert torch.equal(a.all_episodes(), b.all_episodes())
    b.set_epoch(4)
    assert not torch.equal(a.all_episodes(), b.all_episodes())


def test_ranks_split_the_fixed_episodes_exactly() -> None:
    shards = [list(_episodes(rank=r, world_size=3)) for r in range(3)]
    seen = sorted(tuple(batch[i : i + 25]) for shard in shards for batch in shard for i in range(0, len(batch), 25))
    assert seen == sorted(tuple(e.tolist()) for e in _episodes().all_episodes())


def test_too_few_images_per_class_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="only 4 images"):
        EpisodeSampler(torch.arange(6).repeat_interleave(4), EpisodeShape(5, 1, 15), 3)


def test_step_order_gives_each_step_the_same_batch_however_it_is_resumed() -> None:
    step = {"k": 0}
    order = StepOrder(n=10, batch_size=3, seed=5, position=lambda: step["k"] * 3)
    stream = list(order)
    step["k"] = 3  # a new pass begins where the previous one ended
    stream += list(order)
    assert len(stream) == 18 and sorted(stream[:9]) == sorted(set(stream[:9]))  # a pass has no repeats
    step["k"] = 2  # resumed at step 2 (mid-pass): the same samples follow
    assert list(order)[:9] == stream[6:15]


def test_collate_splits_support_and_query_with_episode_labels() -> None:
    shape = EpisodeShape(3, 2, 1)
    items = [(torch.full((1, 2, 2), float(i)), 10 + i // 3) for i in range(2 * shape.size)]
    batch = EpisodeCollate(shape)(items)
    assert batch.support.shape == (2, 6, 1, 2, 2) and batch.query.shape == (2, 3, 1, 2, 2)
    assert batch.support_labels.tolist() == [[0, 0, 1, 1, 2, 2]] * 2
    assert batch.query_labels.tolist() == [[0, 1, 2]] * 2


def test_prototype_readout_is_exact_on_separable_features() -> None:
    protos = torch.eye(4)[:3] * 5
    support = protos.repeat_interleave(2, 0)[None] + 0.1 * torch.randn(1, 6, 4)
    labels = torch.arange(3).repeat_interleave(2)[None]
    query = protos[torch.tensor([2, 0, 1])][None]
    logits = prototype_logits(support, labels, query, n_way=3, scale=7.0)
    assert episode_accuracy(logits, torch.tensor([[2, 0, 1]])).item() == 1.0
    assert logits.abs().max() <= 7.0 + 1e-5


def test_prototype_readout_keeps_fp32_under_bf16_autocast() -> None:
    """Features sharing a large common part (as an untrained or briefly trained Conv4's do): the classes differ only
    in the cosines' fourth digit, below bf16's resolution near 1. The readout must not round them away."""
    g = torch.Generator().manual_seed(0)
    common, offsets = torch.randn(64, generator=g), 0.02 * torch.randn(5, 64, generator=g)
    labels = torch.arange(5).repeat_interleave(5)[None]
    support = (common + offsets[labels[0]] + 0.002 * torch.randn(25, 64, generator=g))[None]
    query_labels = torch.arange(5).repeat(3)[None]
    query = (common + offsets[query_labels[0]] + 0.002 * torch.randn(15, 64, generator=g))[None]
    exact = prototype_logits(support, labels, query, n_way=5, scale=7.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = prototype_logits(support.bfloat16(), labels, query.bfloat16(), n_way=5, scale=7.0)
    assert episode_accuracy(exact, query_labels).item() == 1.0
    assert mixed.dtype == torch.float32
    assert episode_accuracy(mixed, query_labels).item() == 1.0


def test_zoo_partition_is_disjoint_and_checked() -> None:
    parts = zoo_partition(64, 13, 4)
    assert len(parts) == 13 and sorted(c for p in parts for c in p) == list(range(52))
    assert class_map(parts)[5] == {"class": 5, "model": 1, "local": 1}
    with pytest.raises(ConfigError, match="> the 64 meta-train classes"):
        zoo_partition(64, 13, 5 + 1)


def test_step_order_ranks_together_take_the_one_process_batches() -> None:
    """DDP with 2 ranks of batch 4 trains on exactly the batches of 1 process with batch 8, whatever the position."""
    from metadiff.data.samplers import StepOrder

    for position in (0, 24, 40):
        single = list(StepOrder(50, 8, seed=3, position=lambda p=position: p))
        ranks = [list(StepOrder(50, 4, seed=3, position=lambda p=position: p, rank=r, world_size=2)) for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == len(single) // 2
        for step in range(len(single) // 8):
            together = ranks[0][step * 4 : (step + 1) * 4] + ranks[1][step * 4 : (step + 1) * 4]
            assert sorted(together) == sorted(single[step * 8 : (step + 1) * 8])


# ------------------------------------------------------------------ pickled miniImageNet / CIFAR-FS distributions

PICKLE_FILES = {
    "meta_train": ["mini-imagenet-cache-train.pkl", "miniImageNet_category_split_train_phase_train.pickle"],
    "meta_val": ["mini-imagenet-cache-val.pkl", "miniImageNet_category_split_val.pickle"],
    "meta_test": ["mini-imagenet-cache-test.pkl", "miniImageNet_category_split_test.pickle"],
}


def _pickled_source(root: Path, fmt: str = "auto", files: dict | None = None, size: int = 8):
    from metadiff.data.images.sources import ImageSetSource

    return ImageSetSource(
        str(root), size, [".png"], [0.5] * 3, [0.25] * 3, format=fmt, pickle_files=files or PICKLE_FILES
    )


def _solid(values: list[int], side: int) -> np.ndarray:
    """One constant-colour image per value: a resize keeps each pixel, so the decoded image names its row."""
    return np.stack([np.full((side, side, 3), v, dtype=np.uint8) for v in values])


def test_cache_pickle_reads_classes_by_name_and_resizes(tmp_path: Path) -> None:
    import pickle

    # rows 0..5; class "n02" owns rows 0, 2, 4 and "n01" rows 5, 1 (listed out of order on purpose)
    obj = {"image_data": _solid([10, 20, 30, 40, 50, 60], 12), "class_dict": {"n02": [0, 2, 4], "n01": [5, 1]}}
    (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps(obj))
    split = _pickled_source(tmp_path).split("meta_test")
    assert split.classes == ["n01", "n02"] and split.targets.tolist() == [0, 0, 1, 1, 1]
    values = [round(float(split[i][0][0, 4, 4]) * 255) for i in range(len(split))]
    assert values == [60, 20, 10, 30, 50]
    image, label = split[2]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == 1


def test_metaoptnet_and_cifarfs_pickles_are_read_with_python2_strings(tmp_path: Path) -> None:
    import pickle

    labels = [70, 64, 70, 99, 64]  # global labels, as MetaOptNet's files hold them
    obj = {b"data": _solid([1, 2, 3, 4, 5], 32), b"labels": labels}  # Python 2 pickles: bytes keys
    (tmp_path / "CIFAR_FS_val.pickle").write_bytes(pickle.dumps(obj, protocol=2))
    files = {
        "meta_train": ["CIFAR_FS_train.pickle"],
        "meta_val": ["CIFAR_FS_val.pickle"],
        "meta_test": ["CIFAR_FS_test.pickle"],
    }
    split = _pickled_source(tmp_path, "pickle", files, size=64).split("meta_val")
    assert split.classes == ["64", "70", "99"] and split.targets.tolist() == [1, 0, 1, 2, 0]
    assert split[3][0].shape == (3, 64, 64) and round(float(split[3][0].mean()) * 255) == 4
    assert split.indices_of([0]).tolist() == [1, 4]


def test_auto_prefers_folders_and_pickle_errors_name_the_file(tmp_path: Path) -> None:
    import pickle

    _write_folder_dataset(tmp_path, {"meta_train": {"a": 2, "b": 2}})
    (tmp_path / "mini-imagenet-cache-train.pkl").write_bytes(b"not a pickle")
    assert _pickled_source(tmp_path).split("meta_train").classes == ["a", "b"]  # the folder wins under auto
    with pytest.raises(InputFileError, match=r"unreadable pickle .*mini-imagenet-cache-train\.pkl"):
        _pickled_source(tmp_path, "pickle").split("meta_train")
    (tmp_path / "mini-imagenet-cache-val.pkl").write_bytes(pickle.dumps({"images": [], "targets": []}))
    with pytest.raises(
        InputFileError,
        match=r"cache-val\.pkl: expected keys \{image_data, class_dict\} or "
        r"\{data, labels\}, found \['images', 'targets'\]",
    ):
        _pickled_source(tmp_path).split("meta_val")
    bad = {"data": _solid([1, 2], 4), "labels": [0]}
    (tmp_path / "miniImageNet_category_split_test.pickle").write_bytes(pickle.dumps(bad))
    with pytest.raises(InputFileError, match=r"'labels' must hold one integer per image \(2\)"):
        _pickled_source(tmp_path).split("meta_test")
    (tmp_path / "miniImageNet_category_split_test.pickle").write_bytes(
        pickle.dumps({"data": np.zeros((2, 4, 4), np.uint8), "labels": [0, 1]})
    )
    with pytest.raises(InputFileError, match=r"'data' must be uint8 images \[N, H, W, 3\], got uint8 \(2, 4, 4\)"):
        _pickled_source(tmp_path).split("meta_test")


def test_missing_split_names_both_forms_and_bad_format_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(
        MissingInputError,
        match=r"split 'meta_val' not found: .*meta_val is not a directory and "
        r"none of \['mini-imagenet-cache-val.pkl', .*\] is in",
    ):
        _pickled_source(tmp_path).split("meta_val")
    with pytest.raises(ConfigError, match=r"data.source.format='zip'"):
        _pickled_source(tmp_path, "zip")
    with pytest.raises(ConfigError, match=r"pickle_files has no entry for \['meta_test'\]"):
        _pickled_source(tmp_path, files={"meta_train": [], "meta_val": []})
