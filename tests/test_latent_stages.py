"""The stages after the HNET: adaptation dataset, VAE, HyperCLIP (units, then end-to-end on a short chain)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import _log, run_metrics, run_train, short_chain, smoke_overrides, with_debug, written_artifact
from metadiff.config import ConfigError
from metadiff.data.adaptation import AdaptationData, LatentRows
from metadiff.data.meta_vqa.tasks import Task
from metadiff.nets.hyperclip import HyperCLIPEncoder, contrastive_loss, n_way_accuracy, retrieval_accuracy
from metadiff.nets.vae import WeightVAE
from metadiff.stages.adaptation import plan_chunks
from metadiff.store import Artifact, ArtifactMismatchError, check_lineage

# the latent-chain tests share one xdist worker, so its upstream chain is built once (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("synthvqa_latent_chain")

CHAIN = short_chain("synthvqa")


# ------------------------------------------------------------------------------------------------------------ units
def test_contrastive_loss_is_symmetric_infonce() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 6)
    manual = -(logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean())
    torch.testing.assert_close(contrastive_loss(logits, "sum"), manual)
    torch.testing.assert_close(contrastive_loss(logits, "mean"), manual / 2)
    with pytest.raises(ValueError, match="loss_reduction"):
        contrastive_loss(logits, "max")


def test_retrieval_metrics_against_known_answers() -> None:
    perfect = torch.eye(20) * 10
    assert retrieval_accuracy(perfect, 1).mean() == 1.0
    assert n_way_accuracy(perfect, 10).mean() == 1.0
    shifted = perfect.roll(1, dims=1)  # every row prefers the wrong column
    assert retrieval_accuracy(shifted, 1).mean() == 0.0
    torch.manual_seed(0)
    noise = torch.randn(2000, 2000)
    assert abs(float(n_way_accuracy(noise, 10).mean()) - 0.1) < 0.02  # chance is 1/10
    assert abs(float(retrieval_accuracy(noise, 5).mean()) - 5 / 2000) < 0.003


def test_hyperclip_encoder_embeddings_are_unit_norm_and_scale_fixed() -> None:
    enc = HyperCLIPEncoder(in_dim=12, embed_dim=8)
    assert torch.allclose(enc(torch.randn(5, 12)).norm(dim=-1), torch.ones(5))
    assert float(enc.logit_scale) == pytest.approx(100.0)
    assert not any("log_logit_scale" in n for n, _ in enc.named_parameters())
    learned = HyperCLIPEncoder(in_dim=12, embed_dim=8, learn_logit_scale=True)
    assert any("log_logit_scale" in n for n, _ in learned.named_parameters())


def test_vae_kl_term_matches_closed_form() -> None:
    vae = WeightVAE(in_dim=16, latent_dim=4, hidden=[8])
    torch.nn.init.zeros_(vae.encoder.layers[-1].weight)
    torch.nn.init.zeros_(vae.encoder.layers[-1].bias)  # mu = 0, log sigma^2 = -1 for every input
    terms = vae.losses(torch.randn(3, 16))
    expected = -0.5 * 4 * (1 - 1 - 0 - math.exp(-1)) / math.sqrt(16)
    assert float(terms["kl"].detach()) == pytest.approx(expected, rel=1e-6)
    mean, std = torch.randn(16), torch.tensor(3.0)
    vae.set_normalization(mean, std)
    x = torch.randn(2, 16)
    torch.testing.assert_close(vae.standardize(x), (x - mean) / 3)


def _task(i: int, size: int) -> Task:
    return Task(question=f"q{i}", answers=["a", "b"], train=[(f"img{j}", j % 2) for j in range(size)], test=[])


def test_chunks_cover_every_task_of_every_row_once_and_group_by_size() -> None:
    tasks = {
        "meta_train": [_task(i, s) for i, s in enumerate([50, 3, 700, 9, 40])],
        "meta_val": [_task(i, s) for i, s in enumerate([30, 5])],
        "meta_test": [_task(i, s) for i, s in enumerate([8, 80, 2])],
    }
    chunks = plan_chunks(tasks, rows=3, chunk_tasks=2)
    for kind, n_rows, n in (("train", 3, 5), ("meta_train", 1, 5), ("meta_val", 1, 2), ("meta_test", 1, 3)):
        for row in range(n_rows):
            got = sorted(i for c in chunks if c.kind == kind and c.row == row for i in c.tasks)
            assert got == list(range(n)), (kind, row)
    first = next(c for c in chunks if c.kind == "train")
    assert first.tasks == (1, 3)  # the two smallest tasks share a chunk
    assert len({c.name for c in chunks}) == len(chunks)


def _adaptation(rows: int = 4) -> AdaptationData:
    return AdaptationData(
        train_latents=torch.arange(rows * 3 * 2.0).reshape(rows, 3, 2),
        eval_latents={"meta_train": torch.zeros(3, 2), "meta_test": torch.zeros(1, 2)},
        train_questions=torch.zeros(3, 5),
        tasks={"meta_train": ["q0", "q1", "q2"], "meta_test": ["t0"]},
        init_latent=torch.zeros(2),
        latent_mean=torch.zeros(2),
        latent_std=torch.ones(2),
    )


def test_latent_rows_pick_one_reproducible_row_per_epoch() -> None:
    data = _adaptation(rows=8)
    a, b = LatentRows(data, seed=1), LatentRows(data, seed=1)
    picked = []
    for epoch in range(6):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert a.row == b.row
        picked.append(a.row)
        z, _, i = a[2]
        torch.testing.assert_close(z, data.train_latents[a.row, 2])
        assert i == 2
    assert len(set(picked)) > 1, "every epoch used the same row"


def test_latent_rows_can_cover_several_rows_per_epoch_each_item_once() -> None:
    data = _adaptation(rows=8)
    n = data.train_latents.shape[1]
    rows = LatentRows(data, seed=1, rows_per_epoch=None)  # every row
    rows.set_epoch(3)
    assert len(rows) == 8 * n and sorted(rows.epoch_rows.tolist()) == list(range(8))
    seen = {(int(rows.epoch_rows[j // n]), rows[j][2]) for j in range(len(rows))}
    assert seen == {(r, i) for r in range(8) for i in range(n)}
    some = LatentRows(data, seed=1, rows_per_epoch=3)
    some.set_epoch(0)
    z, _, i = some[n + 1]  # second row of the epoch, task 1
    torch.testing.assert_close(z, data.train_latents[int(some.epoch_rows[1]), 1])
    assert i == 1 and len(set(some.epoch_rows.tolist())) == 3
    with pytest.raises(ConfigError, match="rows_per_epoch = 9"):
        LatentRows(data, seed=1, rows_per_epoch=9)


def test_adaptation_for_other_tasks_is_refused() -> None:
    data = _adaptation()
    tasks = {
        "meta_train": [Task("q0", ["a"], [], []), Task("q1", ["a"], [], []), Task("q2", ["a"], [], [])],
        "meta_test": [Task("t0", ["a"], [], [])],
    }
    data.check_tasks(tasks, Path("here"))
    tasks["meta_test"].append(Task("t1", ["a"], [], []))
    with pytest.raises(ArtifactMismatchError, match=r"built for 1 meta_test tasks .* has 2"):
        data.check_tasks(tasks, Path("here"))


def test_lineage_refuses_upstreams_built_on_other_features() -> None:
    def art(stage: str, fp: str, lineage: dict[str, str]) -> Artifact:
        return Artifact(Path(f"/a/{stage}"), {"stage": stage, "fingerprint": fp, "lineage": lineage})

    features = art("features", "f" * 64, {"clip": "c" * 64})
    adaptation = art("adaptation", "a" * 64, {"clip": "c" * 64, "features": "f" * 64, "hnet": "h" * 64})
    check_lineage({"features": features, "adaptation": adaptation})
    other = art("adaptation", "b" * 64, {"clip": "c" * 64, "features": "e" * 64, "hnet": "h" * 64})
    with pytest.raises(ArtifactMismatchError, match="built on features eeeeeeeeeeee, but upstream 'features' uses"):
        check_lineage({"features": features, "adaptation": other})


# ------------------------------------------------------------------------------------------------- end to end
def _artifact(root: Path, stage: str, task_name: str) -> Path:
    (path,) = (root / "outputs" / "artifacts" / stage).glob(f"{task_name}-*")
    return path


@pytest.mark.slow
def test_adaptation_killed_half_way_resumes_to_the_same_dataset(cache_root: Path) -> None:
    args = [
        "experiment=adaptation_synthvqa",
        *CHAIN,
        "model.rows=2",
        "model.inner.steps=3",
        "model.chunk_tasks=128",
        "task_name=adapt_resume",
        "trainer.enable_progress_bar=false",
    ]
    killed = run_train(
        [*with_debug(args, "kill"), "callbacks.kill.phase=predict", "callbacks.kill.after=9"], cache_root, check=False
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    work = next((cache_root / "outputs" / "artifacts" / "adaptation" / ".work").glob("adapt_resume-*"))
    assert len(list(work.glob("*.pt"))) == 9
    assert not list((cache_root / "outputs" / "artifacts" / "adaptation").glob("adapt_resume-*"))

    resumed = run_train(args, cache_root)
    # 783 meta-train tasks in 7 chunks of 128 (x 2 rows + 1 evaluation), 87 meta-val in 1, 373 meta-test in 3
    assert "9 of 25 chunks already done" in resumed.stdout + resumed.stderr
    metrics = run_metrics(resumed, "adaptation")
    # the fine-tuned latents must beat the HNET init on held-out tasks: adaptation does something
    assert metrics["adaptation/meta_test_finetuned_acc"] > metrics["adaptation/meta_test_init_acc"]
    resumed_data = torch.load(_artifact(cache_root, "adaptation", "adapt_resume") / "adaptation.pt", weights_only=True)

    shutil.rmtree(work)
    shutil.rmtree(_artifact(cache_root, "adaptation", "adapt_resume"))
    run_train(args, cache_root)
    fresh = torch.load(_artifact(cache_root, "adaptation", "adapt_resume") / "adaptation.pt", weights_only=True)
    assert resumed_data["train_latents"].shape == (2, 783, 128)  # meta-train without the 87 meta-val tasks
    assert resumed_data["tasks"] == fresh["tasks"]
    for key in ("train_latents", "train_questions", "init_latent", "latent_mean", "latent_std"):
        torch.testing.assert_close(resumed_data[key], fresh[key], rtol=0, atol=0)
    for split, value in fresh["eval_latents"].items():
        torch.testing.assert_close(resumed_data["eval_latents"][split], value, rtol=0, atol=0)


def test_vae_decoded_weights_keep_their_task_accuracy(cache_root: Path) -> None:
    proc = run_train(
        [
            "experiment=vae_synthvqa",
            *CHAIN,
            "trainer.max_epochs=40",
            "trainer.check_val_every_n_epoch=20",
            "trainer.enable_progress_bar=false",
        ],
        cache_root,
    )
    m = run_metrics(proc, "vae")
    assert m["test/encoded_acc"] > 0.2
    assert abs(m["test/decoded_minus_encoded"]) < 0.05, m
    assert m["test/relative_mse"] < 0.5
    spec = json.loads((_artifact(cache_root, "vae", "vae_synthvqa") / "vae.json").read_text())
    assert spec["input"] == "latent" and spec["in_dim"] == 128


def test_hyperclip_retrieves_held_out_tasks_and_refuses_foreign_upstreams(cache_root: Path, tmp_path: Path) -> None:
    args = [
        "experiment=hyperclip_synthvqa",
        *CHAIN,
        "trainer.max_epochs=8",
        "trainer.check_val_every_n_epoch=4",
        "trainer.enable_progress_bar=false",
        "model.guidance.steps=10",
    ]
    m = run_metrics(run_train(args, cache_root), "hyperclip")
    assert m["test/retrieval/n_tasks"] == 373
    assert m["test/retrieval/10way"] > 0.2, m  # chance 0.1
    assert m["test/retrieval/top1"] > 3 * m["test/retrieval/chance_top1"], m
    guided, init = m["test/guidance/guided_acc"], m["test/guidance/init_acc"]  # paired over the same tasks
    assert m["test/guidance/guided_minus_init"] == pytest.approx(guided - init, abs=1e-6), m

    # an adaptation dataset whose lineage names other features than this run's is refused with one line
    foreign = tmp_path / "foreign"
    shutil.copytree(_artifact(cache_root, "adaptation", "adaptation_synthvqa"), foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["lineage"]["features"] = "0" * 64
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    proc = run_train([*args, f"+upstream.adaptation.path={foreign}"], cache_root, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "was built on features 000000000000" in proc.stderr

    # ... and so is one built for another task split
    manifest["lineage"] = json.loads(
        (_artifact(cache_root, "adaptation", "adaptation_synthvqa") / "manifest.json").read_text()
    )["lineage"]
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    data = torch.load(foreign / "adaptation.pt", weights_only=True)
    data["tasks"]["meta_test"] = data["tasks"]["meta_test"][:-1]
    torch.save(data, foreign / "adaptation.pt")
    proc = run_train([*args, f"+upstream.adaptation.path={foreign}"], cache_root, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "was built for 372 meta_test tasks" in proc.stderr


def test_an_adaptation_whose_chunks_are_all_done_still_publishes(cache_root: Path) -> None:
    """A rerun finds every chunk on disk (a run killed after its last chunk, or the dataset built as another run's
    upstream): Lightning skips a predict loop without batches, and its end hook with it; the stage still assembles
    and publishes the dataset. Before, such a run published nothing."""
    args = ["experiment=adaptation_synthvqa", *smoke_overrides("adaptation_synthvqa")]
    first = written_artifact(_log(run_train(args, cache_root)), "adaptation")
    again = run_train(args, cache_root)
    assert "Total length of `DataLoader` across ranks is zero" in _log(again)  # the loop had nothing to do
    assert written_artifact(_log(again), "adaptation") == first


def test_the_hvae_route_refuses_what_it_cannot_mean(cache_root: Path) -> None:
    """Two settings that would run wrong: HyperCLIP with `input: vae` (encode the latents with the VAE) over the HVAE
    route's adaptation dataset, whose latents are that VAE's codes already: refused by the lineage check (the VAE was
    built on the HNET's adaptation, not this one; a VAE built on this one would be a second VAE, and coherent); and a
    VAE MetaModel over an HNET whose tasks start from their question (`question_init`), which ignored that start: one
    line naming the key."""
    from types import SimpleNamespace

    from metadiff.meta.latent import LatentLearner
    from metadiff.nets.adapter import AdapterShape
    from metadiff.stages.vae import load_vae_latent_learner

    vae_upstream = "+upstream.vae={experiment:vae_synthvqa,overrides:[],inherit_groups:[trainer],build_if_missing:true}"
    args = ["experiment=hyperclip_hvae_synthvqa", *smoke_overrides("hyperclip_hvae_synthvqa"), "model.input=vae"]
    proc = run_train([*args, vae_upstream], cache_root, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "upstream 'vae'" in out and "was built on adaptation" in out, out[-2000:]

    shape = AdapterShape(embed_dim=6, hidden_dim=2)
    hnet = LatentLearner(torch.nn.Linear(6, shape.n_params), torch.zeros(6), shape, question_init=True)
    with pytest.raises(ConfigError, match="model.learner.question_init: true"):
        load_vae_latent_learner(SimpleNamespace(path=Path("vae-artifact")), hnet)  # type: ignore[arg-type]
