"""Tensor files (weights, pseudo data, caches) that read back on any machine, whatever device wrote them.

`torch.save` records each tensor's device in the file and `torch.load` restores it there: a zoo saved from a GPU
run would come back on `cuda:0` of every rank before Lightning places anything (13 x 484 MB at the spec's size), and
a CPU-only reader of it would fail. So writers save CPU tensors and readers load onto the CPU; Lightning moves the
modules to their device afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device


def cpu_copy(obj: Any) -> Any:
    """`obj` (a tensor, or dicts / lists / tuples of them) with every tensor on the CPU; tensors already there are
    not copied. A state dict keeps its `_metadata` (the per-module versions `load_state_dict` reads), which
    Lightning's collection walk leaves behind."""
    out = move_data_to_device(obj, torch.device("cpu"))
    if hasattr(obj, "_metadata"):
        out._metadata = obj._metadata
    return out


def save_tensors(obj: Any, path: Path) -> None:
    """`torch.save` of `obj` with its tensors on the CPU."""
    torch.save(cpu_copy(obj), path)


def load_tensors(path: Path) -> Any:
    """A tensor file written by any run (GPU or CPU) onto the CPU, tensors only (`weights_only`: no code)."""
    return torch.load(path, map_location="cpu", weights_only=True)
