"""The run loop: config -> DataModule, LightningModule, callbacks, loggers, Trainer -> fit / test / predict.

`train.py` is a thin Hydra entry point around `train(cfg)`; tests call `train` directly. Missing upstream stages
are found or built by `metadiff.pipeline`, which is handed `train` as its stage runner (it never imports this module).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, cast

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from omegaconf import DictConfig, OmegaConf

from metadiff.config import ConfigError, validate_config
from metadiff.errors import InputFileError, MissingInputError, UserError
from metadiff.logs import quiet_third_party
from metadiff.pipeline import instantiate_with_upstream, resolve_upstreams, upstream_names
from metadiff.progress import stdout_is_terminal
from metadiff.stages.base import Stage
from metadiff.store import Artifact, publish_artifact
from metadiff.utils.distributed import StageRanksDDPStrategy, run_in_rank_processes
from metadiff.utils.io import atomic_path

log = logging.getLogger(__name__)


class OptimizedMetricError(UserError, KeyError):
    """A sweep optimises a metric that the run did not log."""


def _instantiate_list(group: DictConfig | None) -> list[Any]:
    """Callbacks/loggers are dicts of named entries (so experiments can drop one by name)."""
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def save_resolved_config(cfg: DictConfig) -> Path:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "resolved_config.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def checked_ckpt_path(cfg: DictConfig) -> str | None:
    """`ckpt_path` as Lightning takes it, checked first so a bad one fails in one line before any work.

    `last` resumes from `<paths.output_dir>/checkpoints/last.ckpt` when it exists and starts fresh otherwise
    (Lightning's own rule), so a crashed job's command line, rerun with `ckpt_path=last`, resumes it. Lightning writes
    checkpoints through an fsspec transaction (temp file, then move), so a killed run never leaves half a
    `last.ckpt`; a file truncated in a copy is caught here (a torch checkpoint is a zip whose index is at the end)."""
    path = cfg.get("ckpt_path")
    if path in (None, "last", "hpc"):
        return path
    file = Path(path)
    if not file.is_file():
        raise MissingInputError(
            f"ckpt_path={path}: no such checkpoint file (use ckpt_path=last to resume the run in "
            f"paths.output_dir if it has one)"
        )
    try:
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise InputFileError(f"ckpt_path={path}: not a readable checkpoint, truncated or corrupt ({err})") from None
    if not any(name.endswith("/data.pkl") for name in names):
        raise InputFileError(f"ckpt_path={path}: a zip file but not a torch checkpoint (no data.pkl inside)")
    return str(file)


def selected_checkpoint(trainer: pl.Trainer) -> str | None:
    """The checkpoint the test reads: the best one of the run's monitored `ModelCheckpoint` (selection on a validation
    metric, e.g. `callbacks=select_best`), or None (the weights as trained) when there is none or it saved nothing
    (no validation ran, fast_dev_run). `ckpt_path="best"` would take the first ModelCheckpoint, which here is the
    unmonitored one that keeps `last.ckpt` for resuming."""
    monitored = [
        cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor is not None
    ]
    if len(monitored) > 1:
        raise ConfigError(
            f"callbacks: {len(monitored)} ModelCheckpoints with a monitor "
            f"({', '.join(str(cb.monitor) for cb in monitored)}); the test reads one selected checkpoint"
        )
    return (monitored[0].best_model_path or None) if monitored else None


def _close_loggers(loggers: list[Logger], status: str) -> None:
    """Finish every logger even on error, so W&B/TensorBoard never leave a dangling run behind."""
    for logger in loggers:
        try:
            logger.finalize(status)
        except Exception as err:  # noqa: BLE001 - closing must not mask the original error
            log.warning("could not finalize logger %s: %s", type(logger).__name__, err)
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=0 if status == "success" else 1)


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value)
        elif isinstance(value, int | float):
            out[key] = float(value)
    return out


def _route_lightning_logs_to_root() -> None:
    """Lightning adds its own console handler when imported before Hydra configures logging; drop it so each
    message is printed once, in Hydra's format, and also lands in the run's log file."""
    if not logging.getLogger().hasHandlers():
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lightning_log = logging.getLogger(name)
        for handler in list(lightning_log.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_log.removeHandler(handler)
        lightning_log.propagate = True


def peak_memory() -> dict[str, float]:
    """Peak memory so far, in MiB, recorded with every run's metrics and artifact manifest (what `make bench`
    reports per experiment): this process (its upstreams built in-process included), its largest child process
    (DDP-spawned ranks, DataLoader workers) and the CUDA allocator."""
    import resource

    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # ru_maxrss: KiB on Linux, bytes on macOS
    out = {
        "sys/peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
        "sys/peak_child_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["sys/peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _check_stage_class(cfg: DictConfig) -> None:
    """`model._target_` is a stage (`metadiff.stages.base.Stage`, the hooks this loop calls) that can run the stage
    the experiment names in `stage:`: checked from the config, before any upstream is built."""
    target = hydra.utils.get_class(cfg.model._target_)
    if not issubclass(target, Stage):
        raise ConfigError(
            f"model._target_ {cfg.model._target_} is not a stage (a subclass of metadiff.stages.base.Stage)"
        )
    if cfg.stage not in target.stage_names():
        raise ConfigError(
            f"stage: '{cfg.stage}' but model._target_ {cfg.model._target_} runs "
            f"{' or '.join(repr(n) for n in target.stage_names())}"
        )
    target.check_config(cfg.model)
    declared = upstream_names(cfg)
    for name in target.required_upstreams(cfg.model):
        if name not in declared:
            raise ConfigError(
                f"upstream.{name} is missing: stage '{cfg.stage}' reads an upstream '{name}' with this config "
                f"(declared: {declared or 'none'}); add it to the experiment's `upstream:` block"
            )


def _check_stage(cfg: DictConfig, model: Stage) -> None:
    """The built module runs the experiment's stage (a class serving several stages derives it from its config)."""
    if model.stage_name != cfg.stage:
        raise ConfigError(
            f"stage: '{cfg.stage}' but model._target_ {cfg.model._target_} runs stage '{model.stage_name}'"
        )


def _refuse_lightning_spawn(trainer: pl.Trainer) -> None:
    """Lightning's own spawn launcher (`strategy=ddp_spawn`) runs fit and test in fresh processes each and hands back
    to the launching process only rank 0's parameters and `callback_metrics`: a stage's networks sized in `setup()`,
    its gathered per-episode values and its artifact would come from an untrained, detached module. Refused in one
    line; `trainer=ddp_sim` spawns ranks that each run the whole stage (`metadiff.utils.distributed`)."""
    start_method = getattr(trainer.strategy, "_start_method", "popen")  # DDPStrategy's launcher choice
    if start_method != "popen" and trainer.world_size > 1:
        raise ConfigError(
            f"trainer.strategy: {type(trainer.strategy).__name__} with start method "
            f"'{start_method}' runs each phase in fresh processes and returns only "
            f"rank 0's parameters; use trainer=ddp_sim (spawned ranks that each run the whole stage) "
            f"or trainer=ddp / ddp_cpu (the command run once per rank)"
        )


def _spawns_stage_ranks(cfg: DictConfig) -> bool:
    """True when the trainer's strategy is `StageRanksDDPStrategy` (`trainer=ddp_sim`): this process starts the ranks,
    and each runs the stage (`_run_stage`) as one DDP job."""
    strategy = cfg.trainer.get("strategy")
    return (
        isinstance(strategy, DictConfig)
        and "_target_" in strategy
        and issubclass(hydra.utils.get_class(strategy._target_), StageRanksDDPStrategy)
    )


def _stage_rank_count(cfg: DictConfig) -> int:
    """How many ranks `trainer=ddp_sim` spawns: the devices of this one node, as a count or a list of ids."""
    devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
    if nodes != 1:
        raise ConfigError(
            f"trainer.num_nodes: {nodes}, but {cfg.trainer.strategy._target_} spawns its ranks on "
            f"this node only; use trainer=ddp on several nodes"
        )
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return devices
    if OmegaConf.is_list(devices) and len(devices) >= 1:
        return len(devices)
    raise ConfigError(
        f"trainer.devices: {devices!r}, but {cfg.trainer.strategy._target_} needs the number of ranks "
        f"to spawn (an int >= 1 or a list of device ids)"
    )


def _job_logging() -> dict[str, Any] | None:
    """Hydra's logging config of this job (console and the run's log file), for rank 0 of spawned stage ranks."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return cast(dict[str, Any], OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True))  # a mapping


def _ddp_strategy_for(cfg: DictConfig, model: Stage) -> dict[str, Any]:
    """The trainer's `strategy` argument when the stage needs DDP's `find_unused_parameters` (a step that leaves
    parameters out of a backward pass, e.g. dfml's two optimizers): it belongs to the stage, not to the `trainer`
    group (1-device runs have no reducer), and Lightning takes it only where the strategy is built. A registered
    name gets its `_find_unused_parameters_true` twin, a `_target_` DDP strategy the constructor argument; no
    strategy (1 device) or another kind is left as configured."""
    strategy = cfg.trainer.get("strategy")
    if not model.ddp_find_unused_parameters or strategy is None:
        return {}
    if isinstance(strategy, str):
        twin = f"{strategy}_find_unused_parameters_true"
        return {"strategy": twin} if twin in StrategyRegistry.available_strategies() else {}
    if "_target_" in strategy and issubclass(hydra.utils.get_class(strategy._target_), DDPStrategy):
        return {"strategy": hydra.utils.instantiate(strategy, find_unused_parameters=True)}
    return {}


def _restore_default_start_method() -> None:
    """A job of the joblib launcher runs in a loky worker, whose default multiprocessing start method is 'loky':
    DataLoader workers then fail to start ("Got pickle error when attempting to start a worker Process"). The
    job owns its worker process, so it goes back to the platform's default start method."""
    if multiprocessing.get_start_method(allow_none=True) == "loky":
        multiprocessing.set_start_method(None, force=True)


def _process_settings(cfg: DictConfig) -> None:
    """Logging, multiprocessing and matmul settings every process that runs a stage needs (stage ranks included)."""
    _route_lightning_logs_to_root()
    quiet_third_party()
    _restore_default_start_method()
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "high"))


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one stage as configured; return its final scalar metrics."""
    _process_settings(cfg)
    validate_config(cfg)
    _check_stage_class(cfg)
    ckpt_path = checked_ckpt_path(cfg)
    stage_ranks = _stage_rank_count(cfg) if _spawns_stage_ranks(cfg) else None  # checked before any work
    start = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    save_resolved_config(cfg)

    upstream = resolve_upstreams(cfg, build=train)  # missing ones are built here, by this function, isolated
    if stage_ranks is not None:
        # resolved here: interpolations such as ${hydra:runtime.output_dir} need this process's Hydra state
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        OmegaConf.set_struct(resolved, OmegaConf.is_struct(cfg))
        metrics, results_text = run_in_rank_processes(
            _run_stage_in_rank, (resolved, upstream, ckpt_path), world_size=stage_ranks, logging_config=_job_logging()
        )
    else:
        metrics, results_text = _run_stage(cfg, upstream, ckpt_path)

    for key, value in metrics.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"stage '{cfg.stage}': metric '{key}' is {value}")
    metrics["time/run_seconds"] = time.time() - start
    _print_summary(cfg, metrics, results_text)
    return metrics


def _run_stage_in_rank(
    cfg: DictConfig, upstream: dict[str, Artifact], ckpt_path: str | None
) -> tuple[dict[str, float], str | None]:
    """`_run_stage` in a rank that `run_in_rank_processes` spawned: a fresh interpreter, so it first gets the
    process settings `train` made in the launching process."""
    _process_settings(cfg)
    return _run_stage(cfg, upstream, ckpt_path)


def _run_stage(
    cfg: DictConfig, upstream: dict[str, Artifact], ckpt_path: str | None
) -> tuple[dict[str, float], str | None]:
    """Build the stage's DataModule, module and Trainer; fit, test, predict and publish its artifact (rank 0).
    Returns the run's scalar metrics and the stage's results text. Runs in every rank of a DDP job."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the stage starts from its seed, whatever ran first

    log.info("stage '%s' (%s): instantiating data <%s>", cfg.stage, cfg.task_name, cfg.data._target_)
    datamodule: pl.LightningDataModule = instantiate_with_upstream(cfg.data, upstream)
    log.info("instantiating model <%s>", cfg.model._target_)
    model = instantiate_with_upstream(cfg.model, upstream)
    _check_stage(cfg, model)
    callbacks = _instantiate_list(cfg.get("callbacks"))
    loggers = _instantiate_list(cfg.get("logger"))
    # Lightning's bar redraws a terminal line; in a file it is carriage-return debris (TQDM) or nothing until the end
    # (Rich). Off a terminal, callbacks.progress (metadiff.progress.ProgressLines) logs progress lines instead.
    bar = bool(cfg.trainer.enable_progress_bar) and stdout_is_terminal()
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        enable_progress_bar=bar,
        **_ddp_strategy_for(cfg, model),
    )

    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    _refuse_lightning_spawn(trainer)
    status = "failed"
    metrics: dict[str, float] = {}
    try:
        if cfg.get("train", True):
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
            metrics.update(_scalar_metrics(trainer.callback_metrics))
        if cfg.get("test", False):
            trainer.test(model=model, datamodule=datamodule, ckpt_path=selected_checkpoint(trainer))
            metrics.update(_scalar_metrics(trainer.callback_metrics))
        if cfg.get("predict", False):
            # A stage that can tell its output is already complete and current (e.g. a feature store) skips work.
            if not model.stage_complete():
                trainer.predict(model=model, datamodule=datamodule, return_predictions=False)
            metrics.update(_scalar_metrics(trainer.callback_metrics))
        metrics.update(model.summary_metrics)
        metrics.update(peak_memory())
        if cfg.get("artifact") is not None and trainer.is_global_zero and model.artifact_ready:
            publish_artifact(cfg, model.write_artifact, metrics, upstream)
        # every rank goes on only once rank 0 has published: the next stage of a chain reads this artifact on every
        # rank (a no-op in one process)
        trainer.strategy.barrier("artifact published")
        status = "success"
    finally:
        _close_loggers(loggers, status)
    return metrics, model.results_text


def _print_summary(cfg: DictConfig, metrics: dict[str, float], results_text: str | None = None) -> None:
    """The run's metrics block (tests/conftest.py `parse_summary` reads it): printed after loggers are closed and
    everything else is done, so it is the last thing a run prints (tests/test_logs.py checks). A stage that sets
    `results_text` (its results table and plot path, e.g. hyperldm's claims) has it printed after the metrics, so a
    run ends with what a person reads first."""
    lines = [f"== {cfg.task_name} ({cfg.stage}) finished: =="]
    lines += [f"  {key:<40s} {value:.4f}" for key, value in sorted(metrics.items())]
    if results_text:
        lines += ["", results_text.strip("\n"), ""]
    lines.append(f"  outputs: {cfg.paths.output_dir}")
    print("\n".join(lines), flush=True)


def optimized_metric(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a Hydra sweeper minimises/maximises (`optimized_metric` key)."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name in metrics:
        return metrics[name]
    message = f"optimized_metric '{name}' was not logged (test={cfg.get('test')}); logged metrics: {sorted(metrics)}"
    if _is_multirun():  # a sweeper cannot rank this job: that is an error in the sweep's config
        raise OptimizedMetricError(message)
    log.warning("%s", message)
    return None


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
