"""Opt-in `model.speed` of the UNet stage (issue 31, fault 8): channels_last and torch.compile, both off by default.

channels_last changes only how the weights are laid out: the held-out loss is the eager NCHW one up to float
rounding. compile is checked to be applied (through torch's public `nn.Module.compile`) without compiling on the
CPU, which would take longer than the rest of the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from metadiff.store import Artifact
from test_precision_paths import TINY_UNET_OVERRIDES, ZOO, _stage, write_upstreams

UNET = [*ZOO, "model.grid.n=2", "model.grid.steps=2", *(f"model.unet.{k}={v}" for k, v in TINY_UNET_OVERRIDES)]


@pytest.fixture(scope="module")
def glyph_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speed-root")


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Artifact]:
    return write_upstreams(tmp_path_factory.mktemp("speed-upstreams"))


def _heldout_loss(root: Path, run_dir: Path, *speed: str) -> tuple[float, torch.nn.Module]:
    torch.manual_seed(0)  # the same initial UNet
    data, module = _stage("diffusion_unet_glyphs", [*UNET, *speed], root, {})
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        fast_dev_run=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    trainer.test(module, datamodule=data, verbose=False)
    return float(trainer.callback_metrics["test/heldout_loss"]), module


def test_speed_options_are_off_by_default(glyph_root: Path, tmp_path: Path) -> None:
    _, module = _heldout_loss(glyph_root, tmp_path)
    assert not module.speed.compile and not module.speed.channels_last
    assert module.denoiser.unet.down_blocks[0].resnets[0].conv1.weight.is_contiguous()


def test_channels_last_gives_the_eager_loss(glyph_root: Path, tmp_path: Path) -> None:
    eager, _ = _heldout_loss(glyph_root, tmp_path / "a")
    nhwc, module = _heldout_loss(glyph_root, tmp_path / "b", "model.speed.channels_last=true")
    weight = module.denoiser.unet.down_blocks[0].resnets[0].conv1.weight  # 8 input channels (conv_in's 1 is both)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert nhwc == pytest.approx(eager, rel=1e-5)


def _record_compiles(monkeypatch: pytest.MonkeyPatch) -> tuple[list[Callable], list[Callable]]:
    """torch.compile replaced by a recorder that compiles nothing: (what was compiled, what the compiled calls ran)."""
    compiled: list[Callable] = []
    calls: list[Callable] = []

    def fake_compile(fn: Callable, *args: object, **kwargs: object) -> Callable:
        compiled.append(fn)

        def run(*a: object, **k: object) -> object:
            calls.append(fn)
            return fn(*a, **k)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    return compiled, calls


def test_compile_is_applied_when_asked(glyph_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled, calls = _record_compiles(monkeypatch)
    _, module = _heldout_loss(glyph_root, tmp_path, "model.speed.compile=true")
    assert [fn.__self__ for fn in compiled] == [module.denoiser.unet]  # once, the diffusers UNet's call
    assert calls, "the stage's forward passes did not go through the compiled call"
    assert all(not k.startswith("_orig_mod") for k in module.denoiser.state_dict())  # the checkpoint keys stay


def test_dfml_applies_both_to_the_zoo_members_it_samples(
    glyph_root: Path, upstreams: dict[str, Artifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled, _ = _record_compiles(monkeypatch)
    _, module = _stage(
        "dfml_glyphs",
        ["model.speed.compile=true", "model.speed.channels_last=true"],
        glyph_root,
        {"zoo": upstreams["zoo"]},
    )
    members = [m.unet for m in module.zoo.models]
    assert [fn.__self__ for fn in compiled] == members
    assert all(
        m.down_blocks[0].resnets[0].conv1.weight.is_contiguous(memory_format=torch.channels_last) for m in members
    )
