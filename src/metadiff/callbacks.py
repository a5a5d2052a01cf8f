"""Callbacks of our own: the NaN/inf guard every run has, the in-place EMA, and two drills for reliability tests (`KillAfterBatches`
kills the process like `kill -9`; `PoisonWeights` makes the next loss NaN)."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from metadiff.errors import UserError

PHASES = ("train", "validation", "test", "predict")


class KillAfterBatches(pl.Callback):
    """SIGKILL this process after `after` batches of `phase`: nothing is flushed or cleaned up, as in a crash or a
    pre-empted job, so what survives on disk is exactly what a real kill would leave."""

    def __init__(self, after: int, phase: str = "train"):
        if phase not in PHASES:
            raise ValueError(f"phase '{phase}' is not one of {PHASES}")
        self.after, self.phase, self.seen = after, phase, 0

    def _count(self) -> None:
        self.seen += 1
        if self.seen >= self.after:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.phase == "train":
            self._count()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.phase == "validation":
            self._count()

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.phase == "test":
            self._count()

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.phase == "predict":
            self._count()


class TrainingDivergedError(UserError, FloatingPointError):
    """A loss became NaN or inf: the run stops at once instead of training on garbage for hours."""


class StopOnNonFiniteLoss(pl.Callback):
    """Raise `TrainingDivergedError` naming the stage, task, epoch, step and batch the moment a loss that is about to
    be back-propagated is not finite (before the optimiser step, so the weights are still the last finite ones).

    Lightning's own guards do not fit: `detect_anomaly` slows every backward, and `EarlyStopping(check_finite)`
    watches one logged metric at validation time only. `on_before_backward` sees every loss of automatic and manual
    optimisation (`manual_backward` calls it too).

    Under DDP every rank takes part in the decision (one all-gather of a per-rank code per backward): a rank whose
    loss alone went non-finite must not raise by itself, or the others sit in the gradient all-reduce until NCCL's
    timeout (gloo: a "Connection closed by peer" traceback). Every rank raises the same line, naming the ranks."""

    FINITE, INF, NAN = 0, 1, 2

    def __init__(self, stage: str, task_name: str):
        self.stage, self.task_name = stage, task_name
        self.batch_idx = -1

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batch_idx = batch_idx

    def _code(self, loss: torch.Tensor) -> torch.Tensor:
        """FINITE, INF or NAN for this rank's loss, as a tensor on the loss's device (no host sync here)."""
        loss = loss.detach()
        return torch.where(
            torch.isnan(loss).any(), self.NAN, torch.where(torch.isfinite(loss).all(), self.FINITE, self.INF)
        )

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        code = self._code(loss)
        if trainer.world_size > 1:
            codes = trainer.strategy.all_gather(code).flatten().tolist()  # every rank, in rank order
        else:
            codes = [int(code)]
        if max(codes) == self.FINITE:
            return
        value = "nan" if self.NAN in codes else "inf"
        where = ""
        if len(codes) > 1:
            bad = [rank for rank, c in enumerate(codes) if c != self.FINITE]
            where = f" on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of {len(codes)}"
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        resume = f"; last good checkpoint: {last}" if last.is_file() else ""
        raise TrainingDivergedError(
            f"stage '{self.stage}' ({self.task_name}): the training loss is {value}{where} at epoch "
            f"{trainer.current_epoch}, global step {trainer.global_step}, batch {self.batch_idx}; lower the learning "
            f"rate or check the inputs{resume}"
        )


class PoisonWeights(pl.Callback):
    """Drill for the NaN guard: after `after` training batches, set one weight to NaN (as a bad update would), on
    every rank (`rank: null`) or on one rank only (the DDP case where a single rank's loss goes non-finite)."""

    def __init__(self, after: int, rank: int | None):
        self.after, self.rank, self.seen = after, rank, 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        self.seen += 1
        if self.seen == self.after and self.rank in (None, trainer.global_rank):
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad and p.is_floating_point()).fill_(float("nan"))


class RestoreRNGStates(pl.Callback):
    """Save the global RNG states (torch, CUDA, NumPy, Python) in every checkpoint and restore them on resume.

    Why: Lightning restores weights, optimisers and loop counters but not the global generators, so a resumed run
    would shuffle its next epoch (RandomSampler), draw dropout and noise differently from the run it continues.
    Stages that derive per-step randomness from (seed, step) do not need this; the rest do. Stored as plain tensors
    and lists so that checkpoints stay loadable with `weights_only=True`. Under DDP the checkpoint holds rank 0's
    states (ranks differ only in what they draw from their own generator)."""

    def state_dict(self) -> dict[str, Any]:
        # the global RandomState is an MT19937, whose legacy state (get_state's default) is this tuple, not a dict
        mt_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
        kind, keys, pos, has_gauss, cached = mt_state
        version, internal, gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": [version, list(internal), gauss],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


class _EMAUpdate:
    """torch's `get_ema_multi_avg_fn(decay)` as a picklable object: the callback is copied by pickling (Lightning's
    spawn launcher sends callbacks to its ranks this way; `copy.deepcopy` too), and torch's closure cannot be."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def __call__(self, ema: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        get_ema_multi_avg_fn(self.decay)(ema, current, num_averaged)


class InPlaceEMA(WeightAveraging):
    """Lightning's `EMAWeightAveraging` schedule (start step, every n steps) with torch's in-place foreach EMA
    (`get_ema_multi_avg_fn`) instead of the per-tensor `get_ema_avg_fn` that `EMAWeightAveraging` hard-wires.

    Why by hand: the per-tensor form allocates three temporaries of every weight at each update, the module's frozen
    upstream nets included (HyperLDM holds an 8.6M-parameter HNET): 37 ms against 5 ms per update for that module
    on 2 CPU cores, the same averages to 3e-8. `WeightAveraging` is Lightning's public base for custom averaging."""

    def __init__(self, decay: float, update_every_n_steps: int, update_starting_at_step: int, use_buffers: bool = True):
        super().__init__(use_buffers=use_buffers, multi_avg_fn=_EMAUpdate(decay))
        if not 0.0 < decay < 1.0 or update_every_n_steps < 1 or update_starting_at_step < 0:
            raise ValueError(
                f"callbacks.ema: decay {decay} must be in (0, 1), update_every_n_steps "
                f"{update_every_n_steps} >= 1 and update_starting_at_step {update_starting_at_step} >= 0"
            )
        self.update_every_n_steps, self.update_starting_at_step = update_every_n_steps, update_starting_at_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Step-based only, as the EMA configs use it: from `update_starting_at_step`, every n-th step."""
        return (
            step_idx is not None
            and step_idx >= self.update_starting_at_step
            and step_idx % self.update_every_n_steps == 0
        )
