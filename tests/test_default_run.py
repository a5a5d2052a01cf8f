"""The embedded main job end to end, with the real default config (no debug shortcuts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import parse_summary, run_train


@pytest.mark.slow
def test_default_chain_learns_clip_and_builds_features(tmp_path: Path) -> None:
    # default experiment: features_synthvqa (+ upstream clip_synthvqa); the longest check of the slow set
    proc = run_train([], tmp_path, timeout=1800)
    out = proc.stdout
    clip = parse_summary(out.split("== features_synthvqa")[0])
    features = parse_summary(out)
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
