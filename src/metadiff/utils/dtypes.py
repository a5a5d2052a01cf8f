"""The run's full precision for tensors stored or computed in less (fp16 features, bf16 autocast outputs)."""

from __future__ import annotations

import torch


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """`x` in the run's full precision: float32, or float64 under Lightning's `trainer.precision=64-true`, which sets
    torch's default dtype inside the step hooks. `.float()` would send a float64 run back to float32 in mid-graph
    (the float64 runs show that 2 ranks compute what 1 process does: tests/test_parity.py)."""
    return x.to(torch.get_default_dtype())
