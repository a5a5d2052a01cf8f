"""The artifact store: where a stage's outputs live, what they are keyed by, and how they are read and written.

An artifact is a directory `<artifacts_dir>/<stage>/<task_name>-<fingerprint12>/` holding the stage's files, the
resolved config that produced it (`config.yaml`) and a `manifest.json` (stage, fingerprint, metrics, upstreams,
lineage). It is written into a temporary directory and renamed, so it either exists complete or not at all.

The fingerprint hashes the config minus the keys that cannot change the result (paths, loggers, ...), so the same
config always maps to the same cached artifact and a changed one never silently reuses a stale one. The store is
relocatable: values under the directories metadiff writes (`paths.root_dir`, `data_dir`, `artifacts_dir`, ...) are
hashed as `${paths.<key>}/...`, and manifests name their upstreams relative to the artifacts root, so an outputs
tree copied or moved under another `paths.root_dir` is found and reused as it is.

This module only stores and finds; building missing upstreams is `metadiff.pipeline`'s job.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from metadiff.errors import UserError
from metadiff.utils.hashing import fingerprint, to_plain
from metadiff.utils.io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

# Keys that never change what a stage computes; everything else is part of the artifact's identity.
DEFAULT_FINGERPRINT_EXCLUDE = (
    "paths",
    "logger",
    "callbacks.model_checkpoint",  # where and how often checkpoints go, the summary, crash drills: not the result
    "callbacks.model_summary",
    "callbacks.kill",
    "callbacks.progress",  # progress lines on a redirected console: never the result
    "tags",
    "task_name",
    "ckpt_path",
    "optimized_metric",
    "upstream",
    "upstream_overrides",
    "artifact",
    "variant",
    # where and on how many devices it ran: batch sizes are global (metadiff.data.global_batch), so the world size
    # changes neither the recipe nor the artifact; precision stays in (it changes what is computed)
    *(f"trainer.{key}" for key in ("accelerator", "devices", "num_nodes", "strategy", "sync_batchnorm")),
    "data.pin_memory",  # page-locked host batches: how fast they reach a GPU, not what they hold
    "model.speed",  # opt-in torch.compile / channels_last: how fast, not what is computed
    "trainer.enable_progress_bar",
    "trainer.default_root_dir",
    "trainer.log_every_n_steps",
)

# The `paths.*` directories that metadiff writes into (outputs, caches, artifacts, run dirs). A value under one of
# them is hashed relative to it, so the same config under another root has the same fingerprint. Directories of
# input data (`vqa_dir`, `miniimagenet_dir`, ...) are deliberately not among them: pointing one at another data set
# must change the fingerprint (their defaults lie under `data_dir`, so the default layout still relocates).
RELOCATABLE_PATHS = ("root_dir", "data_dir", "artifacts_dir", "log_dir", "output_dir")


class ArtifactMismatchError(UserError, RuntimeError):
    """An artifact exists but was built from another upstream/config than the one asked for."""


@dataclass(frozen=True)
class Artifact:
    """A finished stage output on disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def root(self) -> Path:
        """The artifacts root this artifact lies in (`<root>/<stage>/<name>`)."""
        return self.path.parent.parent

    def file(self, name: str) -> Path:
        """Path of one of the artifact's files, with an error naming the artifact if it is absent."""
        path = self.path / name
        if not path.exists():
            raise FileNotFoundError(f"artifact {self.path} has no file '{name}' (built by an older version?)")
        return path

    def upstream_path(self, name: str) -> Path:
        """Where upstream `name` of this artifact is now: manifests store it relative to the artifacts root (so a
        moved outputs tree still resolves), older ones as an absolute path, which is taken as it is."""
        entry = self.manifest.get("upstream", {}).get(name)
        if entry is None:
            raise KeyError(
                f"artifact {self.path} has no upstream '{name}' (upstreams: {sorted(self.manifest.get('upstream', {}))})"
            )
        path = Path(entry["path"])
        return path if path.is_absolute() else self.root / path


def _drop(tree: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in tree:
        return
    if rest:
        if isinstance(tree[head], dict):
            _drop(tree[head], rest)
    else:
        del tree[head]


def _path_tokens(cfg: DictConfig) -> list[tuple[str, str]]:
    """(directory, `${paths.<key>}`) of the relocatable directories that `cfg` sets, longest first (ties by key)."""
    paths = cfg.get("paths") or {}
    found = []
    for key in RELOCATABLE_PATHS:
        value = to_plain(paths.get(key)) if key in paths else None
        if isinstance(value, str) and value.rstrip("/"):
            found.append((value.rstrip("/"), f"${{paths.{key}}}"))
    return sorted(found, key=lambda item: (-len(item[0]), item[1]))


def _abstract_paths(node: Any, tokens: list[tuple[str, str]]) -> Any:
    """`node` with every string under one of `tokens`' directories rewritten as `${paths.<key>}<rest>`."""
    if isinstance(node, dict):
        return {k: _abstract_paths(v, tokens) for k, v in node.items()}
    if isinstance(node, list):
        return [_abstract_paths(v, tokens) for v in node]
    if isinstance(node, str):
        for directory, token in tokens:
            if node == directory or node.startswith(directory + "/"):
                return token + node[len(directory) :]
    return node


def config_fingerprint(cfg: DictConfig) -> str:
    """Hash of everything in `cfg` that can change the artifact (not where it is written: see RELOCATABLE_PATHS)."""
    tree = {str(k): copy.deepcopy(to_plain(cfg[k])) for k in cfg if k != "hydra"}
    for key in DEFAULT_FINGERPRINT_EXCLUDE:
        _drop(tree, key)
    return fingerprint(_abstract_paths(tree, _path_tokens(cfg)))


def artifact_dir(cfg: DictConfig, upstream_fingerprints: Mapping[str, str] | None = None) -> Path:
    """Where the artifact of `cfg` built on these upstreams lives (whether or not it exists yet)."""
    fp = fingerprint({"config": config_fingerprint(cfg), "upstream": dict(upstream_fingerprints or {})})
    return Path(cfg.paths.artifacts_dir) / cfg.stage / f"{cfg.task_name}-{fp[:12]}"


def fingerprints(upstream: Mapping[str, Artifact]) -> dict[str, str]:
    """name -> fingerprint of each upstream artifact: the upstream part of a downstream artifact's key."""
    return {name: art.fingerprint for name, art in upstream.items()}


def load_artifact(path: Path) -> Artifact:
    manifest = read_json(Path(path) / "manifest.json", what="artifact manifest")
    return Artifact(path=Path(path), manifest=manifest)


def find_artifact(cfg: DictConfig, upstream_fingerprints: Mapping[str, str] | None = None) -> Artifact | None:
    path = artifact_dir(cfg, upstream_fingerprints)
    return load_artifact(path) if (path / "manifest.json").is_file() else None


def _stored_path(path: Path, root: Path) -> str:
    """An upstream's path as a manifest stores it: relative to the artifacts root when it lies under it (so the tree
    can move), absolute otherwise (an `upstream.<name>.path` elsewhere, which does not move with this tree)."""
    absolute, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    return absolute.relative_to(root).as_posix() if absolute.is_relative_to(root) else str(absolute)


def publish_artifact(
    cfg: DictConfig,
    write_files: Callable[[Path], None],
    metrics: Mapping[str, float],
    upstream: Mapping[str, Artifact] | None = None,
) -> Artifact:
    """Write a stage's artifact atomically: files, resolved config and manifest, then rename into place."""
    upstream = dict(upstream or {})
    path = artifact_dir(cfg, fingerprints(upstream))
    root = Path(cfg.paths.artifacts_dir)
    with atomic_dir(path, overwrite=True) as tmp:
        write_files(tmp)
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_json(
            tmp / "manifest.json",
            {
                "stage": cfg.stage,
                "variant": cfg.get("variant"),
                "task_name": cfg.task_name,
                "fingerprint": path.name.rsplit("-", 1)[-1],
                "upstream": {
                    name: {"path": _stored_path(a.path, root), "fingerprint": a.fingerprint}
                    for name, a in upstream.items()
                },
                "lineage": lineage(upstream),
                "metrics": {k: float(v) for k, v in metrics.items()},
            },
        )
    log.info("artifact written: %s", path)
    return load_artifact(path)


def lineage(upstream: Mapping[str, Artifact]) -> dict[str, str]:
    """stage -> fingerprint of every artifact this one is built on (the upstreams and all of theirs)."""
    out: dict[str, str] = {}
    for art in upstream.values():
        out.update(art.manifest.get("lineage", {}))
        out[lineage_key(art.manifest)] = art.fingerprint
    return out


def lineage_key(manifest: Mapping[str, Any]) -> str:
    """`stage`, or `stage[variant]` for the members of a fan-out (e.g. the UNets of a zoo), which are distinct
    artifacts of one stage rather than two versions of it."""
    variant = manifest.get("variant")
    return manifest["stage"] if variant is None else f"{manifest['stage']}[{variant}]"


def check_lineage(upstream: Mapping[str, Artifact]) -> None:
    """Refuse upstreams built on different versions of a shared stage (e.g. an adaptation dataset made from another
    feature model or data split than the features this run reads): their tensors would not mean the same thing."""
    seen: dict[str, tuple[str, str]] = {}
    for name, art in upstream.items():
        for stage, fp in lineage({name: art}).items():
            if stage in seen and seen[stage][0] != fp:
                other, other_fp = seen[stage][1], seen[stage][0]
                raise ArtifactMismatchError(
                    f"upstream '{name}' ({art.path}) was built on {stage} {fp[:12]}, but upstream '{other}' uses "
                    f"{stage} {other_fp[:12]}: rebuild '{name}' for this run's {stage} (or point "
                    f"upstream.{name}.path at a matching artifact)"
                )
            seen.setdefault(stage, (fp, name))
