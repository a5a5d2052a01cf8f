"""HyperLDM stage: classifier-free dropout, the evaluation table, end to end on a short chain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_metrics, run_train, short_chain, with_debug

# the latent-chain tests share one xdist worker, so its upstream chain is built once (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("synthvqa_latent_chain")


def test_exact_fraction_of_each_batch_gets_the_null_token(monkeypatch) -> None:
    from metadiff.stages.hyperldm import HyperLDMModule

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x, t, c):
            seen.append(c.clone())
            return torch.zeros_like(x, requires_grad=True)

    module = HyperLDMModule.__new__(HyperLDMModule)  # only what training_step needs
    torch.nn.Module.__init__(module)
    module.denoiser, module.uncond_rate, module.train_seed, module._trainer = Probe(), 0.2, 0, None
    module.prediction = "eps"
    from metadiff.diffusion.schedule import NoiseSchedule

    module.schedule = NoiseSchedule.make("cosine", 100)
    module.register_buffer("latent_mean", torch.zeros(4))
    module.register_buffer("latent_std", torch.ones(4))
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    question = torch.randn(32, 6) + 5
    module.training_step((torch.randn(32, 4), question, torch.arange(32)), 0)
    nulled = (seen[0] == 0).all(-1)
    assert int(nulled.sum()) == 6  # floor(0.2 * 32), as the original
    torch.testing.assert_close(seen[0][~nulled], question[~nulled])


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
    for name in (
        "multitask",
        "hnet_init",
        "oracle",
        "ridge",
        "cfg0",
        "cfg1",
        "cfg4",
        "cfg_selected",
        "ensemble2",
        "hyperclip10",
        "fewshot1",
    ):
        assert 0.1 < m[f"test/{name}"] < 0.9, name
    # the scale chosen on meta-val is one of the scales, and its row is that scale's row
    assert m["test/selected_scale"] in (0.0, 1.0, 4.0)
    assert m["test/cfg_selected"] == m[f"test/cfg{m['test/selected_scale']:g}"]
    assert m["train/diffusion_loss"] < 1.0  # below the loss of predicting zeros (v-target variance = 1)
    for name in ("cfg0", "cfg1", "cfg4", "ensemble2", "hyperclip10"):  # every sampling run stays in the data's range
        std, outside = m[f"test/health/{name}_std"], m[f"test/health/{name}_outside"]  # (model.health's thresholds)
        assert 0.5 <= std <= 2.0 and outside <= 0.01, (name, std, outside)
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
