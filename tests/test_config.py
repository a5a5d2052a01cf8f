"""The real config tree composes for every experiment, and bad config fails before any work, naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import CONF_DIR, EXPERIMENTS, compose_config, run_train
from metadiff.config import ConfigError, validate_config


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment: str, tmp_path: Path) -> None:
    cfg = compose_config([f"experiment={experiment}"], tmp_path, tmp_path / "out")
    validate_config(cfg)
    assert cfg.task_name == experiment
    assert OmegaConf.is_missing(cfg, "stage") is False
    for group in ("data", "model", "trainer"):
        assert "_target_" in cfg[group], f"{experiment}: {group} has no _target_"


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_sim", "ddp_cpu"])
@pytest.mark.parametrize("logger", ["csv", "wandb", "tensorboard", "many_loggers"])
def test_trainer_and_logger_groups_validate(trainer: str, logger: str, tmp_path: Path) -> None:
    cfg = compose_config([f"trainer={trainer}", f"logger={logger}"], tmp_path, tmp_path / "out")
    validate_config(cfg)
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


@pytest.mark.parametrize("debug", ["fdr", "overfit", "limit", "short_chain", "[short_chain,fdr]"])
def test_debug_configs_validate(debug: str, tmp_path: Path) -> None:
    validate_config(compose_config([f"debug={debug}"], tmp_path, tmp_path / "out"))


def test_short_chain_selects_with_other_debug_options(tmp_path: Path) -> None:
    """`debug=[short_chain,fdr]`: both options apply (a second `debug=` override would replace the first)."""
    cfg = compose_config(["experiment=hyperldm_synthvqa", "debug=[short_chain,fdr]"], tmp_path, tmp_path / "out")
    assert cfg.trainer.fast_dev_run is True
    assert list(cfg.upstream_overrides.clip_synthvqa) == [
        "trainer.max_steps=2",
        "data.n_train_pairs=512",
        "data.n_val_tasks=5",
    ]


def test_misspelt_override_fails_before_any_work(tmp_path: Path) -> None:
    proc = run_train(["trainer.max_epoch=1"], tmp_path, check=False, timeout=120)
    assert proc.returncode != 0
    assert "max_epoch" in proc.stderr
    assert not (tmp_path / "outputs" / "data").exists(), "work started before the config error"


def test_misspelt_key_inside_config_names_it_and_suggests(tmp_path: Path) -> None:
    cfg = compose_config(["+trainer.max_epoch=1"], tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"'trainer\.max_epoch'.*did you mean 'max_epochs'"):
        validate_config(cfg)


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("latents_per_bach", "latents_per_batch"),  # the subclass's own key
        ("tasks_per_bach", "tasks_per_batch"),
    ],
)  # a key it forwards
def test_misspelt_key_of_a_datamodule_forwarding_kwargs_is_caught(key: str, suggestion: str, tmp_path: Path) -> None:
    cfg = compose_config(["experiment=vae_synthvqa", f"+data.{key}=3"], tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match=rf"'data\.{key}'.*did you mean '{suggestion}'"):
        validate_config(cfg)


def test_wrong_type_names_key(tmp_path: Path) -> None:
    cfg = compose_config(["trainer.max_epochs=three"], tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"'trainer\.max_epochs' = 'three' has the wrong type"):
        validate_config(cfg)


def test_unknown_top_level_key_and_wrong_top_level_type(tmp_path: Path) -> None:
    cfg = compose_config(["+sed=1"], tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"unknown top-level config key 'sed' \(did you mean 'seed'\?\)"):
        validate_config(cfg)
    cfg = compose_config(["seed=abc"], tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"'seed' = 'abc'"):
        validate_config(cfg)


def test_generator_typo_names_nested_key(tmp_path: Path) -> None:
    from metadiff.data.synthvqa.source import SynthVQASource

    cfg = compose_config(["experiment=clip_synthvqa"], tmp_path, tmp_path / "out")
    generator = OmegaConf.to_container(cfg.data.source.generator)
    generator["n_scene"] = 10
    with pytest.raises(ConfigError, match=r"data\.source\.generator\.n_scene"):
        SynthVQASource(
            cache_dir=str(tmp_path), generator=generator, answer_prompt=None, meta_val={"fraction": 0.0, "seed": 0}
        )
    generator.pop("n_scene")
    generator["scene"]["colour"] = "red"
    with pytest.raises(ConfigError, match=r"data\.source\.generator\.scene\.colour"):
        SynthVQASource(
            cache_dir=str(tmp_path), generator=generator, answer_prompt=None, meta_val={"fraction": 0.0, "seed": 0}
        )


def test_unimportable_target_is_named(tmp_path: Path) -> None:
    cfg = compose_config([], tmp_path, tmp_path / "out")
    with open_dict(cfg):
        cfg.model._target_ = "metadiff.stages.nope.Missing"
    with pytest.raises(ConfigError, match=r"'model\._target_': cannot import 'metadiff\.stages\.nope\.Missing'"):
        validate_config(cfg)


def test_config_error_from_cli_is_one_clear_line(tmp_path: Path) -> None:
    proc = run_train(["+model.learning_rat=0.1"], tmp_path, check=False, timeout=120)
    assert proc.returncode != 0
    assert "unknown config key 'model.learning_rat'" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------- selection reads validation, never test (spec §8 B24)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_optimises_a_validation_metric(experiment: str, tmp_path: Path) -> None:
    """What a sweep ranks runs by is a `val/*` metric (meta-val tasks, or held-out images of the training classes);
    only a stage that does not train may leave it null (it has nothing to select)."""
    cfg = compose_config([f"experiment={experiment}"], tmp_path, tmp_path / "out")
    metric = cfg.optimized_metric
    if metric is None:
        assert not cfg.train, f"{experiment} trains but names no optimized_metric"
    else:
        assert metric.startswith("val/"), f"{experiment}: optimized_metric = {metric}"


def test_every_sweep_optimises_a_validation_metric(tmp_path: Path) -> None:
    """Each hparams_search config, composed with the experiment its usage line names, optimises a `val/*` metric."""
    sweeps = sorted((CONF_DIR / "hparams_search").glob("*.yaml"))
    assert sweeps
    for path in sweeps:
        usage = re.search(r"python train\.py -m experiment=(\S+) hparams_search=" + path.stem, path.read_text())
        assert usage, f"{path}: no usage line 'python train.py -m experiment=... hparams_search={path.stem}'"
        cfg = compose_config([f"experiment={usage[1]}", f"hparams_search={path.stem}"], tmp_path, tmp_path / "out")
        assert str(cfg.optimized_metric).startswith("val/"), f"{path.stem}: optimized_metric = {cfg.optimized_metric}"
