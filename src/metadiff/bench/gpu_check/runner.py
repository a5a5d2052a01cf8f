"""Runs the check's sections one after another: each reports `ok`, `failed` (with its error in one line) or `skipped`
(with the reason), one failure never stops the others, and the JSON report is rewritten after every section, so a
run killed by a time limit still says what it measured."""

from __future__ import annotations

import logging
import resource
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metadiff.utils.io import write_json

log = logging.getLogger(__name__)


class Skipped(Exception):  # noqa: N818 - a section's honest "not here", not an error
    """Raised by a section that does not apply on this machine (e.g. NCCL with one device)."""


class PartialFailure(Exception):  # noqa: N818 - carries what was measured before the failure
    """Some parts of a section failed: their errors in one line, and the results of the other parts."""

    def __init__(self, message: str, results: dict[str, Any]):
        super().__init__(message)
        self.results = results


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[dict[str, Any]], dict[str, Any]]  # gets the results so far, returns its own


def one_line(error: BaseException) -> str:
    """An error as one line: its type, its message's first line, and where it was raised (file:line)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" [{Path(frames[-1].filename).name}:{frames[-1].lineno}]" if frames else ""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}{where}"


def run_sections(sections: list[Section], report: dict[str, Any], path: Path) -> dict[str, Any]:
    """Run `sections` in order into `report["sections"]`, writing `report` to `path` after each one."""
    results = report.setdefault("sections", {})
    for section in sections:
        start = time.perf_counter()
        log.info("gpu-check section '%s'", section.name)
        try:
            entry: dict[str, Any] = {"status": "ok", **section.run(results)}
        except Skipped as reason:
            entry = {"status": "skipped", "reason": str(reason)}
        except PartialFailure as partial:
            entry = {"status": "failed", "error": str(partial), **partial.results}
        except Exception as error:  # noqa: BLE001 - a failed section is a result; the others still run
            log.error("section '%s' failed:\n%s", section.name, traceback.format_exc())
            entry = {"status": "failed", "error": one_line(error)}
        entry["seconds"] = time.perf_counter() - start
        results[section.name] = entry
        write_json(path, report, sort_keys=False)  # in the order the sections ran
    return report


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """The section's peak memory in MiB: the CUDA allocator's peak within the block (reset at its start) and the
    process's peak resident set so far (ru_maxrss cannot be reset: on a CPU it is the run's peak up to this
    section), plus the largest child process (DataLoader workers)."""
    out: dict[str, float] = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        yield out
    finally:
        if device == "cuda":
            out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["peak_child_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """(seconds, result) of `fn`, with the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
