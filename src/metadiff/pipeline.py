"""The stage DAG: compose the config of each upstream a stage names, and find its artifact or build it first.

A stage's `upstream` entries name experiments; each is composed as this run would build it (`compose_upstream`),
looked up in the store (`metadiff.store`) and, when missing and allowed (`build_if_missing`), built once across
processes by the stage runner the caller passes in (`metadiff.run.train` for `train.py`). The runner is a parameter so
that this module never imports the run loop: the store and the pipeline sit below it, and only entry points
(`train.py`, `python -m metadiff.bench`) tie them to it. A nested build runs in this process, with the process-wide
settings it changes (RNGs, matmul precision, threads, deterministic flags) given back afterwards.
"""

from __future__ import annotations

import contextvars
import inspect
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import hydra
from omegaconf import DictConfig, OmegaConf

from metadiff.errors import UserError
from metadiff.store import (
    Artifact,
    ArtifactMismatchError,
    artifact_dir,
    check_lineage,
    find_artifact,
    fingerprints,
    load_artifact,
)
from metadiff.utils.io import build_once
from metadiff.utils.process_state import preserved_process_state
from metadiff.utils.ranks import BUILD, BUILT, build_decisions, launched_as_follower_rank

log = logging.getLogger(__name__)

StageRunner = Callable[[DictConfig], object]
"""Runs one stage as configured and publishes its artifact (`metadiff.run.train`)."""


class ArtifactMissingError(UserError, RuntimeError):
    """An artifact does not exist and this run may not build it."""


class UpstreamMissingError(ArtifactMissingError):
    """An upstream artifact does not exist and this run may not build it (or building it failed)."""


# Config-group choices of the config being resolved. Hydra only knows the top-level run's choices, so while an
# upstream is resolved or built, its own inherited choices are set here: a grand-upstream then inherits from its
# parent (e.g. `upstream.features.inherit_groups=[]` really gives the features stage's CLIP the default trainer).
_CHOICES: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("metadiff_choices", default=None)


def _hydra_choices() -> Mapping[str, str | None]:
    from hydra.core.hydra_config import HydraConfig

    nested = _CHOICES.get()
    if nested is not None:
        return nested
    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    choices = dict(hydra_cfg.runtime.choices)
    return {**choices, **_list_choices(list(hydra_cfg.overrides.task), choices)}


def _list_choices(task_overrides: list[str], choices: Mapping[str, str | None]) -> dict[str, str]:
    """Groups chosen as a list (`debug=[short_chain,fdr]`, which Hydra merges in order) as the override value that
    selects the same list again: Hydra's `runtime.choices` records only single choices."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(task_overrides)
    out = {}
    for o in parsed:
        if choices.get(o.key_or_group) is not None or o.is_add():
            continue
        value = o.value()
        if isinstance(value, list):
            out[o.key_or_group] = f"[{','.join(map(str, value))}]"
    return out


def _inherited_choices(cfg: DictConfig, name: str) -> dict[str, str]:
    choices = _hydra_choices()
    return {g: c for g in _spec_of(cfg, name)[0].get("inherit_groups", []) if (c := choices.get(g)) is not None}


def _upstream_specs(cfg: DictConfig) -> dict[str, Any]:
    """The `upstream` entries that name an upstream: an entry set to null drops one the experiment inherits."""
    return {name: spec for name, spec in (cfg.get("upstream") or {}).items() if spec is not None}


def upstream_names(cfg: DictConfig) -> list[str]:
    """The upstream artifacts `cfg` needs: one per `upstream` entry, or `count` of them for an entry with
    `fan_out: {key, count}` (named `<name>0`, `<name>1`, ...; member k gets the override `key=k`). A zoo names its
    M UNets this way, so each is its own cached artifact and a multirun can train them as M jobs. An entry set to
    null is not an upstream: an experiment drops one it inherits that way (e.g. the demo its HyperCLIP encoder)."""
    names = []
    for name, spec in _upstream_specs(cfg).items():
        fan = spec.get("fan_out")
        names += [f"{name}{k}" for k in range(int(fan.count))] if fan else [name]
    return names


def _spec_of(cfg: DictConfig, name: str) -> tuple[DictConfig, list[str]]:
    """(the `upstream` entry behind `name`, the fan-out override of its member, if any)."""
    specs = _upstream_specs(cfg)
    if name in specs:
        return specs[name], []
    for base, spec in specs.items():
        fan = spec.get("fan_out")
        if fan and name.startswith(base) and name[len(base) :].isdigit() and int(name[len(base) :]) < int(fan.count):
            return spec, [f"{fan.key}={int(name[len(base) :])}"]
    raise KeyError(f"no upstream '{name}' in this config (upstreams: {upstream_names(cfg)})")


def compose_upstream(cfg: DictConfig, name: str) -> DictConfig:
    """Compose the full config of upstream `name` as this run would build it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    spec, member = _spec_of(cfg, name)
    overrides = [f"experiment={spec.experiment}"]
    inherited = _inherited_choices(cfg, name)
    overrides += [f"{group}={choice}" for group, choice in inherited.items()]
    if "trainer" in _spec_of(cfg, name)[0].get("inherit_groups", []):
        overrides += _launch_overrides(cfg)
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


# The trainer keys that say where a run executes. An upstream that inherits the `trainer` group gets them too: under
# torchrun or srun every rank builds the upstream in the job's process group, so it must ask for the same devices
# (`trainer=ddp trainer.devices=4` would otherwise compose the upstream with the group's `devices: -1`).
LAUNCH_KEYS = ("accelerator", "devices", "num_nodes")


def _launch_overrides(cfg: DictConfig) -> list[str]:
    out = []
    for key in LAUNCH_KEYS:
        value = cast(dict, OmegaConf.to_container(cfg.trainer, resolve=True)).get(key)  # a mapping's container
        out.append(f"trainer.{key}={json.dumps(value) if isinstance(value, list) else value}")
    return out


def upstream_command(cfg: DictConfig, name: str) -> str:
    """The command that builds upstream `name` alone (named in errors)."""
    spec, member = _spec_of(cfg, name)
    return " ".join(["python train.py", f"experiment={spec.experiment}", *spec.get("overrides", []), *member])


def instantiate_with_upstream(node: DictConfig, upstream: dict[str, Artifact]) -> Any:
    """Instantiate `node`, passing the upstream artifacts to constructors that ask for them."""
    target = hydra.utils.get_class(node._target_) if "_target_" in node else None
    wants = target is not None and "upstream" in inspect.signature(target).parameters
    if not wants:
        return hydra.utils.instantiate(node)
    # Partial first: kwargs given to `instantiate` are merged into the config, which would turn the Artifact
    # dataclasses into OmegaConf nodes and lose their methods.
    return hydra.utils.instantiate(node, _partial_=True)(upstream=upstream)


def resolve_upstreams(cfg: DictConfig, build: StageRunner | None = None) -> dict[str, Artifact]:
    """All upstream artifacts a stage names in `cfg.upstream`, found or built (by `build`; `None` builds nothing),
    in config order, checked to share one lineage."""
    found = {name: require_upstream(cfg, name, build) for name in upstream_names(cfg)}
    check_lineage(found)
    return found


def require_upstream(cfg: DictConfig, name: str, build: StageRunner | None = None) -> Artifact:
    """Find upstream `name`'s artifact, building it first with `build` when the config allows (`build_if_missing`).

    `upstream.<name>.path` names an existing artifact directory instead (e.g. one trained on another machine); its
    lineage is still checked against the other upstreams (`check_lineage`)."""
    given = _upstream_specs(cfg).get(name)
    if given is not None and given.get("path"):
        return _given_upstream(cfg, name, Path(given.path))
    up_cfg = compose_upstream(cfg, name)
    if cfg.get("ckpt_path") == "last":  # a resumed run resumes what it was building too (Lightning: fresh if none)
        up_cfg.ckpt_path = "last"
    token = _CHOICES.set(_inherited_choices(cfg, name))
    try:
        found, built = _find_or_build(up_cfg, build, lambda path: _build_upstream(cfg, name, up_cfg, build, path))
    finally:
        _CHOICES.reset(token)
    log.info("upstream '%s': %s %s", name, "built" if built else "using", found.path)
    return found


def find_or_build(cfg: DictConfig, build: StageRunner | None = None) -> Artifact:
    """The artifact of `cfg` itself (e.g. the trained model a benchmark measures): its upstreams found or built,
    then it is found, or built once by `build` (`None`: an `ArtifactMissingError` naming the command)."""

    def build_it(_path: Path) -> None:
        if build is None:
            raise ArtifactMissingError(
                f"no {cfg.stage} artifact for {cfg.task_name} under "
                f"{Path(cfg.paths.artifacts_dir) / cfg.stage}; build it first with: "
                f"python train.py experiment=<experiment of {cfg.task_name}> [overrides]"
            )
        log.info("%s (%s) has no artifact: building it now", cfg.task_name, cfg.stage)
        with preserved_process_state():
            build(cfg)

    found, built = _find_or_build(cfg, build, build_it)
    log.info("%s (%s): %s %s", cfg.task_name, cfg.stage, "built" if built else "using", found.path)
    return found


def _given_upstream(cfg: DictConfig, name: str, path: Path) -> Artifact:
    """The artifact at `upstream.<name>.path`, refused if it is another stage's."""
    if not (path / "manifest.json").is_file():
        raise UpstreamMissingError(f"upstream.{name}.path={path}: no artifact there (manifest.json is missing)")
    found = load_artifact(path)
    wanted = compose_upstream(cfg, name).stage
    if found.manifest.get("stage") != wanted:
        raise ArtifactMismatchError(
            f"upstream.{name}.path={path} holds a '{found.manifest.get('stage')}' artifact, but upstream "
            f"'{name}' ({_spec_of(cfg, name)[0].experiment}) must be a '{wanted}' artifact"
        )
    return found


def _find_or_build(
    cfg: DictConfig, build: StageRunner | None, build_it: Callable[[Path], None]
) -> tuple[Artifact, bool]:
    """(the artifact of `cfg`, whether this call built it; `build_it` gets the artifact's path). Its own upstreams
    are resolved first, outside the build lock; a lock taken inside it can only be an upstream's (the stage DAG has
    no cycles), so two builders never wait on each other in a circle. The follower ranks of a DDP job build alongside
    their rank 0, which holds the lock; where the launcher starts every rank at once, they first wait for rank 0's decision (`build_decisions`)."""
    up_fps = fingerprints(resolve_upstreams(cfg, build))
    path = artifact_dir(cfg, up_fps)
    decisions, follower = build_decisions(), launched_as_follower_rank()
    if decisions is not None and follower:  # torchrun/srun: rank 0 decides, once it holds the lock or found it
        built = decisions.wait(path) == BUILD  # BUILT also when rank 0 built a one-process stage alone
        if built:
            build_it(path)  # join rank 0's build: a DDP run of the job's ranks
    else:

        def announced_build() -> None:
            if decisions is None:
                build_it(path)
            elif _runs_on_every_rank(cfg):  # a DDP run: the followers join it
                decisions.announce(path, BUILD)
                build_it(path)
            else:  # a one-process run (an upstream that does not inherit the trainer): rank 0 alone, then they read it
                build_it(path)
                decisions.announce(path, BUILT)

        built = build_once(path, lambda: find_artifact(cfg, up_fps) is not None, announced_build, locked=not follower)
        if decisions is not None and not built:
            decisions.announce(path, BUILT)
    found = find_artifact(cfg, up_fps)
    if found is None:
        raise RuntimeError(f"{cfg.task_name} ({cfg.stage}) ran but wrote no artifact at {path}")
    return found, built


def _runs_on_every_rank(cfg: DictConfig) -> bool:
    """Whether a stage built inside a job that launches every rank is a DDP run of those ranks (its trainer asks for
    more than one device or node), or a one-process run that rank 0 does alone."""
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    count = len(devices) if OmegaConf.is_list(devices) else devices
    return not (count == 1 and nodes == 1)


def _build_upstream(cfg: DictConfig, name: str, up_cfg: DictConfig, build: StageRunner | None, path: Path) -> None:
    """Build upstream `name` into `path`. Its run folder is `<output_dir>/upstream/<name>/<artifact folder name>`:
    one per artifact identity, so a run that resumes (`ckpt_path=last`: a requeued job, or a crashed command rerun in
    its run dir) resumes the upstream it was building from that folder's `last.ckpt`, and never one that a changed
    config trained."""
    spec = _spec_of(cfg, name)[0]
    up_cfg.paths.output_dir = str(Path(up_cfg.paths.output_dir) / path.name)
    if build is None or not spec.get("build_if_missing", False):
        raise UpstreamMissingError(
            f"upstream '{name}' ({spec.experiment}) has no artifact under "
            f"{Path(up_cfg.paths.artifacts_dir) / up_cfg.stage}; build it first with: {upstream_command(cfg, name)}"
        )
    log.info("upstream '%s' missing: building it now (%s)", name, upstream_command(cfg, name))
    try:
        with preserved_process_state():  # the parent stage goes on with its own RNGs, precision, threads, flags
            build(up_cfg)
    except UserError as err:  # say which upstream failed and the command that builds it alone
        raise UpstreamMissingError(
            f"{err} [while building upstream '{name}'; alone: {upstream_command(cfg, name)}]"
        ) from err
