"""Mean and 95% confidence interval over tasks/episodes (normal approximation, as few-shot papers report)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def mean_ci95(values: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """(mean, half-width of the 95% CI) = (x̄, 1.96·s/√n)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        return math.nan, math.nan
    if x.numel() == 1:
        return float(x[0]), 0.0
    return float(x.mean()), float(1.96 * x.std(unbiased=True) / math.sqrt(x.numel()))
