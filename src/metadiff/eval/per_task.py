"""Per-task values gathered over an evaluation epoch (all ranks), reported as mean +- 95% CI."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torchmetrics import CatMetric

from metadiff.eval.stats import mean_ci95


class PerTaskValues(nn.Module):
    """Named `CatMetric`s: `update(name, values)` per batch, `compute()` the [n_tasks] tensors, then reset.

    `sync`: gather the values of every DDP rank at compute (evaluation sharded over the ranks, e.g. image episodes);
    False where every rank evaluates all tasks (`metadiff.data.samplers.EveryRankSampler`), where a gather would
    count each task once per rank."""

    def __init__(self, names: list[str], sync: bool):
        super().__init__()
        self.metrics = nn.ModuleDict({self._key(name): CatMetric(sync_on_compute=sync) for name in names})
        self.names = list(names)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_dot_")  # module names may not contain "." (e.g. "cfg1.5")

    def _metric(self, name: str) -> CatMetric:
        return cast(CatMetric, self.metrics[self._key(name)])  # the ModuleDict holds only the CatMetrics built above

    def update(self, name: str, values: torch.Tensor) -> None:
        self._metric(name).update(values.detach().float())

    def compute(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for name in names or self.names:
            metric = self._metric(name)
            out[name] = metric.compute().cpu() if metric.update_count else torch.empty(0)
            metric.reset()
        return out


def ci_report(prefix: str, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """{prefix/name: mean, prefix/name_ci95: half-width} for every non-empty value list."""
    out = {}
    for name, per_task in values.items():
        if per_task.numel():
            out[f"{prefix}/{name}"], out[f"{prefix}/{name}_ci95"] = mean_ci95(per_task)
    return out


def paired_report(prefix: str, values: dict[str, torch.Tensor], pairs: dict[str, tuple[str, str]]) -> dict[str, float]:
    """{prefix/name: mean of a - b, prefix/name_ci95: half-width} per pair (a, b) of value lists over the same tasks
    in the same order: the per-task difference, whose CI is what says whether a beats b (two unpaired CIs that
    overlap can hide a consistent per-task gain)."""
    out = {}
    for name, (a, b) in pairs.items():
        if values[a].numel() and values[a].shape != values[b].shape:
            raise ValueError(f"paired '{name}': {a} has {values[a].numel()} tasks, {b} {values[b].numel()}")
        if values[a].numel():
            out[f"{prefix}/{name}"], out[f"{prefix}/{name}_ci95"] = mean_ci95(values[a] - values[b])
    return out
