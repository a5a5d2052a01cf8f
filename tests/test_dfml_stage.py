"""The dfml stage end to end on a tiny glyph zoo, in both compat modes: regeneration rounds with an explicit label
manifest, checkpoint selection on the configured split, grids and plots, the artifact DiffusionMix reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_metrics, run_train, smoke_budget, written_artifact
from metadiff.dfml.pseudo_data import PseudoData, lexicographic_labels
from metadiff.stages.dfml import SPEC, WEIGHTS, load_meta_model
from metadiff.store import load_artifact


@pytest.mark.parametrize("compat", ["fixed", "faithful"])
def test_dfml_regenerates_selects_and_publishes(compat: str, cache_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train(
        [
            "experiment=dfml_glyphs",
            *smoke_budget("dfml_glyphs"),
            f"compat={compat}",
            "trainer.max_epochs=2",
            "data.train.steps_per_epoch=3",
            "trainer.enable_progress_bar=false",
            "data.episodes.n_episodes=20",
            f"task_name=dfml_{compat}",
            f"paths.output_dir={run_dir}",
        ],
        cache_root,
    )
    m = run_metrics(proc, "dfml")
    for key in (
        "test/trained_1shot",
        "test/random_init_1shot",
        "test/trained_5shot",
        "test/random_init_5shot",
        "test/reference_1shot",
        "test/reference_5shot",
    ):
        assert m[key + "_ci95"] > 0.0, key  # 20 episodes that do not all score the same
    for k in (1, 5):  # paired over the same episodes: the mean difference is the difference of the means (up to the
        # float32 rounding of each episode's difference)
        diff = m[f"test/trained_minus_random_init_{k}shot"]
        assert diff == pytest.approx(m[f"test/trained_{k}shot"] - m[f"test/random_init_{k}shot"], abs=1e-6)
        assert m[f"test/trained_minus_random_init_{k}shot_ci95"] > 0.0
        ref_gap = m[f"test/reference_minus_random_init_{k}shot"]
        assert ref_gap == pytest.approx(m[f"test/reference_{k}shot"] - m[f"test/random_init_{k}shot"], abs=1e-6)
        # the share of the random-init -> real-data gap closed: the reference (the judge, trained on the real images)
        # scores otherwise than the random init on these 20 episodes, so the share is defined and checked
        assert ref_gap != 0.0, f"{k}-shot: the reference scored exactly the random init"
        assert m[f"test/gap_closed_{k}shot"] == pytest.approx(diff / ref_gap, rel=1e-12)
    assert m["val/selected_epoch"] in (0.0, 1.0)

    rounds = [PseudoData.load(run_dir / "pseudo" / f"round{r}.pt") for r in (0, 1)]
    for r, data in enumerate(rounds):
        assert data.round == r and data.images.dtype == torch.uint8 and len(data) == 6 * 7
        assert data.classes.tolist() == sorted(data.classes.tolist())  # 6 pseudo classes x 7 images
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
    # the selection is Lightning's: one best checkpoint (ModelCheckpoint on val/accuracy), its epoch the one
    # reported, its meta-model the one tested and published (not the last weights)
    (best,) = sorted((run_dir / "checkpoints").glob("best_epoch_*.ckpt"))
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == m["val/selected_epoch"] == json.loads(spec)["selected_epoch"]
    selected = {k.removeprefix("meta."): v for k, v in checkpoint["state_dict"].items() if k.startswith("meta.")}
    published = torch.load(artifact.path / WEIGHTS, weights_only=True)
    assert selected.keys() == published.keys()
    assert all(torch.equal(selected[k], published[k]) for k in selected)


def test_diffusionmix_reports_each_norm_and_the_paired_differences(cache_root: Path) -> None:
    proc = run_train(
        [
            "experiment=diffusionmix_glyphs",
            *smoke_budget("diffusionmix_glyphs"),
            "data.episodes.n_episodes=6",
            "data.episodes.episodes_per_batch=3",
            "model.mix.batch_size=2",
            "trainer.enable_progress_bar=false",
        ],
        cache_root,
    )
    m = run_metrics(proc, "diffusionmix")
    readouts = ("prototype", "head", "head_diffusionmix", "head_batch_stats", "head_diffusionmix_batch_stats")
    for name in readouts:  # a mean over 6 episodes of 5 x 15 queries each
        assert (m[f"test/{name}_1shot"] * 6 * 75) == pytest.approx(round(m[f"test/{name}_1shot"] * 6 * 75), abs=1e-3)
    assert not any(key.endswith("_5shot") for key in m)  # one meta-model per K: the 1-shot twin tests 1-shot only
    for diff, (a, b) in {
        "diffusionmix_gain": ("head_diffusionmix", "head"),
        "diffusionmix_gain_batch_stats": ("head_diffusionmix_batch_stats", "head_batch_stats"),
        "head_batch_stats_minus_head": ("head_batch_stats", "head"),
        "head_minus_prototype": ("head", "prototype"),
    }.items():
        assert m[f"test/{diff}_1shot"] == pytest.approx(m[f"test/{a}_1shot"] - m[f"test/{b}_1shot"], abs=1e-6), diff
    assert "paired per-episode differences" in proc.stdout
