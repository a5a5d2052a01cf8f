"""One-line progress reports for runs whose stdout is a file or a pipe (a SLURM log, `> run.log`).

Why: Lightning's progress bar redraws one terminal line with carriage returns; written to a file it shows only its
final state once the loop ends (Rich) or a wall of `\\r` fragments (TQDM), so a redirected 7-minute training showed
nothing between the model summary and the end. Off a terminal this callback logs instead, through the
`metadiff.progress` logger (so the lines also land in the run's `<task_name>.log`):

- at a batch end of any loop, at most one line per `every_s` seconds: task and stage, what runs (training,
  validating, testing, predicting; which loader when there are several), batch/batches, elapsed time, and while
  fitting also epoch/max, step/max steps, the stage's training readouts (the `train/` metrics it shows in the
  progress bar, e.g. `train/loss`) and the latest value of `metric` (the experiment's `optimized_metric`) if logged;
- one line per validation result (every `val*` metric), and one when training ends.

`run.py` turns Lightning's bar off when stdout is not a terminal; on a terminal the bar stays and this stays quiet.
Only global rank 0 reports.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)

MAX_EVERY_S = 60.0  # a redirected run reports at least once a minute (as long as its batches are shorter than that)


def stdout_is_terminal() -> bool:
    """Whether a person watches stdout live (Lightning's bar) or it goes to a file or pipe (progress lines)."""
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


def format_elapsed(seconds: float) -> str:
    """`h:mm:ss`, the way a person reads a wall-clock duration in a log."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _value(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _readouts(metrics: Mapping[str, Any], keys: list[str]) -> list[str]:
    out = []
    for key in keys:
        value = _value(metrics.get(key))
        if value is not None:
            out.append(f"{key} {value:.4g}")
    return out


class ProgressLines(pl.Callback):
    """Log a progress line at most every `every_s` seconds while batches run, and one line per validation result,
    when stdout is not a terminal (see the module docstring). `metric`: the validation metric worth watching (the
    experiment's `optimized_metric`), or None. `clock` is for tests (a fake clock instead of sleeping)."""

    def __init__(
        self,
        task_name: str,
        stage: str,
        every_s: float,
        metric: str | None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not 0 < every_s <= MAX_EVERY_S:
            raise ValueError(
                f"callbacks.progress.every_s={every_s}: must be in (0, {MAX_EVERY_S:g}] seconds, so a "
                f"redirected run reports at least once a minute"
            )
        self.task_name, self.stage, self.every_s, self.metric = task_name, stage, float(every_s), metric
        self.clock = clock
        self.active = not stdout_is_terminal()
        self._start: float | None = None
        self._last = 0.0
        self._max_steps: float | None = None

    # -- what a line says -------------------------------------------------------------------------------------------
    def _where(self, trainer: pl.Trainer, finished: bool = False) -> str:
        """`epoch e/E, step s/S`: the epoch running, or once training has ended the epochs it ran (Lightning counts
        an epoch cut short by `max_steps` as done)."""
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        current = trainer.current_epoch if finished else trainer.current_epoch + 1
        epoch = f"epoch {min(current, epochs) if epochs else current}" + (f"/{epochs}" if epochs else "")
        steps = self._max_steps
        step = f"step {trainer.global_step}" + (f"/{int(steps)}" if steps is not None and math.isfinite(steps) else "")
        return f"{epoch}, {step}"

    @staticmethod
    def _training_readouts(trainer: pl.Trainer) -> list[str]:
        """The `train/` metrics the stage shows in Lightning's progress bar (`self.log(..., prog_bar=True)`)."""
        metrics = trainer.progress_bar_metrics
        return _readouts(metrics, [k for k in sorted(metrics) if k.startswith("train/")])

    def _elapsed(self) -> str:
        return format_elapsed(0.0 if self._start is None else self.clock() - self._start)

    def progress_line(self, trainer: pl.Trainer, doing: str, batch: int, batches: float) -> str:
        """One line: `<task> (<stage>) <doing>: batch b/B[, epoch e/E, step s/S] | h:mm:ss elapsed | readouts`."""
        total = f"/{int(batches)}" if math.isfinite(batches) else ""
        parts = [f"{self.task_name} ({self.stage}) {doing}: batch {batch}{total}"]
        parts.append(f"{self._elapsed()} elapsed")
        if doing.startswith(("training", "validating")):  # testing and predicting: no epochs, steps or losses
            parts[0] += f", {self._where(trainer)}"
            parts += self._training_readouts(trainer)
            if self.metric:
                parts += _readouts(trainer.callback_metrics, [self.metric])
        return " | ".join(parts)

    # -- when a line is due -----------------------------------------------------------------------------------------
    def due(self) -> bool:
        """True at most once per `every_s` seconds (the clock starts when the run's first loop is set up)."""
        now = self.clock()
        if self._start is None:
            self._start = self._last = now
        if now - self._last < self.every_s:
            return False
        self._last = now
        return True

    def _report(
        self, trainer: pl.Trainer, doing: str, batch_idx: int, per_loader: list[int | float], dataloader_idx: int = 0
    ) -> None:
        if not (self.active and trainer.is_global_zero and self.due()):
            return
        batches = float(per_loader[dataloader_idx]) if dataloader_idx < len(per_loader) else float("inf")
        if len(per_loader) > 1:  # e.g. the feature store's tables: say which one
            doing = f"{doing} loader {dataloader_idx + 1}/{len(per_loader)}"
        log.info("%s", self.progress_line(trainer, doing, batch_idx + 1, batches))

    # -- Lightning hooks --------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._start is None:
            self._start = self._last = self.clock()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # manual optimisation (dfml: two optimizers) counts a step per optimizer.step(), not per batch
        self._max_steps = (
            float(trainer.estimated_stepping_batches)
            if pl_module.automatic_optimization
            else (float(trainer.max_steps) if trainer.max_steps > 0 else None)
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._report(trainer, "training", batch_idx, [trainer.num_training_batches])

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, "validating", batch_idx, trainer.num_val_batches, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._report(trainer, "testing", batch_idx, trainer.num_test_batches, dataloader_idx)

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._report(trainer, "predicting", batch_idx, trainer.num_predict_batches, dataloader_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.active and trainer.is_global_zero) or trainer.sanity_checking:
            return
        keys = sorted(k for k in trainer.callback_metrics if k.startswith("val"))
        results = ", ".join(_readouts(trainer.callback_metrics, keys)) or "no val metrics logged"
        log.info(
            "%s (%s) validation at %s | %s elapsed | %s",
            self.task_name,
            self.stage,
            self._where(trainer),
            self._elapsed(),
            results,
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active and trainer.is_global_zero:
            where = self._where(trainer, finished=True)
            log.info(
                "%s",
                " | ".join(
                    [
                        f"{self.task_name} ({self.stage}) training done: {where}",
                        f"{self._elapsed()} elapsed",
                        *self._training_readouts(trainer),
                    ]
                ),
            )
