"""Section 1: what the machine and its libraries are (the numbers of the other sections mean little without it)."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

import lightning
import torch


def environment(device: str, work: Path) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    nccl = None
    if cuda and torch.distributed.is_nccl_available():
        version = torch.cuda.nccl.version()  # a tuple (major, minor, patch); an int in older torch
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    out: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": nccl,
        "cuda_devices": torch.cuda.device_count() if cuda else 0,
        "device_name": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "bf16_supported": bool(torch.cuda.is_bf16_supported()) if cuda else _cpu_bf16(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "work_dir_free_gib": shutil.disk_usage(work).free / 2**30,
        "shm_free_gib": shutil.disk_usage("/dev/shm").free / 2**30 if Path("/dev/shm").exists() else None,
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        out["device_memory_gib"] = props.total_memory / 2**30
        out["compute_capability"] = f"{props.major}.{props.minor}"
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX); autocast runs either way, slowly without."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None
