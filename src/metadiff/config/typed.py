"""Typed nested stage parameters: frozen dataclasses ("specs") that a nested config block such as `model.episodes`
must match.

A constructor annotates a nested block with its spec (`episodes: EpisodeSpec`). `validate_config` checks the YAML
against the spec before any work starts, so an unknown, missing or mistyped key fails in one line naming its full
dotted key; the constructor then turns the mapping Hydra passes into the dataclass with `as_spec` and reads
attributes, never `.get(key, default)`. Specs carry no defaults: every value lives in conf/.

Hand-written rather than Hydra structured configs in the ConfigStore: those would need a schema for every config
group and experiment file (including the interpolations into `compat`), where only the nested blocks of stage
constructors are untyped; top-level constructor arguments are already checked against their signatures.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from metadiff.errors import UserError


class ConfigError(UserError, ValueError):
    """A config key or value that cannot work; the message names the key."""


if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # a spec: a (frozen) dataclass


def accepts(value: Any, annotation: Any) -> bool:
    """Loose runtime check of a value against a simple annotation; unknown/complex annotations pass."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    if isinstance(annotation, str):  # unevaluated forward reference: cannot check
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(accepts(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        return isinstance(value, list | tuple | ListConfig)
    if origin is dict or annotation is dict:
        return isinstance(value, dict | DictConfig)
    if spec_in(annotation) is not None:
        return isinstance(value, dict | DictConfig | spec_in(annotation))
    return True


def choices(annotation: Any) -> tuple | None:
    """The values a `Literal[...]` (or `Literal[...] | None`) annotation allows, else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [choices(a) for a in typing.get_args(annotation) if a is not type(None)]
        return found[0] if len(found) == 1 else None
    return None


def rejection(key: str, value: Any, annotation: Any, owner: str) -> str:
    """The one line that refuses `value` at `key`: for a choice, the allowed values and the closest one."""
    allowed = choices(annotation)
    if allowed is None:
        return f"config key '{key}' = {value!r} has the wrong type: {owner} expects {annotation}"
    hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    return f"config key '{key}' = {value!r} is not one of {', '.join(map(repr, allowed))}" + (
        f" (did you mean {hint[0]!r}?)" if hint else ""
    )


def spec_in(annotation: Any) -> type | None:
    """The spec class an annotation names (`Spec` or `Spec | None`), else None."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        specs = [a for a in typing.get_args(annotation) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        return specs[0] if len(specs) == 1 else None
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_spec(spec: type, value: Any, key: str) -> None:
    """Raise ConfigError naming the first unknown, missing or mistyped key of `value` (the block at `key`)."""
    value = _plain(value)
    fields = {f.name: f for f in dataclasses.fields(spec)}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"config key '{key}' = {value!r} has the wrong type: expected a mapping with the keys "
            f"{sorted(fields)} ({spec.__name__})"
        )
    hints = typing.get_type_hints(spec)
    for name in value:
        if name not in fields:
            hint = difflib.get_close_matches(str(name), list(fields), n=1)
            did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown config key '{key}.{name}': {spec.__name__} has no field '{name}'{did_you_mean}")
    for name in fields:
        if name not in value:
            raise ConfigError(
                f"config key '{key}.{name}' is missing: {spec.__name__} needs it (keys: {sorted(fields)})"
            )
        sub = spec_in(hints[name])
        if sub is not None and value[name] is not None and not isinstance(value[name], sub):
            check_spec(sub, value[name], f"{key}.{name}")
        elif not accepts(value[name], hints[name]):
            raise ConfigError(rejection(f"{key}.{name}", value[name], hints[name], spec.__name__))


def as_spec(spec: type[T], value: Mapping[str, Any] | T, key: str) -> T:
    """`value` (the mapping Hydra passes, or already a `spec`) as the frozen dataclass `spec`, nested specs
    included; checked first (`check_spec`), so a constructor called outside `train` gets the same errors."""
    if isinstance(value, spec):
        return value
    check_spec(spec, value, key)
    plain = _plain(value)
    hints = typing.get_type_hints(spec)
    out = {}
    for field in dataclasses.fields(spec):
        sub, item = spec_in(hints[field.name]), plain[field.name]
        out[field.name] = as_spec(sub, item, f"{key}.{field.name}") if sub is not None and item is not None else item
    return spec(**out)
