"""`bench/summary.json`: every ratio the project tracks in one file, read from the benchmarks' own JSON files in the
output folder, plus the peak memory each embedded experiment recorded in the manifest of its latest artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from metadiff.utils.io import write_json

# benchmark file -> {summary key: path of the value inside that file}
RATIOS: dict[str, dict[str, tuple[str, ...]]] = {
    "inner_loop": {
        f"batched_over_per_task_{mode}_{order}_order": ("results", f"{mode}_{order}_order", "speedup")
        for mode in ("enet", "mnet")
        for order in ("first", "second")
    },
    "sampling": {
        "ddpm1000_over_ddim50_time": ("ddpm_over_ddim_time",),
        "ddim50_minus_ddpm1000_accuracy": ("ddim_minus_ddpm_accuracy",),
        "cfg_two_passes_over_batched_time": ("two_passes_over_batched_time",),
    },
    "features": {"feature_pipeline_over_bare_forward": ("pipeline_over_bare",)},
    "features_vqa": {"feature_pipeline_over_bare_forward_vqa": ("pipeline_over_bare",)},
    "pseudo_data": {
        "pseudo_data_guided_images_per_s": ("images_per_s", "guided"),
        "pseudo_data_unguided_images_per_s": ("images_per_s", "unguided"),
        "pseudo_data_guided_over_unguided_time": ("guided_over_unguided_time",),
    },
    "pseudo_data_ranks": {"pseudo_data_two_ranks_over_one_time": ("two_ranks_over_one_time",)},
}


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def peak_memory_by_experiment(artifacts_dir: Path) -> dict[str, dict[str, float]]:
    """task name -> the sys/peak_* metrics of its most recently written artifact (runs record them)."""
    latest: dict[str, tuple[float, dict[str, float]]] = {}
    for manifest in artifacts_dir.glob("*/*/manifest.json"):
        data = json.loads(manifest.read_text())
        peaks = {k: v for k, v in data.get("metrics", {}).items() if k.startswith("sys/peak")}
        if peaks and manifest.stat().st_mtime > latest.get(data["task_name"], (0.0, {}))[0]:
            latest[data["task_name"]] = (manifest.stat().st_mtime, peaks)
    return {name: peaks for name, (_, peaks) in sorted(latest.items())}


def write_summary(out_dir: Path, artifacts_dir: Path, machine: dict[str, Any]) -> dict[str, Any]:
    ratios, sources = {}, {}
    for bench, keys in RATIOS.items():
        path = out_dir / f"{bench}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        sources[bench] = {"machine": result.get("machine"), "wall_seconds": result.get("wall_seconds")}
        ratios.update({key: _get(result, where) for key, where in keys.items()})
    summary = {
        "machine": machine,
        "ratios": ratios,
        "sources": sources,
        "missing": sorted(set(RATIOS) - set(sources)),
        "peak_memory_mib": peak_memory_by_experiment(artifacts_dir),
    }

    write_json(out_dir / "summary.json", summary)
    return summary
