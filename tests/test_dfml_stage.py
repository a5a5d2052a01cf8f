"""The dfml stage end to end on a tiny glyph zoo, in both compat modes: regeneration rounds with an explicit label
manifest, checkpoint selection on the configured split, grids and plots, the artifact DiffusionMix reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import dfml_smoke_overrides, parse_summary, run_train, written_artifact
from metadiff.artifacts import load_artifact
from metadiff.dfml.pseudo_data import PseudoData, lexicographic_labels
from metadiff.stages.dfml import SPEC, load_meta_model


@pytest.mark.parametrize("compat", ["fixed", "faithful"])
def test_dfml_regenerates_selects_and_publishes(compat: str, cache_root: Path, tmp_path: Path,
                                                image_tree: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train(["experiment=dfml_glyphs", *dfml_smoke_overrides("dfml_glyphs", image_tree), f"compat={compat}",
                      "trainer.max_epochs=2", "data.train.steps_per_epoch=3", "trainer.enable_progress_bar=false",
                      "data.episodes.n_episodes=20",
                      f"task_name=dfml_{compat}", f"paths.output_dir={run_dir}"], cache_root)
    m = parse_summary(proc.stdout)
    for key in ("test/trained_1shot", "test/random_init_1shot", "test/trained_5shot", "test/random_init_5shot",
                "test/reference_1shot", "test/reference_5shot"):
        assert 0.0 <= m[key] <= 1.0 and m[key + "_ci95"] > 0.0
    for k in (1, 5):  # paired over the same episodes: the mean difference is the difference of the means
        diff = m[f"test/trained_minus_random_init_{k}shot"]
        assert abs(diff - (m[f"test/trained_{k}shot"] - m[f"test/random_init_{k}shot"])) < 2e-4  # printed to 4 places
        assert m[f"test/trained_minus_random_init_{k}shot_ci95"] > 0.0
        ref_gap = m[f"test/reference_{k}shot"] - m[f"test/random_init_{k}shot"]
        if abs(ref_gap) > 0.05:  # the ratio of 4-place figures is only checkable away from a zero gap
            assert abs(m[f"test/gap_closed_{k}shot"] - diff / ref_gap) < 0.01
    assert m["val/selected_epoch"] in (0.0, 1.0)

    rounds = [PseudoData.load(run_dir / "pseudo" / f"round{r}.pt") for r in (0, 1)]
    for r, data in enumerate(rounds):
        assert data.round == r and data.images.dtype == torch.uint8 and len(data) == 6 * 7
        assert data.classes.tolist() == sorted(data.classes.tolist())          # 6 pseudo classes x 7 images
        expected = data.classes if compat == "fixed" else torch.tensor(lexicographic_labels(6))[data.classes]
        assert torch.equal(data.labels, expected)
        assert (run_dir / f"pseudo_round{r}.png").stat().st_size > 100
    assert not torch.equal(rounds[0].images, rounds[1].images)  # regenerated with the trained guide
    assert (run_dir / "accuracy_per_round.png").stat().st_size > 100

    artifact = load_artifact(written_artifact(proc.stdout + proc.stderr, "dfml"))
    assert artifact.manifest["variant"] is None and "diffusion_zoo" in artifact.manifest["lineage"]
    spec = (artifact.path / SPEC).read_text()
    assert f'"compat": "{compat}"' in spec and (artifact.path / "pseudo_round1.png").exists()
    net = load_meta_model(artifact)
    assert net.head.out_dim == 6 and not any(p.requires_grad for p in net.parameters())


def test_diffusionmix_reports_each_norm_and_the_paired_differences(cache_root: Path, image_tree: Path) -> None:
    proc = run_train(["experiment=diffusionmix_glyphs", *dfml_smoke_overrides("diffusionmix_glyphs", image_tree),
                      "data.episodes.n_episodes=6", "data.episodes.episodes_per_batch=3", "model.mix.batch_size=2",
                      "trainer.enable_progress_bar=false"], cache_root)
    m = parse_summary(proc.stdout)
    readouts = ("prototype", "head", "head_diffusionmix", "head_batch_stats", "head_diffusionmix_batch_stats")
    for name in readouts:
        assert 0.0 <= m[f"test/{name}_1shot"] <= 1.0
    assert not any(key.endswith("_5shot") for key in m)  # one meta-model per K: the 1-shot twin tests 1-shot only
    for diff, (a, b) in {"diffusionmix_gain": ("head_diffusionmix", "head"),
                         "diffusionmix_gain_batch_stats": ("head_diffusionmix_batch_stats", "head_batch_stats"),
                         "head_batch_stats_minus_head": ("head_batch_stats", "head"),
                         "head_minus_prototype": ("head", "prototype")}.items():
        assert abs(m[f"test/{diff}_1shot"] - (m[f"test/{a}_1shot"] - m[f"test/{b}_1shot"])) < 2e-4, diff
        assert m[f"test/{diff}_1shot_ci95"] >= 0.0
    assert "paired per-episode differences" in proc.stdout
