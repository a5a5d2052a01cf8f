"""Validate a composed config before any work starts.

Hydra already rejects a command-line override of a key that does not exist (`trainer.max_epoch=1`). What it cannot
see is a misspelt key *inside a YAML file* (an experiment setting `model.lr_warmup` instead of `warmup_steps`), or a
wrong type passed to a constructor, which would otherwise surface minutes later deep inside a stage. Every node with
a `_target_` is therefore checked against the signature of the callable it names, each nested block a constructor
annotates with a spec against that dataclass (`metadiff.config.typed`), and the top level against a schema of the
known keys.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import typing
from collections.abc import Callable
from typing import Any, cast

from omegaconf import DictConfig, ListConfig, OmegaConf

from metadiff.config.typed import ConfigError, accepts, check_spec, rejection, spec_in

# Top-level keys every run config has (beside the config groups) and the types they must hold.
TOP_LEVEL_TYPES: dict[str, tuple[type, ...]] = {
    "task_name": (str,),
    "stage": (str,),
    "seed": (int,),
    "train": (bool,),
    "test": (bool,),
    "predict": (bool,),
    "ckpt_path": (str, type(None)),
    "optimized_metric": (str, type(None)),
    "tags": (list,),
    "deterministic": (bool,),
    "float32_matmul_precision": (str,),
    "variant": (str, type(None)),
}
GROUP_KEYS = {
    "data",
    "model",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "extras",
    "upstream",
    "upstream_overrides",
    "artifact",
    "zoo",
    "compat",
}


def _resolve_target(path: str, key: str) -> Callable[..., Any]:
    module_name, _, attr = path.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"config key '{key}._target_': cannot import '{path}' ({err})") from None
    return obj


def _check_target_node(node: DictConfig, key: str) -> None:
    target = _resolve_target(str(node["_target_"]), key)
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # noqa: BLE001 - unresolvable hints just mean "no type check"
        hints = {}
    params = dict(sig.parameters)
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if has_var_kw and inspect.isclass(target):  # a subclass forwarding **kwargs: its parents' arguments count too
        for parent in target.__mro__[1:]:
            if parent is object or "__init__" not in vars(parent):
                continue
            parent_params = inspect.signature(vars(parent)["__init__"]).parameters  # the function checked above
            params = {**{k: v for k, v in parent_params.items() if k != "self"}, **params}
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parent_params.values()):
                has_var_kw = False
                break
    for name in node.keys():
        name = str(name)
        if name.startswith("_"):
            continue
        full = f"{key}.{name}" if key else name
        if name not in params:
            if has_var_kw:
                continue
            hint = difflib.get_close_matches(name, list(params), n=1)
            did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(
                f"unknown config key '{full}': {node['_target_']} takes no argument '{name}'{did_you_mean}"
            )
        # a DictConfig's container is a dict (to_container returns a list only for a ListConfig)
        raw = cast(dict, OmegaConf.to_container(node, resolve=True))[name] if OmegaConf.is_dict(node) else node[name]
        if isinstance(raw, dict) and "_target_" in raw:
            continue  # nested object: checked on its own
        annotation = hints.get(name, params[name].annotation)
        spec = spec_in(annotation)
        if spec is not None and raw is not None:  # a nested block with a typed spec: every key checked, by full name
            check_spec(spec, raw, full)
            continue
        if not accepts(raw, annotation):
            raise ConfigError(rejection(full, raw, annotation, node["_target_"]))


def _walk(node: Any, key: str) -> None:
    if isinstance(node, DictConfig | ListConfig) and (node._is_none() or node._is_missing()):
        return
    if isinstance(node, DictConfig):
        if "_target_" in node:
            _check_target_node(node, key)
        for child_key in node.keys():
            if str(child_key).startswith("_") or (not key and child_key == "hydra"):
                continue
            child = node._get_node(child_key)  # do not resolve missing values here
            _walk(child, f"{key}.{child_key!s}" if key else str(child_key))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node):
            _walk(child, f"{key}[{i}]")


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first unknown key, mistyped value or unimportable target."""
    for name in cfg.keys():
        name = str(name)
        if name in GROUP_KEYS or name == "hydra":
            continue
        if name not in TOP_LEVEL_TYPES:
            hint = difflib.get_close_matches(name, list(TOP_LEVEL_TYPES) + sorted(GROUP_KEYS), n=1)
            raise ConfigError(
                f"unknown top-level config key '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            )
        value = cfg[name]
        value = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        if not isinstance(value, TOP_LEVEL_TYPES[name]) or (
            isinstance(value, bool) and bool not in TOP_LEVEL_TYPES[name]
        ):
            expected = " or ".join(t.__name__ for t in TOP_LEVEL_TYPES[name])
            raise ConfigError(f"config key '{name}' = {value!r} has the wrong type: expected {expected}")
    for group in ("data", "model", "trainer"):
        if group not in cfg or cfg[group] is None:
            raise ConfigError(f"config group '{group}' is missing: pick one, e.g. '{group}=...' or an experiment")
    _walk(cfg, "")
