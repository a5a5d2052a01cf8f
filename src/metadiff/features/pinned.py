"""Pinned pretrained weights shipped in the package (`metadiff/assets/<name>/`): the weights file and a manifest that
says where they came from, what they measured and how to rebuild them.

The embedded CLIP of the HyperCLIP family ships this way (`conf/synthvqa_clip/pinned.yaml`), as the paper's CLIP is
pretrained too: training it takes ~5.5 min of a 2-core CPU that every demo and CI chain would otherwise repeat.

    python -m metadiff.features.pinned <clip artifact dir>   # pins a `clip_synthvqa` artifact as assets/clip_synthvqa

The weights are stored in float16 (15 MB in git instead of 30) and loaded as float32: the asset IS the rounded
weights, its metrics are measured on them (`features_synthvqa` reports the CLIP zero-shot baseline of its store), and
a rebuild gives them again up to that rounding. `check_if_pinned` refuses a weights file whose bytes differ from the
manifest's in one line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from metadiff.config.resolvers import ASSETS_DIR
from metadiff.errors import UserError
from metadiff.features.clip_models import CLIP_WEIGHTS
from metadiff.store import load_artifact
from metadiff.utils.hashing import cached_file_sha256, file_sha256
from metadiff.utils.io import atomic_path, read_json, write_json

WEIGHTS = "clip.pt"
MANIFEST = "manifest.json"
CLIP_ASSET = "clip_synthvqa"
REBUILD = (
    "python train.py experiment=clip_synthvqa seed={seed}   # ~5.5 min on 2 CPU cores\n"
    "python -m metadiff.features.pinned <the clip_synthvqa artifact dir it prints>\n"
    "python train.py experiment=features_synthvqa && python -m metadiff.features.pinned --features <its artifact dir>"
)


def manifest_path(name: str = CLIP_ASSET) -> Path:
    return ASSETS_DIR / name / MANIFEST


def read_manifest(name: str = CLIP_ASSET) -> dict[str, Any]:
    return read_json(manifest_path(name), what=f"pinned asset '{name}': manifest")


def check_if_pinned(weights: Path) -> None:
    """A weights file inside `metadiff/assets/<name>/` is a pinned asset: refuse it (one line) when its content is not
    the one its manifest describes (a file replaced by hand, a half-finished checkout). Other paths pass untouched."""
    weights = Path(weights).resolve()
    if not weights.is_relative_to(ASSETS_DIR):
        return
    name = weights.relative_to(ASSETS_DIR).parts[0]
    expected = read_manifest(name)["sha256"]
    actual = cached_file_sha256(weights)  # the feature store's key hashes the same file next
    if actual != expected:
        raise UserError(
            f"pinned asset '{name}': {weights} has sha256 {actual[:12]}..., its manifest {manifest_path(name)} says "
            f"{expected[:12]}... (rebuild it: {REBUILD.splitlines()[0].split('#')[0].strip()}, then pin it)"
        )


def git_commit(repo: Path) -> str:
    """The commit the artifact's code came from (the checkout this runs in), '+dirty' when it has changes."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "src", "conf"], cwd=repo, capture_output=True, text=True
    )
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def pin_clip(artifact_dir: Path, out_dir: Path, commit: str) -> dict[str, Any]:
    """Write `clip.pt` (float16) and `manifest.json` for a `clip_synthvqa` artifact into `out_dir`."""
    artifact = load_artifact(artifact_dir)
    manifest = artifact.manifest
    if manifest.get("stage") != "clip":
        raise UserError(f"{artifact_dir}: a '{manifest.get('stage')}' artifact, expected a 'clip' one")
    config = OmegaConf.load(artifact_dir / "config.yaml")
    state = torch.load(artifact.file(CLIP_WEIGHTS), map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS) as tmp:
        torch.save(half, tmp)
    pinned = {
        "weights": WEIGHTS,
        "sha256": file_sha256(out_dir / WEIGHTS),
        "dtype": "float16 (loaded as float32)",
        "parameters": sum(v.numel() for v in state.values()),
        "arch": str(config.model.arch),
        "built_by": {
            "experiment": str(config.task_name),
            "seed": int(config.seed),
            "commit": commit,
            "config_fingerprint": artifact.fingerprint,
            "config": OmegaConf.to_container(config, resolve=False),
        },
        "metrics_fp32": {k: v for k, v in manifest["metrics"].items() if k.startswith(("val/", "test/"))},
        "training_data": "generated synthvqa scenes and captions (metadiff.data.synthvqa): no third-party data",
        "licence": "MIT, as the code (LICENSE)",
        "rebuild": REBUILD.format(seed=int(config.seed)),
    }
    write_json(out_dir / MANIFEST, pinned)
    return pinned


def record_features_metrics(features_dir: Path, out_dir: Path) -> dict[str, float]:
    """Add to the manifest what the pinned weights measure downstream: the CLIP baselines on meta-test of the feature
    store `features_synthvqa` built from them (`tests/test_pinned.py` checks a fresh store reproduces them)."""
    manifest = load_artifact(features_dir).manifest
    if manifest.get("stage") != "features":
        raise UserError(f"{features_dir}: a '{manifest.get('stage')}' artifact, expected a 'features' one")
    metrics = {k: v for k, v in manifest["metrics"].items() if k.startswith("meta_test/")}
    pinned = read_json(out_dir / MANIFEST, what="pinned asset manifest")
    pinned["metrics_pinned"] = {"features_experiment": str(manifest["task_name"]), **metrics}
    write_json(out_dir / MANIFEST, pinned)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="a clip_synthvqa artifact dir, or with --features a features one")
    parser.add_argument("--features", action="store_true", help="record a features artifact's metrics instead")
    parser.add_argument("--out", type=Path, default=ASSETS_DIR / CLIP_ASSET)
    parser.add_argument("--commit", help="the commit the artifact was trained at (default: this checkout's HEAD)")
    args = parser.parse_args(argv)
    if args.features:
        print(json.dumps(record_features_metrics(args.artifact, args.out), indent=2))
        return
    repo = Path(__file__).resolve().parents[3]
    pinned = pin_clip(args.artifact, args.out, args.commit or git_commit(repo))
    print(json.dumps({k: v for k, v in pinned.items() if k != "built_by"}, indent=2))


if __name__ == "__main__":
    main()
