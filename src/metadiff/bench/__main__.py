"""`python -m metadiff.bench --out bench [--only NAME ...]`: run benchmarks, write `<out>/<name>.json`, then
`<out>/summary.json` with every tracked ratio (from all result files in `<out>`) and each experiment's peak memory."""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metadiff.bench.features import bench_feature_extraction
from metadiff.bench.features_vqa import bench_feature_extraction_vqa
from metadiff.bench.inner_loop import bench_inner_loop
from metadiff.bench.pseudo_data import bench_pseudo_data, bench_pseudo_data_ranks
from metadiff.bench.sampling import bench_sampling
from metadiff.bench.summary import write_summary
from metadiff.run import train  # the stage runner that builds the sampling benchmark's chain if it is missing
from metadiff.utils.io import write_json

BENCHMARKS: dict[str, Callable[..., dict]] = {
    "features": bench_feature_extraction,
    "features_vqa": bench_feature_extraction_vqa,
    "inner_loop": bench_inner_loop,
    "pseudo_data": bench_pseudo_data,
    "pseudo_data_ranks": bench_pseudo_data_ranks,
    "sampling": bench_sampling,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), default=sorted(BENCHMARKS))
    parser.add_argument("--data-dir", type=Path, default=Path("outputs/data"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sampling-overrides",
        nargs="*",
        default=[],
        help="Hydra overrides of hyperldm_synthvqa for the sampling benchmark, e.g. seed=1",
    )
    args = parser.parse_args(argv)
    machine = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
    }
    for name in args.only:
        start = time.time()
        extra = {"overrides": tuple(args.sampling_overrides), "build": train} if name == "sampling" else {}
        result = BENCHMARKS[name](data_dir=args.data_dir, device=args.device, **extra)
        result.update(machine=machine, wall_seconds=time.time() - start)
        write_json(args.out / f"{name}.json", result)
        print(json.dumps(result, indent=2))
    summary = write_summary(args.out, args.data_dir.parent / "artifacts", machine)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
