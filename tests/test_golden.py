"""Golden values (as diffusers pins its schedulers' full loops): the sampler's full loop on a fixed denoiser with a
fixed seed, pinned to the values the code gives today, so a change of the sampling arithmetic (timestep spacing,
the DDIM/DDPM update, the noise stream) fails here with the numbers, even where a statistical test would pass.

The denoiser is the exact one for Gaussian data N(MU, S^2): eps*(x_t, t) = sqrt(1 - ab) (x_t - sqrt(ab) MU) /
(ab S^2 + 1 - ab). So the same loop is also a positive control: with many steps its samples have the data's mean and
standard deviation.

Also pinned: a dfml round's pseudo data (its uint8 checksum) and the `classifier_glyphs` smoke run's metrics."""

from __future__ import annotations

import pytest
import torch

from metadiff.diffusion.sampling import sample
from metadiff.diffusion.schedule import NoiseSchedule

MU, S = 2.0, 0.5
SCHEDULE = NoiseSchedule.make("cosine", 1000)


def exact_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    ab = SCHEDULE.alpha_bar(t).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * S**2 + 1 - ab)


# (method, spacing) -> the 2 x 4 samples of 10 steps from torch.Generator().manual_seed(0), measured on CPU
GOLDEN = {
    ("ddim", "trailing"): [2.657723, 1.874703, 1.069861, 2.242608, 1.537085, 1.40303, 2.172105, 2.357677],
    ("ddpm", "leading"): [2.017522, 2.083513, 1.37503, 1.719499, 1.935353, 2.571897, 2.561652, 1.948663],
    ("ddim", "linspace"): [2.64883, 1.876396, 1.082427, 2.239329, 1.543349, 1.411108, 2.169776, 2.352844],
}


@pytest.mark.parametrize(("method", "spacing"), list(GOLDEN), ids=[f"{m}-{s}" for m, s in GOLDEN])
def test_the_sampler_full_loop_gives_the_pinned_values(method: str, spacing: str) -> None:
    timesteps = SCHEDULE.set_timesteps(10, spacing=spacing)
    out = sample(
        exact_eps, SCHEDULE, timesteps, shape=(2, 4), method=method, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out.flatten(), torch.tensor(GOLDEN[method, spacing]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_the_sampler_recovers_the_data_distribution_with_the_exact_denoiser(method: str) -> None:
    """Measured with 1000 steps on 8192 samples: ddim mean 1.9999, std 0.5020; ddpm 2.0002, 0.5017 (10 steps: the
    std shrinks to 0.43 / 0.39, the discretisation error of few steps)."""
    timesteps = SCHEDULE.set_timesteps(1000, spacing="trailing")
    out = sample(
        exact_eps, SCHEDULE, timesteps, shape=(8192, 1), method=method, generator=torch.Generator().manual_seed(1)
    )
    assert abs(out.mean().item() - MU) < 0.02 and abs(out.std().item() - S) < 0.01, (out.mean(), out.std())


# A dfml round's pseudo data (tests/test_pseudo_data_ranks.py's tiny zoo of 2 random UNets, 6 classes, 5 images
# each, 2 guided leading-DDIM steps, seed 3, round 1), per compat mode: the sha256 of its uint8 images and, to show
# what changed when the checksum does, each class's pixel sum. Measured on CPU, the same under 1 and 2 torch threads.
PSEUDO_GOLDEN = {
    "fixed": ("3492835d0221b995", [41837, 41835, 40969, 41136, 40317, 45663]),
    "faithful": ("ad3ed7fe75855d26", [41712, 41682, 40683, 40979, 40447, 45380]),
}


@pytest.mark.parametrize("compat", list(PSEUDO_GOLDEN))
def test_a_pseudo_data_round_gives_the_pinned_checksum(compat: str) -> None:
    import hashlib

    from test_pseudo_data_ranks import one_process

    digest, class_sums = PSEUDO_GOLDEN[compat]
    pseudo = one_process(compat)
    assert pseudo.images.dtype == torch.uint8 and tuple(pseudo.images.shape) == (30, 1, 8, 8)
    assert pseudo.classes.tolist() == pseudo.labels.tolist() == [c for c in range(6) for _ in range(5)]
    assert pseudo.models.tolist() == [0] * 15 + [1] * 15
    assert [int(pseudo.images[pseudo.classes == c].sum()) for c in range(6)] == class_sums
    assert hashlib.sha256(pseudo.images.numpy().tobytes()).hexdigest()[:16] == digest


# The smoke run of `classifier_glyphs` (`debug=[smoke_images,fdr]`: one training batch of the embedded glyph set, the
# fixed meta-test episodes read out by prototypes), measured on CPU, the same under 1 and 2 torch threads: the glyph
# rendering, the episode sampler, the backbone's first step and the readout, end to end through train.py.
CLASSIFIER_SMOKE_GOLDEN = {
    "train/loss": 4.336706,
    "test/trained_1shot": 0.353333,
    "test/trained_5shot": 0.520000,
    "test/random_init_1shot": 0.286667,
    "test/random_init_5shot": 0.446667,
}


def test_the_classifier_glyphs_smoke_run_gives_the_pinned_metrics(tmp_path) -> None:
    from conftest import run_metrics, run_train, smoke_overrides

    proc = run_train(["experiment=classifier_glyphs", *smoke_overrides("classifier_glyphs")], tmp_path)
    metrics = run_metrics(proc, "classifier")
    got = {key: round(metrics[key], 6) for key in CLASSIFIER_SMOKE_GOLDEN}
    assert got == pytest.approx(CLASSIFIER_SMOKE_GOLDEN, abs=2e-6), got
