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
    for key in ("test/trained_1shot", "test/random_init_1shot", "test/trained_5shot", "test/random_init_5shot"):
        assert 0.0 <= m[key] <= 1.0 and m[key + "_ci95"] > 0.0
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
