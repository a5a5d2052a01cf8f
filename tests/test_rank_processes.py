"""`trainer=ddp_sim`'s launcher (`metadiff.utils.distributed.run_in_rank_processes`): spawned ranks that each run a
whole function as one DDP job, rank 0's value returned, a rank's error raised as itself; and the evaluation sampler
that gives every rank all items (`EveryRankSampler`), checked inside a real 2-rank Lightning test loop."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.environments import LightningEnvironment
from torch.utils.data import DataLoader

from conftest import TWO_RANKS, run_metrics, run_train
from metadiff.config import ConfigError
from metadiff.data.samplers import EveryRankSampler
from metadiff.utils.distributed import RankFailedError, StageRanksDDPStrategy, run_in_rank_processes

N_ITEMS = 7  # odd: Lightning's padded sampler would repeat item 0 on the second rank


def _rank_and_world() -> tuple[int, int]:
    return int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def _fails_on_rank_one() -> None:
    if _rank_and_world()[0] == 1:
        raise ConfigError("model.width: expected an int, got 'wide'")


class _Unpicklable(Exception):
    def __init__(self, message: str, handle: object):
        super().__init__(message)
        self.handle = handle


def _raises_unpicklable() -> None:
    raise _Unpicklable("rank failed", handle=lambda: None)


class _SeenItems(pl.LightningModule):
    """Records which items each rank's test loop sees, gathered onto every rank."""

    def __init__(self, every_rank: bool):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.every_rank = every_rank
        self.seen: list[int] = []

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.seen += batch.flatten().tolist()

    def test_dataloader(self) -> DataLoader:
        items = torch.arange(N_ITEMS)
        return DataLoader(items, batch_size=2, sampler=EveryRankSampler(items) if self.every_rank else None)


def _test_loop_items(every_rank: bool) -> list[list[int]]:
    model = _SeenItems(every_rank)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=StageRanksDDPStrategy(),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.test(model)
    seen = [None] * trainer.world_size
    torch.distributed.all_gather_object(seen, model.seen)
    return seen


def test_rank_zero_value_comes_back_from_two_ranks() -> None:
    assert run_in_rank_processes(_rank_and_world, (), world_size=2) == (0, 2)


def test_an_error_in_a_rank_is_raised_as_itself() -> None:
    """A bad-input error in rank 1 reaches `train.py` as the same ConfigError (one line for the user), with the
    rank's traceback as a note; an error that cannot be pickled comes back as its text."""
    with pytest.raises(ConfigError, match="model.width: expected an int") as caught:
        run_in_rank_processes(_fails_on_rank_one, (), world_size=2)
    assert any("in stage rank 1 of 2" in note for note in caught.value.__notes__)
    with pytest.raises(RankFailedError, match="_Unpicklable: rank failed"):
        run_in_rank_processes(_raises_unpicklable, (), world_size=2)


def test_every_rank_evaluates_all_items_once_under_two_rank_ddp() -> None:
    """Inside a 2-rank Lightning test loop: with `EveryRankSampler` each rank sees every item once, in order (the
    per-task values of one process); with a plain loader Lightning shards and pads, so a rank misses items and item 0
    is seen twice overall. The second half shows the first could fail."""
    whole = run_in_rank_processes(_test_loop_items, (True,), world_size=2)
    assert whole == [list(range(N_ITEMS))] * 2
    sharded = run_in_rank_processes(_test_loop_items, (False,), world_size=2)
    assert sorted(sharded[0] + sharded[1]) == [0, *range(N_ITEMS)]


# What a SLURM allocation puts in a job's environment (one task on one node): Lightning picks its SLURMEnvironment
# from these and would read every spawned rank as global rank 0 of SLURM_NTASKS=1.
FAKE_SLURM = {
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "metadiff",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}


def test_ddp_sim_inside_a_slurm_allocation_runs_its_own_two_ranks(tmp_path: Path) -> None:
    """`trainer=ddp_sim` in a SLURM job: the ranks it starts join as ranks 0 and 1 of 2 and the stage publishes its
    artifact. Before the ranks took Lightning's own environment explicitly, SLURM's refused devices=2 against
    --ntasks-per-node=1 (and without that variable both ranks were rank 0 of 1, the second failing on the port)."""
    proc = run_train(
        [
            "experiment=classifier_glyphs",
            "trainer=ddp_sim",
            "trainer.max_steps=2",
            "test=false",
            "trainer.enable_progress_bar=false",
        ],
        tmp_path,
        timeout=180,
        env=FAKE_SLURM,
    )
    output = proc.stdout + proc.stderr
    assert output.count(TWO_RANKS) == 1, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output, output[-3000:]
    assert run_metrics(proc, "classifier")["train/loss"] > 0
    assert isinstance(StageRanksDDPStrategy().cluster_environment, LightningEnvironment)
