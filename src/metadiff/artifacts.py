"""Where a stage's outputs live and how a later stage finds (or builds) them.

An artifact is a directory `<artifacts_dir>/<stage>/<task_name>-<fingerprint12>/` holding the stage's files, the
resolved config that produced it (`config.yaml`) and a `manifest.json` (stage, fingerprint, metrics, upstream
fingerprints). It is written into a temporary directory and renamed, so it either exists complete or not at all.
The fingerprint hashes the config minus the keys that cannot change the result (paths, loggers, ...), so the same
upstream config always maps to the same cached artifact and a changed one never silently reuses a stale one.
"""

from __future__ import annotations

import contextvars
import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from metadiff.errors import UserError
from metadiff.utils.hashing import fingerprint, to_plain
from metadiff.utils.io import atomic_dir, build_once, read_json, write_json
from metadiff.utils.ranks import launched_as_follower_rank

log = logging.getLogger(__name__)

# Keys that never change what a stage computes; everything else is part of the artifact's identity.
DEFAULT_FINGERPRINT_EXCLUDE = (
    "paths",
    "logger",
    "callbacks.model_checkpoint",  # where and how often checkpoints go, the summary, crash drills: not the result
    "callbacks.model_summary",
    "callbacks.kill",
    "callbacks.progress",          # progress lines on a redirected console: never the result
    "tags",
    "task_name",
    "ckpt_path",
    "optimized_metric",
    "upstream",
    "upstream_overrides",
    "artifact",
    "variant",
    "trainer.enable_progress_bar",
    "trainer.default_root_dir",
    "trainer.log_every_n_steps",
)


class UpstreamMissingError(UserError, RuntimeError):
    """An upstream artifact does not exist and this run may not build it."""


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

    def file(self, name: str) -> Path:
        """Path of one of the artifact's files, with an error naming the artifact if it is absent."""
        path = self.path / name
        if not path.exists():
            raise FileNotFoundError(f"artifact {self.path} has no file '{name}' (built by an older version?)")
        return path


def _drop(tree: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in tree:
        return
    if rest:
        if isinstance(tree[head], dict):
            _drop(tree[head], rest)
    else:
        del tree[head]


def config_fingerprint(cfg: DictConfig) -> str:
    """Hash of everything in `cfg` that can change the artifact, plus the upstream fingerprints."""
    tree = {str(k): copy.deepcopy(to_plain(cfg[k])) for k in cfg if k != "hydra"}
    for key in DEFAULT_FINGERPRINT_EXCLUDE:
        _drop(tree, key)
    return fingerprint(tree)


def artifact_dir(cfg: DictConfig, upstream_fingerprints: Mapping[str, str] | None = None) -> Path:
    fp = fingerprint({"config": config_fingerprint(cfg), "upstream": dict(upstream_fingerprints or {})})
    return Path(cfg.paths.artifacts_dir) / cfg.stage / f"{cfg.task_name}-{fp[:12]}"


def load_artifact(path: Path) -> Artifact:
    manifest = read_json(Path(path) / "manifest.json", what="artifact manifest")
    return Artifact(path=Path(path), manifest=manifest)


def find_artifact(cfg: DictConfig, upstream_fingerprints: Mapping[str, str] | None = None) -> Artifact | None:
    path = artifact_dir(cfg, upstream_fingerprints)
    return load_artifact(path) if (path / "manifest.json").is_file() else None


def publish_artifact(
    cfg: DictConfig,
    write_files: Callable[[Path], None],
    metrics: Mapping[str, float],
    upstream: Mapping[str, Artifact] | None = None,
) -> Artifact:
    """Write a stage's artifact atomically: files, resolved config and manifest, then rename into place."""
    upstream = dict(upstream or {})
    up_fps = {name: art.fingerprint for name, art in upstream.items()}
    path = artifact_dir(cfg, up_fps)
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
                "upstream": {name: {"path": str(a.path), "fingerprint": a.fingerprint} for name, a in upstream.items()},
                "lineage": lineage(upstream),
                "metrics": {k: float(v) for k, v in metrics.items()},
            },
        )
    log.info("artifact written: %s", path)
    return load_artifact(path)


# --------------------------------------------------------------------------------------------- upstream stages
# Config-group choices of the config being resolved. Hydra only knows the top-level run's choices, so while an
# upstream is resolved or built, its own inherited choices are set here: a grand-upstream then inherits from its
# parent (e.g. `upstream.features.inherit_groups=[]` really gives the features stage's CLIP the default trainer).
_CHOICES: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("metadiff_choices", default=None)


def _hydra_choices() -> dict[str, str | None]:
    from hydra.core.hydra_config import HydraConfig

    nested = _CHOICES.get()
    if nested is not None:
        return nested
    if not HydraConfig.initialized():
        return {}
    return dict(HydraConfig.get().runtime.choices)


def _inherited_choices(cfg: DictConfig, name: str) -> dict[str, str]:
    choices = _hydra_choices()
    return {g: choices[g] for g in _spec_of(cfg, name)[0].get("inherit_groups", []) if choices.get(g) is not None}


def upstream_names(cfg: DictConfig) -> list[str]:
    """The upstream artifacts `cfg` needs: one per `upstream` entry, or `count` of them for an entry with
    `fan_out: {key, count}` (named `<name>0`, `<name>1`, ...; member k gets the override `key=k`). A zoo names its
    M UNets this way, so each is its own cached artifact and a multirun can train them as M jobs."""
    names = []
    for name, spec in (cfg.get("upstream") or {}).items():
        fan = spec.get("fan_out")
        names += [f"{name}{k}" for k in range(int(fan.count))] if fan else [name]
    return names


def _spec_of(cfg: DictConfig, name: str) -> tuple[DictConfig, list[str]]:
    """(the `upstream` entry behind `name`, the fan-out override of its member, if any)."""
    specs = cfg.get("upstream") or {}
    if name in specs:
        return specs[name], []
    for base, spec in specs.items():
        fan = spec.get("fan_out")
        if fan and name.startswith(base) and name[len(base):].isdigit() and int(name[len(base):]) < int(fan.count):
            return spec, [f"{fan.key}={int(name[len(base):])}"]
    raise KeyError(f"no upstream '{name}' in this config (upstreams: {upstream_names(cfg)})")


def compose_upstream(cfg: DictConfig, name: str) -> DictConfig:
    """Compose the full config of upstream `name` as this run would build it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    spec, member = _spec_of(cfg, name)
    overrides = [f"experiment={spec.experiment}"]
    overrides += [f"{group}={choice}" for group, choice in _inherited_choices(cfg, name).items()]
    for key in cfg.paths:  # every location the user set (data, artifacts, VQA/COCO, checkpoints) holds upstream too
        if key != "output_dir":
            value = cfg.paths[key]
            overrides.append(f"paths.{key}={'null' if value is None else value}")
    overrides.append(f"paths.output_dir={Path(cfg.paths.output_dir) / 'upstream' / name}")
    overrides += list(spec.get("overrides", [])) + member
    # `upstream_overrides.<experiment>=[...]` reaches a stage at any depth of the chain without nested quoting
    chain = cfg.get("upstream_overrides") or {}
    overrides += list(chain.get(spec.experiment, []))
    if GlobalHydra.instance().is_initialized():
        composed = compose(config_name="train", overrides=overrides)
    else:
        from metadiff.config.paths import CONF_DIR

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = compose(config_name="train", overrides=overrides)
    composed.upstream_overrides = chain  # handed down to the upstream's own upstreams
    return composed


def upstream_command(cfg: DictConfig, name: str) -> str:
    spec, member = _spec_of(cfg, name)
    return " ".join(["python train.py", f"experiment={spec.experiment}", *spec.get("overrides", []), *member])


def require_upstream(cfg: DictConfig, name: str) -> Artifact:
    """Find upstream `name`'s artifact, building it first when the config allows (embedded data).

    `upstream.<name>.path` names an existing artifact directory instead (e.g. one trained on another machine); its
    lineage is still checked against the other upstreams (`check_lineage`)."""
    if name in (cfg.get("upstream") or {}) and cfg.upstream[name].get("path"):
        path = Path(cfg.upstream[name].path)
        if not (path / "manifest.json").is_file():
            raise UpstreamMissingError(f"upstream.{name}.path={path}: no artifact there (manifest.json is missing)")
        found = load_artifact(path)
        wanted = compose_upstream(cfg, name).stage
        if found.manifest.get("stage") != wanted:
            raise ArtifactMismatchError(
                f"upstream.{name}.path={path} holds a '{found.manifest.get('stage')}' artifact, but upstream "
                f"'{name}' ({_spec_of(cfg, name)[0].experiment}) must be a '{wanted}' artifact")
        return found
    up_cfg = compose_upstream(cfg, name)
    token = _CHOICES.set(_inherited_choices(cfg, name))
    try:
        return _find_or_build(cfg, name, up_cfg)
    finally:
        _CHOICES.reset(token)


def _find_or_build(cfg: DictConfig, name: str, up_cfg: DictConfig) -> Artifact:
    up_upstream = resolve_upstreams(up_cfg)
    up_fps = {k: a.fingerprint for k, a in up_upstream.items()}
    # Its own upstreams were resolved above, outside this lock; a lock taken inside it can only be an upstream's
    # (the stage DAG has no cycles), so two builders never wait on each other in a circle. The follower ranks of a
    # DDP job build alongside their rank 0, which holds the lock (see metadiff.utils.ranks).
    built = build_once(artifact_dir(up_cfg, up_fps), lambda: find_artifact(up_cfg, up_fps) is not None,
                       lambda: _build(cfg, name, up_cfg), locked=not launched_as_follower_rank())
    found = find_artifact(up_cfg, up_fps)
    if found is None:
        raise RuntimeError(f"upstream '{name}' ran but wrote no artifact at {artifact_dir(up_cfg, up_fps)}")
    log.info("upstream '%s': %s %s", name, "built" if built else "using", found.path)
    return found


def _build(cfg: DictConfig, name: str, up_cfg: DictConfig) -> None:
    spec = _spec_of(cfg, name)[0]
    if not spec.get("build_if_missing", False):
        raise UpstreamMissingError(
            f"upstream '{name}' ({spec.experiment}) has no artifact under "
            f"{Path(up_cfg.paths.artifacts_dir) / up_cfg.stage}; build it first with: {upstream_command(cfg, name)}"
        )
    log.info("upstream '%s' missing: building it now (%s)", name, upstream_command(cfg, name))
    from metadiff.run import train

    try:
        train(up_cfg)
    except UserError as err:  # say which upstream failed and the command that builds it alone
        raise UpstreamMissingError(f"{err} [while building upstream '{name}'; alone: {upstream_command(cfg, name)}]") \
            from err


def resolve_upstreams(cfg: DictConfig) -> dict[str, Artifact]:
    """All upstream artifacts a stage names in `cfg.upstream`, built or found, in config order, checked to share
    one lineage."""
    found = {name: require_upstream(cfg, name) for name in upstream_names(cfg)}
    check_lineage(found)
    return found


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
