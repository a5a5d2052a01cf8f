"""DDP helpers: stage ranks started by metadiff itself (`trainer=ddp_sim`), and gathering rows computed on ranks."""

from __future__ import annotations

import logging
import logging.config
import multiprocessing
import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any, TypeVar, cast

import lightning.pytorch as pl
import torch
import torch.multiprocessing as mp
from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning.pytorch.plugins.environments import ClusterEnvironment, LightningEnvironment
from lightning.pytorch.strategies import DDPStrategy
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

T = TypeVar("T")

# Ranks are forked from a forkserver that has imported these once per launching process: a fresh interpreter spends
# ~10 s importing torch and lightning on a 2-core machine, once per rank and stage of a chain under spawn. A
# forkserver child is a clean process (not a fork of this one, its threads or its CUDA state), as under spawn.
RANK_START_METHOD = "forkserver"
RANK_PRELOAD = ["torch", "lightning.pytorch", "metadiff.run"]


class StageRanksDDPStrategy(DDPStrategy):
    """DDP over processes that `metadiff.run` started, each of which runs the whole stage (`run_in_rank_processes`).

    Why not Lightning's spawn launcher (`ddp_spawn`): it spawns fresh processes for each phase (fit, then test) and
    hands back to the launching process only rank 0's parameters, `callback_metrics` and the first ModelCheckpoint's
    path. A stage's result is more than that: networks sized from the data in `setup()`, per-episode values gathered
    in test hooks, the artifact written from that state. Here each rank runs fit, test and (rank 0) the artifact write
    in one process, as under torchrun; the launching process only receives rank 0's metrics. Started by metadiff (not
    re-run from the command line like `trainer=ddp`), so it works inside a Hydra multirun job and from a direct
    `train(cfg)` call.
    The ranks find `LOCAL_RANK` set (Lightning's rule for processes created outside it), so this strategy launches
    nothing itself; `metadiff.run.train` sees the class and starts the processes.

    The ranks' cluster environment is Lightning's own (`LightningEnvironment`, which reads the variables
    `_rank_main` sets), whatever else the environment holds: inside a SLURM allocation Lightning would pick
    `SLURMEnvironment` from `SLURM_*` and read every rank as `SLURM_PROCID` of `SLURM_NTASKS` (rank 0 of 1 in a
    one-task job: two rank 0s on one port), or refuse the device count against `--ntasks-per-node`."""

    def __init__(self, *, cluster_environment: ClusterEnvironment | None = None, **kwargs: Any) -> None:
        super().__init__(cluster_environment=cluster_environment or LightningEnvironment(), **kwargs)


def free_port() -> int:
    """A TCP port free now on this host, for the ranks' rendezvous (the ranks must all be told the same one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RankFailedError(RuntimeError):
    """A stage rank failed with an error that could not be sent back as itself (not picklable)."""


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    logging_config: dict[str, Any] | None,
) -> None:
    """Body of one rank: the environment a launcher gives a rank (what Lightning reads to join the ranks
    without launching any), logging (rank 0 as the launching job logs; other ranks warnings only, so messages are not
    doubled), then `fn(*args)`. Rank 0 sends its return value back; any rank sends its error back as itself."""
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            "NODE_RANK": "0",
            "LOCAL_RANK": str(rank),
        }
    )
    # a forkserver child inherits "forkserver" as its default start method; its DataLoader workers would then each
    # re-import torch. `python train.py` starts with the platform's default: so does a rank.
    multiprocessing.set_start_method(None, force=True)
    # Lightning sets these when the strategy sets up; messages before that (loggers, hparams) read them already
    # `rank` is a function attribute (Lightning sets it the same way), which the decorator's overloaded type lacks
    fabric_rank_zero_only.rank = utils_rank_zero_only.rank = rank  # type: ignore[attr-defined]
    if rank == 0 and logging_config:
        logging.config.dictConfig(logging_config)
    else:
        logging.basicConfig(level=logging.WARNING)
    try:
        value = fn(*args)
        if torch.distributed.is_initialized():
            # a gloo rank that reaches interpreter exit with its process group alive can abort in the gloo destructor
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    except BaseException as err:
        err.add_note(f"(in stage rank {rank} of {world_size}:\n{''.join(traceback.format_exception(err)).rstrip()})")
        results.put((rank, "error", _picklable(err)))
        raise
    if rank == 0:
        results.put((rank, "ok", value))


def _picklable(err: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any error that cannot cross processes is sent as its text
        return RankFailedError(f"{type(err).__name__}: {err}")


def run_in_rank_processes(
    fn: Callable[..., T], args: tuple[Any, ...], world_size: int, logging_config: dict[str, Any] | None = None
) -> T:
    """Run `fn(*args)` in `world_size` new processes that form one DDP job (a `StageRanksDDPStrategy` trainer
    in each joins it); return rank 0's value, or raise the first error a rank raised, as itself (so a ConfigError in
    a rank is still one line). torch's process context stops the other ranks when one fails, so none is left
    waiting in a collective. Results are drained while the ranks run: a pipe fills at 64 KiB."""
    start = mp.get_context(RANK_START_METHOD)
    start.set_forkserver_preload(RANK_PRELOAD)  # takes effect when this process first starts its forkserver
    results = start.SimpleQueue()
    context = mp.start_processes(
        _rank_main,
        args=(world_size, free_port(), fn, args, results, logging_config),
        nprocs=world_size,
        join=False,
        start_method=RANK_START_METHOD,
    )
    received: list[tuple[int, str, Any]] = []

    def drain() -> None:
        while not results.empty():
            received.append(results.get())

    try:
        while not context.join(timeout=0.5):
            drain()
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        drain()
        errors = [value for _, kind, value in received if kind == "error"]
        if errors:
            raise errors[0] from None
        raise
    drain()
    (value,) = [value for rank, kind, value in received if kind == "ok" and rank == 0]
    return value


def _all_gather(module: pl.LightningModule, tensor: torch.Tensor) -> torch.Tensor:
    # Lightning's all_gather returns a collection of the input's shape: for one tensor, one tensor
    return cast(torch.Tensor, module.all_gather(tensor))


def gather_rows(module: pl.LightningModule, index: torch.Tensor, values: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Scatter (index, values) from every rank into one [n_rows, ...] tensor present on every rank."""
    if module.trainer is None or module.trainer.world_size == 1:
        out = values.new_zeros((n_rows, *values.shape[1:]))
        out[index] = values
        return out
    count = torch.tensor([index.numel()], device=values.device)
    counts = _all_gather(module, count).flatten()
    pad = int(counts.max()) - index.numel()
    index_p = torch.cat([index, index.new_full((pad,), -1)])
    values_p = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))])
    all_index = _all_gather(module, index_p).flatten()
    all_values = _all_gather(module, values_p).reshape(-1, *values.shape[1:])
    keep = all_index >= 0
    out = values.new_zeros((n_rows, *values.shape[1:]))
    out[all_index[keep]] = all_values[keep]
    return out
