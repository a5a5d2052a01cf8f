"""Files as a GPU run writes them, on a machine without one.

`torch.save` records each storage's device in the file ("cuda:0" for a tensor on the first GPU) and `torch.load`
without `map_location` restores it there, so a CPU-only reader of a GPU-written file fails with "Attempting to
deserialize object on a CUDA device". `written_as_on_gpu()` makes the CPU storages saved inside it carry the tag
"cuda:0", through torch's public registry of storage taggers (`torch.serialization.register_package`): the tagger
is registered once per process and tags only while the context is open, so nothing else in the session changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

_tagging = False


def _cuda_tag(storage: torch.UntypedStorage) -> str | None:
    return "cuda:0" if _tagging and storage.device.type == "cpu" else None


def _leave_to_others(storage: torch.UntypedStorage, location: str) -> None:
    return None  # loading is left to torch's own deserializers (the CUDA one raises on a CPU-only machine)


# priority -1: before torch's own CPU tagger (10), so it decides while the context is open
torch.serialization.register_package(-1, _cuda_tag, _leave_to_others)


@contextlib.contextmanager
def written_as_on_gpu() -> Iterator[None]:
    """Every CPU tensor saved inside is recorded as living on cuda:0."""
    global _tagging
    _tagging = True
    try:
        yield
    finally:
        _tagging = False


def saved_locations(path: Path) -> set[str]:
    """The device tags of the storages in a torch file, read without restoring them anywhere."""
    seen: set[str] = set()

    def record(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        seen.add(location)
        return storage

    torch.load(path, map_location=record, weights_only=True)
    return seen
