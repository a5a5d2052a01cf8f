"""bf16 where the trainer asks for it, fp32 where bf16 breaks the numbers (issue 31, fault 7).

1. The adapter's logits are 100 x a cosine: from a bf16 `bmm` they are off by ~0.4 (bf16 keeps 8 bits), the same
   fault the Conv4 prototype readout had. They are computed in fp32 under autocast too.
2. Lightning runs only the `*_step` hooks under the trainer's precision; the zoo's sampling outside them (dfml's
   pseudo-data generation, the zoo check, the sample grids) must run under it too: with `bf16-mixed` every UNet
   forward of those stages computes in bf16."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.diffusion.zoo import DiffusionZoo
from metadiff.nets.adapter import AdapterShape, adapter_logits
from metadiff.nets.unet import ImageDenoiser
from metadiff.store import Artifact

TINY_UNET_OVERRIDES = (
    ("block_out_channels", "[8,8]"),
    ("layers_per_block", "1"),
    ("down_block_types", "[DownBlock2D,DownBlock2D]"),
    ("up_block_types", "[UpBlock2D,UpBlock2D]"),
    ("norm_num_groups", "4"),
    ("attention_head_dim", "null"),
)
TINY_UNET = {
    "block_out_channels": [8, 8],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D"] * 2,
    "up_block_types": ["UpBlock2D"] * 2,
    "norm_num_groups": 4,
}


def _identity_adapter_inputs(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Weights of the identity adapter (W2 = b2 = 0: u = x, exactly CLIP zero-shot) and features that bf16 holds
    exactly (multiples of 1/8 below 16): under autocast u is then the same in bf16 and fp32, and what differs is the
    precision of the cosine alone."""
    gen = torch.Generator().manual_seed(seed)
    shape, tasks = AdapterShape(embed_dim=64, hidden_dim=16), 4
    weights = {name: torch.randn(tasks, *size, generator=gen) for name, size in shape.sizes.items()}
    weights["W2"].zero_()
    weights["b2"].zero_()
    x = torch.randint(-64, 64, (tasks, 10, 64), generator=gen).float() / 8
    answers = torch.randint(-64, 64, (tasks, 6, 64), generator=gen).float() / 8
    return weights, x, answers


def test_adapter_logits_are_fp32_under_bf16_autocast() -> None:
    weights, x, answers = _identity_adapter_inputs()
    fp32 = adapter_logits(weights, x, answers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = adapter_logits(weights, x, answers)
    assert mixed.dtype == torch.float32
    # a bf16 bmm of the unit vectors is off by up to ~0.4 here; fp32 agrees to float rounding
    torch.testing.assert_close(mixed, fp32, rtol=0, atol=1e-4)


def test_hyperclip_logits_are_fp32_under_bf16_autocast() -> None:
    from metadiff.nets.hyperclip import HyperCLIPEncoder

    torch.manual_seed(0)
    encoder = HyperCLIPEncoder(in_dim=32, embed_dim=64, hidden=[32])
    x, text = torch.randn(8, 32), torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embedded = encoder(x)  # the MLP in bf16, as autocast wants it
        logits = encoder.logits(x, text)
    expected = encoder.logit_scale * embedded.float() @ torch.nn.functional.normalize(text, dim=-1).T
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# the zoo's sampling outside the *_step hooks, on a tiny rendered glyph set (16 classes, 6/5/5) with tiny UNets

SMALL_GLYPHS = [
    "data.source.render.n_classes=16",
    "data.source.render.images_per_class=20",
    "data.source.split_sizes=[6,5,5]",
    "data.train.eval_batch_size=4",
]
ZOO = ["zoo.n_models=2", "zoo.classes_per_model=3"]
GLYPH_BACKBONE = {"name": "conv4", "in_channels": 1, "mean": [0.177], "std": [0.345], "width": 8, "depth": 2}


def _tiny_member(k: int) -> ImageDenoiser:
    torch.manual_seed(k)
    return ImageDenoiser(32, 1, TINY_UNET).eval()


@pytest.fixture(scope="module")
def glyph_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One root for the module's runs: the small glyph set is rendered once."""
    return tmp_path_factory.mktemp("bf16-root")


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Artifact]:
    return write_upstreams(tmp_path_factory.mktemp("bf16-upstreams"))


def write_upstreams(root: Path) -> dict[str, Artifact]:
    """Two tiny UNet members (classes 0-2, 3-5), their zoo and a judge of the 6 meta-train classes, written as the
    stages write them."""
    from metadiff.stages.classifier import ImageClassifier
    from metadiff.stages.diffusion_zoo import save_zoo

    found: dict[str, Artifact] = {}
    schedule = {"name": "cosine", "n_timesteps": 1000}
    for k in range(2):
        path = root / f"unet{k}"
        path.mkdir()
        model = _tiny_member(k)
        torch.save(model.state_dict(), path / "unet.pt")
        (path / "unet.json").write_text(
            json.dumps({"config": model.config, "schedule": schedule, "classes": [3 * k, 3 * k + 1, 3 * k + 2]})
        )
        found[f"unet{k}"] = Artifact(path, {"fingerprint": f"unet{k}"})
    judge = ImageClassifier(GLYPH_BACKBONE, 6, "batchnorm")
    (root / "judge").mkdir()
    torch.save(judge.state_dict(), root / "judge" / "classifier.pt")
    (root / "judge" / "classifier.json").write_text(json.dumps(judge.spec))
    found["judge"] = Artifact(root / "judge", {"fingerprint": "judge"})
    zoo = DiffusionZoo(
        [_tiny_member(k) for k in range(2)],
        NoiseSchedule.make(**schedule),
        schedule,
        [{"class": c, "model": c // 3, "local": c % 3} for c in range(6)],
        [str(c) for c in range(6)],
        image_size=32,
        channels=1,
    )
    (root / "zoo").mkdir()
    save_zoo(zoo, root / "zoo")
    found["zoo"] = Artifact(root / "zoo", {"fingerprint": "zoo"})
    return found


def _stage(experiment: str, overrides: list[str], root: Path, upstream: dict[str, Artifact]) -> tuple[Any, Any]:
    """The experiment's datamodule and stage module, instantiated from the real config tree as a run does."""
    from conftest import compose_config
    from metadiff.pipeline import instantiate_with_upstream

    cfg = compose_config([f"experiment={experiment}", *SMALL_GLYPHS, *overrides], root, root / "run")
    return instantiate_with_upstream(cfg.data, upstream), instantiate_with_upstream(cfg.model, upstream)


def _unet_dtypes(run: Callable[[], object]) -> set[torch.dtype]:
    """The dtypes every UNet forward inside `run()` computed its output in (a global forward hook, torch's public
    `register_module_forward_hook`)."""
    from diffusers import UNet2DModel

    seen: set[torch.dtype] = set()

    def record(module: torch.nn.Module, args: object, output: Any) -> None:
        if isinstance(module, UNet2DModel):
            seen.add(output.sample.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run()
    finally:
        handle.remove()
    return seen


def _bf16_trainer(root: Path) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        fast_dev_run=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


def test_unet_sample_grid_runs_in_bf16_when_the_trainer_is_bf16(glyph_root: Path, tmp_path: Path) -> None:
    data, module = _stage(
        "diffusion_unet_glyphs",
        [*ZOO, "model.grid.n=2", "model.grid.steps=2", *(f"model.unet.{k}={v}" for k, v in TINY_UNET_OVERRIDES)],
        glyph_root,
        {},
    )
    seen = _unet_dtypes(lambda: _bf16_trainer(tmp_path).test(module, datamodule=data, verbose=False))
    assert seen == {torch.bfloat16}, seen  # the held-out loss (test_step) and the grid (on_test_epoch_end)
    assert (tmp_path / "samples.png").is_file()


def test_zoo_check_runs_in_bf16_when_the_trainer_is_bf16(
    glyph_root: Path, tmp_path: Path, upstreams: dict[str, Artifact]
) -> None:
    data, module = _stage(
        "diffusion_zoo_glyphs",
        [
            *ZOO,
            "model.check.n_per_model=2",
            "model.check.batch_size=2",
            "model.check.steps=2",
            "model.grid.n_per_model=2",
        ],
        glyph_root,
        {k: v for k, v in upstreams.items() if k != "zoo"},
    )
    seen = _unet_dtypes(lambda: _bf16_trainer(tmp_path).test(module, datamodule=data, verbose=False))
    assert seen == {torch.bfloat16}, seen


def test_dfml_pseudo_data_is_generated_in_bf16_when_the_trainer_is_bf16(
    glyph_root: Path, tmp_path: Path, upstreams: dict[str, Artifact]
) -> None:
    data, module = _stage(
        "dfml_glyphs",
        [
            "model.generation.per_class=2",
            "model.generation.batch_size=6",
            "model.generation.steps=2",
            "model.episodes.per_batch=1",
            "model.episodes.n_query=1",
            "data.episodes.n_val_episodes=1",
            "data.episodes.episodes_per_batch=1",
        ],
        glyph_root,
        {"zoo": upstreams["zoo"]},
    )
    seen = _unet_dtypes(lambda: _bf16_trainer(tmp_path).fit(module, datamodule=data))
    assert seen == {torch.bfloat16}, seen  # every UNet forward of dfml is the pseudo-data generation
    assert module.pseudo is not None and len(module.pseudo) == 12
