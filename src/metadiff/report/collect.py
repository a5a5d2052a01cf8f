"""Read every finished artifact under one or more outputs dirs into `Run` records (manifest + config + plots).

An artifact is `<outputs>/artifacts/<stage>/<task_name>-<fingerprint>/` with `manifest.json` and `config.yaml`
(see metadiff.store). Hidden entries (`.locks`, `.work`, the temporary siblings of an artifact being published)
are never read, so a report taken while jobs are still running only sees complete artifacts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metadiff.errors import InputFileError, MissingInputError, UserError
from metadiff.utils.io import read_json


class MalformedArtifactError(InputFileError):
    """An artifact's manifest or config cannot be read; the message names the file."""


@dataclass(frozen=True)
class Run:
    """One artifact: what produced it (stage, task, config) and what it measured."""

    path: Path
    stage: str
    task_name: str
    variant: str | None
    fingerprint: str
    metrics: dict[str, float]
    config: dict[str, Any]
    plots: tuple[Path, ...] = ()

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class Collection:
    runs: list[Run] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line per skipped artifact, naming its file


def artifacts_root(outputs: Path) -> Path:
    """`<outputs>/artifacts`, or `outputs` itself when it already is an artifacts dir (holds `<stage>/<run>/`)."""
    outputs = Path(outputs)
    if (outputs / "artifacts").is_dir():
        return outputs / "artifacts"
    if outputs.is_dir() and any(outputs.glob("*/*/manifest.json")):
        return outputs
    raise MissingInputError(f"no artifacts under {outputs} (expected {outputs}/artifacts/<stage>/<run>/manifest.json)")


def artifact_dirs(root: Path) -> list[Path]:
    """Every published artifact dir under an artifacts root, in stage/run order."""
    found = []
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found += [
            run
            for run in sorted(stage_dir.iterdir())
            if run.is_dir() and not run.name.startswith(".") and (run / "manifest.json").is_file()
        ]
    return found


def _bad(path: Path, why: str) -> MalformedArtifactError:
    return MalformedArtifactError(f"{path}: {why}")


def _checked_manifest(path: Path) -> dict[str, Any]:
    manifest = read_json(path, what="artifact manifest")
    if not isinstance(manifest, dict):
        raise _bad(path, f"expected a JSON object, got {type(manifest).__name__}")
    for key in ("stage", "task_name"):
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            raise _bad(path, f"'{key}' is missing or not a string")
    metrics = manifest.get("metrics")
    if not isinstance(metrics, dict):
        raise _bad(path, "'metrics' is missing or not an object")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(path, f"metric '{name}' is {value!r}, not a number")
    return manifest


def _config(path: Path) -> dict[str, Any]:
    """The run's resolved config (`{}` if the artifact has none: its metrics are still worth reporting)."""
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise _bad(path, f"not valid YAML ({' '.join(str(err).split())})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise _bad(path, f"expected a mapping, got {type(config).__name__}")
    return config


def _plots(artifact: Path, config: dict[str, Any]) -> tuple[Path, ...]:
    """The artifact's PNGs, then those its run left in its Hydra run dir (e.g. accuracy_vs_guidance.png) when that
    dir still holds this very run: its `resolved_config.yaml` is byte-identical to the artifact's `config.yaml`."""
    plots = sorted(artifact.glob("*.png"))
    paths = config.get("paths")
    run_dir = paths.get("output_dir") if isinstance(paths, dict) else None
    if isinstance(run_dir, str) and run_dir:
        run_dir = Path(run_dir)
        resolved = run_dir / "resolved_config.yaml"
        try:
            same_run = run_dir != artifact and resolved.read_bytes() == (artifact / "config.yaml").read_bytes()
        except OSError:
            same_run = False
        if same_run:
            names = {p.name for p in plots}
            plots += [p for p in sorted(run_dir.glob("*.png")) if p.name not in names]
    return tuple(plots)


def read_run(path: Path) -> Run:
    """One artifact dir as a `Run`; `MalformedArtifactError` (naming the file) if it cannot be read."""
    path = Path(path)
    try:
        manifest = _checked_manifest(path / "manifest.json")
    except (MalformedArtifactError, MissingInputError):
        raise
    except UserError as err:  # read_json's one line: names the file and the decoder error
        raise MalformedArtifactError(str(err)) from None
    config = _config(path / "config.yaml")
    metrics = {str(k): float(v) for k, v in manifest["metrics"].items() if math.isfinite(float(v))}
    variant = manifest.get("variant")
    return Run(
        path=path,
        stage=manifest["stage"],
        task_name=manifest["task_name"],
        variant=None if variant is None else str(variant),
        fingerprint=str(manifest.get("fingerprint") or path.name.rsplit("-", 1)[-1]),
        metrics=metrics,
        config=config,
        plots=_plots(path, config),
    )


def collect(outputs_dirs: Sequence[Path], strict: bool = False) -> Collection:
    """All runs under `outputs_dirs`. A malformed artifact becomes one line in `problems` and is skipped, or, with
    `strict`, raises `MalformedArtifactError`. An artifact replaced while being read (a job republishing it) is
    skipped silently: it is complete again a moment later."""
    out = Collection()
    for outputs in outputs_dirs:
        for path in artifact_dirs(artifacts_root(Path(outputs))):
            try:
                out.runs.append(read_run(path))
            except MalformedArtifactError as err:
                if strict:
                    raise
                out.problems.append(str(err))
            except MissingInputError:
                continue
    return out
