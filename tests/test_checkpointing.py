"""Checkpoint I/O: what the default callbacks write per epoch (`metadiff.checkpointing.SpacedCheckpoint`) and that a
stage's frozen upstream nets stay out of its checkpoints yet come back on resume (`Stage.frozen_upstream_nets`).

The byte counts come from a CheckpointIO plugin that counts what Lightning writes, so they measure the files a run
really produces, whatever callback wrote them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from metadiff.callbacks import InPlaceEMA
from metadiff.checkpointing import SpacedCheckpoint
from metadiff.stages.base import Stage

CONF = Path(__file__).resolve().parents[1] / "conf"
EPOCHS = 6


class CountingIO(TorchCheckpointIO):
    """Lightning's own checkpoint writer, counting the files and bytes it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.files, self.bytes = 0, 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        self.files, self.bytes = self.files + 1, self.bytes + Path(path).stat().st_size


class Tiny(Stage, name="tiny_checkpoint_test"):
    """A trainable net beside a frozen one that stands for an upstream artifact's net (e.g. HyperLDM's HNET)."""

    def __init__(self, declare_frozen: bool = True, train_upstream: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.upstream_net = torch.nn.Linear(64, 64).requires_grad_(train_upstream)
        self.net = torch.nn.Linear(4, 1)
        self.declare_frozen, self.train_upstream = declare_frozen, train_upstream

    def frozen_upstream_nets(self) -> tuple[str, ...]:
        return ("upstream_net",) if self.declare_frozen else ()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.net(batch) ** 2).mean() + 0 * self.upstream_net.weight.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.net.parameters()) + (list(self.upstream_net.parameters()) if self.train_upstream else [])
        return torch.optim.SGD(params, lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4)

    def write_artifact(self, directory: Path) -> None:
        raise AssertionError("not published in these tests")


def _trainer(tmp: Path, callbacks: list[pl.Callback], io: CountingIO, epochs: int = EPOCHS) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp,
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        plugins=[io],
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _default_checkpoint_callback(tmp: Path) -> pl.Callback:
    """`callbacks.model_checkpoint` exactly as conf/callbacks/default.yaml configures every run's."""
    node = OmegaConf.load(CONF / "callbacks" / "default.yaml").model_checkpoint
    node.dirpath = str(tmp / "checkpoints")
    return hydra.utils.instantiate(node)


def test_the_default_callbacks_do_not_write_a_checkpoint_every_epoch(tmp_path: Path) -> None:
    """Six sub-second epochs with the default config: at most one checkpoint (Lightning's per-epoch ModelCheckpoint
    with save_last and top-1, the config before, wrote two full files every epoch: 12 here)."""
    io = CountingIO()
    _trainer(tmp_path, [_default_checkpoint_callback(tmp_path)], io).fit(Tiny())
    assert io.files <= 1, f"{io.files} checkpoint files written in {EPOCHS} short epochs"


def test_spacing_follows_the_interval_and_the_io_budget(tmp_path: Path) -> None:
    every = CountingIO()
    _trainer(
        tmp_path / "a",
        [SpacedCheckpoint(min_interval_s=0, max_io_fraction=1.0, dirpath=tmp_path / "a" / "ckpt")],
        every,
    ).fit(Tiny())
    assert every.files == EPOCHS  # due at every epoch end: one file each, not two
    last = tmp_path / "a" / "ckpt" / "last.ckpt"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"] and not last.is_symlink()
    assert torch.load(last, weights_only=False)["epoch"] == EPOCHS - 1
    # a budget so small that the first write uses it up for the rest of training
    once = CountingIO()
    _trainer(
        tmp_path / "b",
        [SpacedCheckpoint(min_interval_s=0, max_io_fraction=1e-9, dirpath=tmp_path / "b" / "ckpt")],
        once,
    ).fit(Tiny())
    assert once.files == 1
    never = CountingIO()
    _trainer(
        tmp_path / "c",
        [SpacedCheckpoint(min_interval_s=3600, max_io_fraction=1.0, dirpath=tmp_path / "c" / "ckpt")],
        never,
    ).fit(Tiny())
    assert never.files == 0


def _weights(checkpoint: dict[str, Any]) -> set[str]:
    return set(checkpoint["state_dict"]) | set(checkpoint.get("current_model_state", {}))


def test_frozen_upstream_nets_stay_out_of_checkpoints_and_come_back_on_resume(tmp_path: Path) -> None:
    """With the EMA on (it keeps a second copy of every weight in the checkpoint), declared frozen nets are in
    neither copy; a fresh module resumes from the file with Lightning's strict load and its EMA intact."""

    def ema() -> InPlaceEMA:
        return InPlaceEMA(decay=0.9, update_every_n_steps=1, update_starting_at_step=0)

    sizes = {}
    for declared in (False, True):
        io, run = CountingIO(), tmp_path / f"declared_{declared}"
        ckpt = SpacedCheckpoint(min_interval_s=0, max_io_fraction=1.0, dirpath=run)
        _trainer(run, [ckpt, ema()], io, epochs=2).fit(Tiny(declare_frozen=declared))
        saved = torch.load(run / "last.ckpt", weights_only=False)
        sizes[declared] = io.bytes / io.files
        has_frozen = any(k.startswith("upstream_net.") for k in _weights(saved))
        assert has_frozen is not declared, sorted(_weights(saved))
        assert "current_model_state" in saved  # the EMA's second copy was there to be pruned
    assert sizes[True] < 0.5 * sizes[False], sizes  # the frozen 64x64 net was most of the checkpoint

    resumed = Tiny()
    run = tmp_path / "declared_True"
    io = CountingIO()
    trainer = _trainer(
        run, [SpacedCheckpoint(min_interval_s=0, max_io_fraction=1.0, dirpath=run / "again"), ema()], io, epochs=3
    )
    trainer.fit(resumed, ckpt_path=str(run / "last.ckpt"))
    assert trainer.current_epoch == 3 and io.files == 1  # resumed after epoch 2 and trained epoch 3
    torch.testing.assert_close(resumed.upstream_net.weight, Tiny().upstream_net.weight, rtol=0, atol=0)


def test_a_frozen_net_that_an_optimizer_trains_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="upstream_net.weight is declared a frozen upstream net"):
        _trainer(
            tmp_path,
            [SpacedCheckpoint(min_interval_s=0, max_io_fraction=1.0, dirpath=tmp_path)],
            CountingIO(),
            epochs=1,
        ).fit(Tiny(train_upstream=True))
