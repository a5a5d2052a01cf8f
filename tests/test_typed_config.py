"""Typed stage configs and the stage contract, checked on every experiment: every nested block a stage constructor
takes has a spec (metadiff.config.typed), so a misspelt key anywhere in it fails before any work, naming the key in
full; and every experiment's `stage:` is one its model class runs."""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning.pytorch as pl
import pytest
from omegaconf import DictConfig, OmegaConf, open_dict

from conftest import EXPERIMENTS, compose_config, run_train
from metadiff.config import ConfigError, validate_config
from metadiff.config.typed import as_spec, spec_in
from metadiff.pipeline import upstream_names
from metadiff.stages.base import ImageSetData, LatentData, Stage


def nested_blocks(cfg: DictConfig) -> list[tuple[str, typing.Any]]:
    """(dotted key, annotation) of every mapping without `_target_` given to a constructor named by a `_target_`,
    and of every mapping nested in one of those (e.g. `data.source.generator.scene`)."""
    found: list[tuple[str, typing.Any]] = []

    def inside(node: DictConfig, key: str) -> None:
        for name in node:
            child = node._get_node(name)
            if isinstance(child, DictConfig) and not child._is_none() and "_target_" not in child:
                found.append((f"{key}.{name}", None))
                inside(child, f"{key}.{name}")

    def walk(node: typing.Any, key: str) -> None:
        if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():
            return
        if "_target_" in node:
            target = hydra.utils.get_object(node._target_)
            hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
            for name in node:
                child = node._get_node(name)
                if isinstance(child, DictConfig) and not child._is_none() and "_target_" not in child:
                    found.append((f"{key}.{name}", hints.get(str(name))))
                    inside(child, f"{key}.{name}")
        for name in node:
            if not str(name).startswith("_") and name not in ("hydra", "upstream", "upstream_overrides"):
                walk(node._get_node(name), f"{key}.{name}" if key else str(name))

    walk(cfg, "")
    return found


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_nested_block_of_every_experiment_is_typed(experiment: str, tmp_path: Path) -> None:
    cfg = compose_config([f"experiment={experiment}"], tmp_path, tmp_path / "out")
    blocks = nested_blocks(cfg)
    untyped = [key for key, annotation in blocks if annotation is not None and spec_in(annotation) is None]
    assert not untyped, f"{experiment}: nested blocks without a spec: {untyped}"
    for key, _ in blocks:
        first = str(next(iter(OmegaConf.select(cfg, key))))
        typo = f"{key}.{first}x"
        broken = cfg.copy()
        with open_dict(broken):
            OmegaConf.update(broken, typo, 1, force_add=True)
        with pytest.raises(ConfigError, match=rf"'{typo.replace('.', chr(92) + '.')}'"):
            validate_config(broken)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_names_a_stage_its_model_runs(experiment: str, tmp_path: Path) -> None:
    cfg = compose_config([f"experiment={experiment}"], tmp_path, tmp_path / "out")
    target = hydra.utils.get_class(cfg.model._target_)
    assert issubclass(target, Stage) and cfg.stage in target.stage_names(), (cfg.stage, target)


@pytest.mark.parametrize(
    "experiment, block", [("dfml_glyphs", "model.generation"), ("hyperldm_synthvqa", "model.sampling")]
)
def test_a_misspelt_key_in_an_experiment_file_fails_before_any_work(
    experiment: str, block: str, tmp_path: Path
) -> None:
    """A real experiment YAML (on Hydra's search path) that extends `experiment` with one misspelt nested key: the
    command fails in one line naming the key, and nothing was built."""
    (tmp_path / "extra" / "experiment").mkdir(parents=True)
    leaf, *parents = reversed(block.split("."))
    body = {"stepz": 3}
    for part in [leaf, *parents]:
        body = {part: body}
    (tmp_path / "extra" / "experiment" / "typo.yaml").write_text(
        "# @package _global_\ndefaults:\n  - " + experiment + "\n  - _self_\n" + OmegaConf.to_yaml(body)
    )
    proc = run_train(
        [f"hydra.searchpath=[file://{tmp_path / 'extra'}]", "experiment=typo"], tmp_path, check=False, timeout=120
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if f"'{block}.stepz'" in line]
    assert errors, proc.stderr[-3000:]
    assert not (tmp_path / "outputs" / "data").exists() and not (tmp_path / "outputs" / "artifacts").exists()


def test_a_stage_class_must_write_its_artifact() -> None:
    with pytest.raises(TypeError, match="must implement write_artifact"):
        type("Broken", (Stage,), {}, name="broken")


def test_a_stage_name_that_its_model_does_not_run_fails_before_any_work(tmp_path: Path) -> None:
    proc = run_train(["experiment=vae_synthvqa", "stage=hyperldm"], tmp_path, check=False, timeout=120)
    assert proc.returncode != 0
    assert "stage: 'hyperldm' but model._target_ metadiff.stages.vae.VAEModule runs 'vae'" in proc.stderr
    assert not (tmp_path / "outputs" / "artifacts").exists()


@dataclass(frozen=True)
class Inner:
    steps: int


@dataclass(frozen=True)
class Outer:
    lr: float
    inner: Inner | None


def test_as_spec_builds_nested_specs_and_names_missing_keys() -> None:
    built = as_spec(Outer, {"lr": 0.1, "inner": {"steps": 3}}, "model.opt")
    assert built == Outer(0.1, Inner(3)) and as_spec(Outer, built, "model.opt") is built
    assert as_spec(Outer, {"lr": 1, "inner": None}, "model.opt").inner is None
    with pytest.raises(ConfigError, match=r"'model\.opt\.inner\.steps' is missing"):
        as_spec(Outer, {"lr": 0.1, "inner": {}}, "model.opt")
    with pytest.raises(ConfigError, match=r"'model\.opt\.lr' = 'fast' has the wrong type"):
        as_spec(Outer, {"lr": "fast", "inner": None}, "model.opt")


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["experiment=hyperldm_synthvqa", "model.sampling.method=ddimm"],
            "config key 'model.sampling.method' = 'ddimm' is not one of 'ddim', 'ddpm', 'original' (did you mean 'ddim'?)",
        ),
        (
            ["experiment=diffusion_unet_glyphs", "model.schedule.name=cosin"],
            "config key 'model.schedule.name' = 'cosin' is not one of 'linear', 'cosine', 'sqrt_linear', 'sqrt', "
            "'quad' (did you mean 'cosine'?)",
        ),
        (
            ["experiment=dfml_glyphs", "compat.mode=faithfull"],
            "config key 'model.compat' = 'faithfull' is not one of 'fixed', 'faithful' (did you mean 'faithful'?)",
        ),
        (
            ["experiment=vae_synthvqa", "~upstream.hnet"],
            "upstream.hnet is missing: stage 'vae' reads an upstream 'hnet' with this config",
        ),
        (
            ["experiment=hyperldm_synthvqa", "~upstream.hyperclip"],
            "upstream.hyperclip is missing: stage 'hyperldm' reads an upstream 'hyperclip' with this config",
        ),
        (
            ["experiment=diffusion_zoo_glyphs", "~upstream.unet"],
            "upstream.unet0 is missing: stage 'diffusion_zoo' reads an upstream 'unet0' with this config",
        ),
        (
            ["experiment=hyperldm_synthvqa", "model.hyperclip_guidance.cfg_scale=2.0"],
            "model.hyperclip_guidance.cfg_scale = 2: its rows are paired against the CFG row at the scale they sample "
            "with, and model.guidance_scales = [0.0, 1.0, 1.5, 4.0, 7.5, 15.0] has no such row; add it",
        ),
    ],
    ids=[
        "sampler_method",
        "schedule",
        "compat",
        "vae_without_hnet",
        "hyperclip_guidance_without_hyperclip",
        "zoo_without_members",
        "guided_rows_without_their_cfg_row",
    ],
)
def test_a_bad_choice_or_a_missing_upstream_fails_before_any_work(
    overrides: list[str], line: str, tmp_path: Path
) -> None:
    """A misspelt choice (a `Literal` field of a spec or constructor) and an upstream the stage reads but the config
    does not declare both fail when the config is composed, naming the key: before, `model.sampling.method=ddimm`
    built the whole chain (HNET training two minutes in) and failed in the last stage."""
    proc = run_train(overrides, tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and line in out, out[-2000:]
    assert "building it now" not in out and not (tmp_path / "outputs" / "artifacts").exists()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_declares_the_upstreams_its_stage_reads(experiment: str, tmp_path: Path) -> None:
    """`Stage.required_upstreams` is the one declaration of what a stage reads (its constructor checks nothing of
    its own): every experiment names them all in `upstream:`."""
    cfg = compose_config([f"experiment={experiment}"], tmp_path, tmp_path / "out")
    required = hydra.utils.get_class(cfg.model._target_).required_upstreams(cfg.model)
    assert set(required) <= set(upstream_names(cfg)), (experiment, required, upstream_names(cfg))


class _Probe(Stage, name="probe"):
    def write_artifact(self, directory: Path) -> None:
        pass


def test_a_stage_reads_its_datamodule_through_a_view_that_names_what_is_missing() -> None:
    module = _Probe()
    module.trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    # Lightning sets `datamodule` on its trainer when fit/test starts, without declaring it
    module.trainer.datamodule = SimpleNamespace(adaptation="the dataset")  # type: ignore[attr-defined]
    assert module.datamodule_view(LatentData).adaptation == "the dataset"
    with pytest.raises(ConfigError, match=r"stage 'probe' reads 'source' of its datamodule \(ImageSetData\)"):
        module.datamodule_view(ImageSetData)


def test_a_stage_built_without_an_upstream_it_reads_fails_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"stage 'probe' reads an upstream 'hnet' \(required_upstreams\)"):
        _Probe.upstream_artifact({}, "hnet")
