"""Host-made tensors (noise from seeded CPU generators) onto the device without making the host wait.

The noise of every step is drawn on the CPU from a seeded `torch.Generator`, so that every device gets the same
numbers (the CPU figures, and GPU runs that reproduce them). Copying it from ordinary (pageable) host memory makes
the host wait until the GPU has finished everything queued before the copy, once per copy; from pinned memory the
copy is queued like a kernel and the host goes on. Why pinned buffers rather than drawing on the device from a
seeded CUDA generator: a CUDA generator gives other numbers than the CPU one (a GPU run could no longer reproduce a
CPU run's samples), and every seeded generator of the code would need a twin per device.
"""

from __future__ import annotations

import torch


def host_to_device(host: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`host` (a CPU tensor) on `device` (and in `dtype`). To a CUDA device through pinned memory, asynchronously:
    torch's caching host allocator keeps the pinned block until the copy has run. Elsewhere `Tensor.to`, unchanged
    (on the CPU no copy at all)."""
    device = torch.device(device)
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    return host.to(device=device, dtype=dtype)
