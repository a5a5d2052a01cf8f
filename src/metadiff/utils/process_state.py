"""Process-wide settings that one stage run changes and a run nested in another must give back.

An upstream stage is built in the process of the stage that needs it. `metadiff.run.train` and Lightning set
process-wide state for the run they start (matmul precision, global RNGs, deterministic algorithms, cuDNN flags,
threads, seed variables); without this the parent stage would go on with whatever its upstream left behind.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Environment variables that Lightning sets per run: the seed its DataLoader workers derive theirs from, and the
# cuBLAS workspace that `Trainer(deterministic=True)` needs.
RUN_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")


@dataclass(frozen=True)
class ProcessState:
    """A snapshot of the process-wide settings a run may change."""

    matmul_precision: str
    num_threads: int
    deterministic: bool
    deterministic_warn_only: bool
    cudnn_benchmark: bool
    cudnn_deterministic: bool
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    numpy_rng: Any
    python_rng: Any
    environ: dict[str, str | None]

    @classmethod
    def capture(cls) -> ProcessState:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        return cls(
            matmul_precision=torch.get_float32_matmul_precision(),
            num_threads=torch.get_num_threads(),
            deterministic=torch.are_deterministic_algorithms_enabled(),
            deterministic_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            cudnn_deterministic=torch.backends.cudnn.deterministic,
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if cuda else None,
            numpy_rng=np.random.get_state(),
            python_rng=random.getstate(),
            environ={name: os.environ.get(name) for name in RUN_VARIABLES},
        )

    def restore(self) -> None:
        for name, value in self.environ.items():  # first: use_deterministic_algorithms reads CUBLAS_WORKSPACE_CONFIG
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.set_float32_matmul_precision(self.matmul_precision)
        if torch.get_num_threads() != self.num_threads:  # setting it re-creates the thread pool: only on a change
            torch.set_num_threads(self.num_threads)
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.deterministic_warn_only)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cudnn.deterministic = self.cudnn_deterministic
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        np.random.set_state(self.numpy_rng)
        random.setstate(self.python_rng)


@contextlib.contextmanager
def preserved_process_state() -> Iterator[None]:
    """Run the body (e.g. a nested stage run), then put the process-wide settings back as they were, also on error."""
    state = ProcessState.capture()
    try:
        yield
    finally:
        state.restore()
