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

TINY = {"n_classes": 6, "images_per_class": 24, "image_size": 16}


def test_glyphs_are_deterministic_per_seed_and_vary_per_drawing() -> None:
    a = glyphs.render_glyphs(glyphs.GlyphSpec(**TINY))
    b = glyphs.render_glyphs(glyphs.GlyphSpec(**TINY))
    c = glyphs.render_glyphs(glyphs.GlyphSpec(**TINY, seed=1))
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
    return EpisodeSampler(targets, EpisodeShape(5, 2, 3), n_episodes=12, episodes_per_batch=4, seed=seed,
                          fixed=fixed, **kwargs)


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
    code = ("import torch, sys; sys.path.insert(0, 'tests'); from test_images import _episodes; "
            "print(_episodes().all_episodes().flatten().tolist())")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True,
                         text=True, check=True, env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
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
    seen = sorted(tuple(batch[i:i + 25]) for shard in shards for batch in shard for i in range(0, len(batch), 25))
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
            together = ranks[0][step * 4:(step + 1) * 4] + ranks[1][step * 4:(step + 1) * 4]
            assert sorted(together) == sorted(single[step * 8:(step + 1) * 8])
