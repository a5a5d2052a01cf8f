"""HyperLDM stage: classifier-free dropout, the evaluation table, end to end on a short chain."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from conftest import compose_config, run_metrics, run_train, short_chain, with_debug

# the latent-chain tests share one xdist worker, so its upstream chain is built once (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("synthvqa_latent_chain")


def test_exact_fraction_of_each_batch_gets_the_null_token(monkeypatch, tmp_path: Path) -> None:
    """Built from parts (`HyperLDMModule.from_parts`): the settings of the experiment's config, a tiny latent learner
    (4-d latents, 6-d questions) and a tiny denoiser whose inputs a hook records."""
    from metadiff.meta.latent import LatentLearner
    from metadiff.nets.adapter import AdapterShape
    from metadiff.nets.latent_denoiser import LatentDenoiser
    from metadiff.stages.hyperldm import HyperLDMModule, HyperLDMSettings

    cfg = compose_config(
        [
            "experiment=hyperldm_synthvqa",
            "model.uncond_rate=0.2",
            "model.denoiser.hidden=[8]",
            "model.denoiser.time_dim=8",
        ],
        tmp_path,
        tmp_path / "out",
    )
    settings = HyperLDMSettings.from_model_config(cfg.model)
    shape = AdapterShape(embed_dim=6, hidden_dim=2)
    base = LatentLearner(torch.nn.Linear(4, shape.n_params), torch.zeros(4), shape)
    denoiser = LatentDenoiser(4, 6, **dataclasses.asdict(settings.denoiser))
    module = HyperLDMModule.from_parts(settings, base, denoiser)
    seen = []
    denoiser.register_forward_pre_hook(lambda _, args: seen.append(args[2].clone()))
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    question = torch.randn(32, 6) + 5
    loss = module.training_step((torch.randn(32, 4), question, torch.arange(32)), 0)
    assert loss.requires_grad and torch.isfinite(loss)
    nulled = (seen[0] == 0).all(-1)
    assert int(nulled.sum()) == 6  # floor(0.2 * 32), as the original
    torch.testing.assert_close(seen[0][~nulled], question[~nulled])


def _tiny_module(tmp_path: Path, *overrides: str):
    """A HyperLDM module from parts with the experiment's settings (and `overrides`): 4-d latents, 6-d questions."""
    from metadiff.meta.latent import LatentLearner
    from metadiff.nets.adapter import AdapterShape
    from metadiff.nets.latent_denoiser import LatentDenoiser
    from metadiff.stages.hyperldm import HyperLDMModule, HyperLDMSettings

    cfg = compose_config(
        ["experiment=hyperldm_synthvqa", "model.denoiser.hidden=[8]", "model.denoiser.time_dim=8", *overrides],
        tmp_path,
        tmp_path / "out",
    )
    settings = HyperLDMSettings.from_model_config(cfg.model)
    shape = AdapterShape(embed_dim=6, hidden_dim=2)
    base = LatentLearner(torch.nn.Linear(4, shape.n_params), torch.zeros(4), shape)
    return HyperLDMModule.from_parts(settings, base, LatentDenoiser(4, 6, **dataclasses.asdict(settings.denoiser)))


def test_every_guided_row_is_paired_with_cfg_at_the_scale_it_samples_with(tmp_path: Path) -> None:
    """Like with like: a guided row (HyperCLIP, few-shot, ensemble, from-pretrained) samples at its own CFG scale, so
    its paired difference is against the CFG row at that scale (the same sampler and noise, only the guidance added),
    not against the scale meta-val chose for CFG. Before, HyperCLIP rows sampled at CFG 1 were reported against CFG at
    7.5 or 15. Each guided kind with several values also gets its own value chosen on meta-val."""
    module = _tiny_module(
        tmp_path,
        "model.hyperclip_guidance.scales=[10.0,30.0]",
        "model.hyperclip_guidance.cfg_scale=4.0",
        "model.fewshot_guidance.cfg_scale=7.5",
        "model.ensemble.cfg_scale=1.5",
        "model.from_pretrained.t_fracs=[0.5]",
        "model.from_pretrained.cfg_scale=15.0",
    )
    cfg_rows = {v.name: v.cfg_scale for v in module.variants if v.kind == "cfg"}
    guided = [v for v in module.variants if v.kind != "cfg"]
    assert {v.kind for v in guided} == {"hyperclip", "fewshot", "ensemble", "pretrained"}
    per_task = {name: torch.rand(8) for name in [*module.references, *module.variant_names, "cfg_selected"]}
    # meta-val preferred HyperCLIP scale 10 and CFG 1.5: the guided rows keep their own CFG references
    module.val_report = {f"val/{name}": 0.5 for name in module.variant_names} | {"val/hyperclip10": 0.6}
    per_kind = module._selected_per_kind()
    assert {name: v.name for name, v in per_kind.items()} == {"hyperclip_selected": "hyperclip10"}
    rows = module._paired_rows(per_task, per_kind)
    for variant in guided:
        cfg_refs = [ref for name, ref in rows if name == variant.name and ref in cfg_rows]
        assert cfg_refs == [f"cfg{variant.cfg_scale:g}"] and cfg_rows[cfg_refs[0]] == variant.cfg_scale, variant
        assert (variant.name, "cfg_selected") not in rows
    assert ("hyperclip_selected", "cfg4") in rows and ("hyperclip_selected", "hnet_init") in rows
    assert ("cfg_selected", "hnet_init") in rows


def test_hyperldm_short_chain_prints_the_guidance_table(cache_root: Path) -> None:
    proc = run_train(
        [
            "experiment=hyperldm_synthvqa",
            *short_chain("synthvqa"),
            "trainer.max_epochs=10",
            "trainer.check_val_every_n_epoch=10",
            "model.guidance_scales=[0.0,1.0,4.0]",
            "model.sampling.steps=10",
            "model.ensemble.size=2",
            "model.hyperclip_guidance.scales=[10.0]",
            "trainer.enable_progress_bar=false",
        ],
        cache_root,
    )
    m = run_metrics(proc, "hyperldm")
    assert "zero-shot accuracy on meta-test tasks" in proc.stdout
    rows = ("multitask", "hnet_init", "oracle", "ridge", "cfg0", "cfg1", "cfg4", "cfg_selected", "ensemble2")
    assert all(f"test/{name}" in m for name in (*rows, "hyperclip10", "fewshot1")), sorted(m)
    # the scale chosen on meta-val is one of the scales, and its row is that scale's row
    assert m["test/selected_scale"] in (0.0, 1.0, 4.0)
    assert m["test/cfg_selected"] == m[f"test/cfg{m['test/selected_scale']:g}"]
    assert m["train/diffusion_loss"] < 1.0  # below the loss of predicting zeros (v-target variance = 1)
    # The sampled latents have the data's statistics: the latents are normalised (per-dimension std 1), so a sampler
    # that diverges spreads them or leaves +-bound, and one that collapses (e.g. to one x0_hat) has std near 0.
    for name in ("cfg0", "cfg1", "cfg4", "ensemble2", "hyperclip10"):
        std, outside = m[f"test/health/{name}_std"], m[f"test/health/{name}_outside"]
        assert abs(std - 1.0) <= 0.25 and outside == 0.0, (name, std, outside)
    assert m["test/health/fewshot1_outside"] == 0.0  # guided off the unconditional spread, but within the range
    # Paired on the same meta-test tasks (difference > its 95% CI): the support-set guidance, which runs inside the
    # sampler's loop, steers each sample to its task, far above the same sampler unguided (CFG at its scale, 1) and the
    # HNET init (+0.21 and +0.18 here), as the fine-tuned latents (oracle) are above that init. A sampler that skips
    # its steps or returns latents the HNET cannot use gives no such gain.
    for name, minus in (("fewshot1", "cfg1"), ("fewshot1", "hnet_init"), ("oracle", "hnet_init")):
        gap, ci = m[f"test/{name}_minus_{minus}"], m[f"test/{name}_minus_{minus}_ci95"]
        assert gap > ci, (name, minus, gap, ci)
    # The unguided samples are fine-tuned latents of some task (at this budget the denoiser ignores the question:
    # every CFG scale scores the same), so on the same tasks they score near the HNET init (-0.03 +- 0.01 here, +0.03
    # +- 0.03 with a 1-epoch CLIP): latents decoded at another scale, or off the data, fall towards chance (0.29)
    assert abs(m["test/cfg_selected_minus_hnet_init"]) < 0.1, m["test/cfg_selected_minus_hnet_init"]
    assert "diag/eps_mse_t900-1000" in m and "diag/cond_effect_t0-100" in m
    assert "cfg_selected_minus_hnet_init" in proc.stdout and "cfg_selected_minus_cfg0" in proc.stdout
    run_dir = Path(proc.stdout.rsplit("outputs: ", 1)[1].split()[0])
    assert (run_dir / "accuracy_vs_guidance.png").stat().st_size > 1000


@pytest.mark.slow
def test_resumed_run_restores_the_ema_exactly(cache_root: Path, tmp_path: Path) -> None:
    """Kill -9 in epoch 3 of 4, resume from the last checkpoint: the final EMA weights (what sampling and the
    artifact use) equal those of an uninterrupted run bit for bit, so the EMA was saved and restored, and the
    training randomness continues where it stopped."""
    # one 2-row adaptation row of 783 latents per epoch in batches of 32: 25 steps per epoch, 100 in all
    common = [
        "experiment=hyperldm_synthvqa",
        *short_chain("synthvqa"),
        "trainer.max_epochs=4",
        "test=false",
        "data.rows_per_epoch=1",
        "data.latents_per_batch=32",
        "trainer.check_val_every_n_epoch=100",
        "trainer.enable_progress_bar=false",
        "deterministic=true",
        "callbacks.ema.update_starting_at_step=10",
        "task_name=ldm_resume",
    ]
    artifacts = cache_root / "outputs" / "artifacts" / "hyperldm"
    run_train([*common, f"paths.output_dir={tmp_path / 'straight'}"], cache_root)
    (straight,) = artifacts.glob("ldm_resume-*/denoiser.pt")
    expected = torch.load(straight, weights_only=True)["denoiser"]
    straight.parent.rename(tmp_path / "straight_artifact")

    run_dir = tmp_path / "interrupted"
    killed = run_train(
        [*with_debug(common, "kill"), f"paths.output_dir={run_dir}", "callbacks.kill.after=70"], cache_root, check=False
    )
    assert killed.returncode == -9
    assert not list(artifacts.glob("ldm_resume-*"))
    run_train(
        [*common, f"paths.output_dir={run_dir}", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"], cache_root
    )
    (resumed,) = artifacts.glob("ldm_resume-*/denoiser.pt")
    got = torch.load(resumed, weights_only=True)["denoiser"]
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    # the checkpoint holds the EMA (as state_dict) apart from the raw weights, and they differ: it averaged something
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    raw, ema = ckpt["current_model_state"], ckpt["state_dict"]
    assert not torch.equal(raw["denoiser.head.1.weight"], ema["denoiser.head.1.weight"])
    # the frozen upstream HNET is in neither copy (it was in both before: 2 x its weights in every checkpoint)
    frozen = [k for k in (*raw, *ema) if not k.startswith("denoiser.")]
    assert not any(k.startswith("base.") for k in frozen), frozen[:5]


def test_softmax_hyperclip_guidance_runs_in_both_stages(cache_root: Path) -> None:
    """`objective: softmax` (log p(question | latent) among the meta-train questions; its positive control is in
    tests/test_hyperclip_guidance.py) through the real stages: the hyperclip stage's standalone guidance and the
    HyperLDM sampler's, each giving finite rows of its table."""
    from conftest import smoke_overrides

    own = smoke_overrides("hyperclip_synthvqa")
    m = run_metrics(
        run_train(["experiment=hyperclip_synthvqa", *own, "model.guidance.objective=softmax"], cache_root),
        "hyperclip",
    )
    assert all(math.isfinite(m[f"test/guidance/{k}"]) for k in ("guided_acc", "init_acc", "guided_minus_init")), m
    ldm = smoke_overrides("hyperldm_synthvqa")
    m = run_metrics(
        run_train(["experiment=hyperldm_synthvqa", *ldm, "model.hyperclip_guidance.objective=softmax"], cache_root),
        "hyperldm",
    )
    for row in ("hyperclip10", "hyperclip30", "hyperclip10_minus_cfg1", "hyperclip_selected_minus_cfg1"):
        assert math.isfinite(m[f"test/{row}"]), (row, sorted(m))


@pytest.mark.parametrize(("combine", "expected"), [("logits", 1.0), ("probs", 0.0)])
def test_the_ensemble_averages_logits_as_the_spec(combine: str, expected: float, monkeypatch, tmp_path: Path) -> None:
    """Two members whose mean logits and mean probabilities pick different answers: member A is sure of answer 0
    (logits 10, 0, 0), member B leans to answer 1 (-10, 2, 0). Mean logits (0, 1, 0) pick 1, the label; mean
    probabilities (0.50, 0.44, 0.06) pick 0. The spec's end accuracy averages logits (`combine: logits`)."""
    from types import SimpleNamespace

    from metadiff.stages.hyperldm import Variant

    module = _tiny_module(tmp_path, "model.ensemble.size=2", f"model.ensemble.combine={combine}")
    member_logits = iter([torch.tensor([[[10.0, 0.0, 0.0]]]), torch.tensor([[[-10.0, 2.0, 0.0]]])])
    monkeypatch.setattr(module, "sample_latents", lambda question, scales, generator: torch.zeros(2, 4))
    monkeypatch.setattr(module, "_logits", lambda z, batch: next(member_logits))
    batch = SimpleNamespace(
        n_tasks=1,
        question=torch.zeros(1, 6),
        task_index=torch.tensor([0]),
        query_y=torch.tensor([[1]]),
        query_mask=torch.tensor([[True]]),
    )
    variant = next(v for v in module.variants if v.kind == "ensemble")
    assert isinstance(variant, Variant) and variant.value == 2
    module._evaluate_ensemble(batch, "test", variant)  # type: ignore[arg-type]
    assert module.values.compute([f"test/{variant.name}"])[f"test/{variant.name}"].item() == expected
