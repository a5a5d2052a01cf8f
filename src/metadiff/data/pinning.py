"""Whether a DataLoader pins its batches (`data.pin_memory` in conf/data).

Pinned (page-locked) host batches let Lightning's copy to a CUDA device run asynchronously (it passes
`non_blocking=True`), overlapped with the step; a pageable batch makes the host wait for the GPU's queue at every
copy. With any other accelerator pinning only costs a copy, so the setting applies when the batches go to CUDA.
"""

from __future__ import annotations

import lightning.pytorch as pl


def pin_memory(trainer: pl.Trainer | None, wanted: bool) -> bool:
    """`wanted` (the config's `data.pin_memory`) and the trainer's device is a CUDA one."""
    return bool(wanted) and trainer is not None and trainer.strategy.root_device.type == "cuda"
