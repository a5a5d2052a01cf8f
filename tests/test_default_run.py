"""The newcomer's command `python train.py` (default experiment features_synthvqa, upstream clip_synthvqa) end to end.

Two sizes of the same check: CI runs the default command with a shorter upstream CLIP (10,000 caption pairs, one
epoch: ~3.5 min on one thread instead of ~14.5 min for 2 x 40,000, because the whole CI has 30 min on 2 cores);
`make test-demo` runs the exact default, which is what `make demo` does and the README's figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_train, summaries

SHORTER_CLIP = "upstream.clip.overrides=['data.n_train_pairs=10000','trainer.max_epochs=1']"


def assert_default_chain_learns(stdout: str) -> None:
    (clip,), (features,) = summaries(stdout, "clip_synthvqa"), summaries(stdout, "features_synthvqa")
    # the small CLIP learned to answer: zero-shot accuracy on meta-test tasks far above chance
    assert clip["test/zeroshot_acc"] > 1.5 * clip["test/chance"], clip
    assert clip["test/zeroshot_acc"] - 3 * clip["test/zeroshot_acc_ci95"] > clip["test/chance"], clip
    # the features reproduce that score through the store, and the benchmark is learnable but not trivial
    assert abs(features["meta_test/zeroshot_acc"] - clip["test/zeroshot_acc"]) < 1e-3, (features, clip)
    # image features carry task information: a nearest-centroid few-shot classifier beats chance by far ...
    assert features["meta_test/prototype_acc"] > 1.5 * features["meta_test/chance"], features
    # ... and answers are skewed (as in VQA): the per-task majority answer is a real baseline to beat
    assert features["meta_test/majority_acc"] > 1.5 * features["meta_test/chance"], features
    assert features["meta_test/prototype_acc"] < 0.9, "synthvqa is trivially solvable from image features"
    assert features["features/n_images"] == 12000 and features["features/images_per_s"] > 0


@pytest.mark.slow
def test_default_command_with_a_shorter_clip_learns_and_builds_features(tmp_path: Path) -> None:
    # a cold interpreter, as a newcomer starts it (the other checks fork the worker's warm one: train_process.py)
    assert_default_chain_learns(run_train([SHORTER_CLIP], tmp_path, timeout=1200, fresh=True).stdout)


@pytest.mark.slow
@pytest.mark.demo
def test_default_chain_learns_clip_and_builds_features(tmp_path: Path) -> None:
    assert_default_chain_learns(run_train([], tmp_path, timeout=1800, fresh=True).stdout)
