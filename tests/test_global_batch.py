"""The world size changes neither the recipe nor the artifact's identity: configured batch sizes are global
(`metadiff.data.global_batch`), the fingerprint leaves out where and on how many devices a stage runs, and an
upstream that inherits the trainer group is composed for the same devices. The 2-rank run that gives the one-process
metrics on the same global batch is `tests/test_parity.py::test_hnet_on_two_ranks_gives_the_one_process_metrics`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import compose_config
from metadiff.config import ConfigError
from metadiff.data.global_batch import EpochOrderShard, per_rank_batch
from metadiff.data.samplers import EpochOrder
from metadiff.pipeline import compose_upstream
from metadiff.store import config_fingerprint

LAUNCHERS = [["trainer=cpu"], ["trainer=ddp_sim"], ["trainer=ddp_cpu"], ["trainer=ddp_sim", "trainer.devices=4"]]


@pytest.mark.parametrize("experiment", ["hnet_synthvqa", "hyperldm_synthvqa", "diffusion_unet_glyphs"])
def test_the_fingerprint_is_the_same_on_any_world_size(experiment: str, tmp_path: Path) -> None:
    prints = {
        " ".join(o): config_fingerprint(compose_config([f"experiment={experiment}", *o], tmp_path, tmp_path / "o"))
        for o in LAUNCHERS
    }
    assert len(set(prints.values())) == 1, prints
    # GPU runs: one GPU vs DDP on all of a node's GPUs, same precision: one artifact
    gpu = [
        config_fingerprint(compose_config([f"experiment={experiment}", f"trainer={t}"], tmp_path, tmp_path / "o"))
        for t in ("gpu", "ddp")
    ]
    assert gpu[0] == gpu[1]


def test_precision_and_the_recipe_still_change_it(tmp_path: Path) -> None:
    def fp(*overrides: str) -> str:
        return config_fingerprint(compose_config(["experiment=hnet_synthvqa", *overrides], tmp_path, tmp_path / "o"))

    assert fp() != fp("trainer.precision=bf16-mixed")
    assert fp() != fp("data.tasks_per_batch=16")


def test_an_upstream_that_inherits_the_trainer_gets_the_same_devices(tmp_path: Path) -> None:
    """hnet_synthvqa's `features` upstream inherits the trainer group: before, `trainer.devices=3` stayed behind
    and the upstream was composed with the group's 2 devices inside a 3-rank job."""
    cfg = compose_config(["experiment=hnet_synthvqa", "trainer=ddp_sim", "trainer.devices=3"], tmp_path, tmp_path / "o")
    features = compose_upstream(cfg, "features")
    assert features.trainer.devices == 3 and features.trainer.accelerator == "cpu"
    listed = compose_config(
        ["experiment=hnet_synthvqa", "trainer=ddp_sim", "trainer.devices=[0,1]"], tmp_path, tmp_path / "o"
    )
    assert list(compose_upstream(listed, "features").trainer.devices) == [0, 1]


def test_a_global_batch_that_does_not_divide_is_refused_in_one_line() -> None:
    assert per_rank_batch(32, 4, "data.tasks_per_batch") == 8
    with pytest.raises(
        ConfigError,
        match=r"^data.tasks_per_batch=30: a global batch size must be a positive "
        r"multiple of the number of ranks \(4\)",
    ):
        per_rank_batch(30, 4, "data.tasks_per_batch")


def _batches(sampler, batch_size: int) -> list[list[int]]:
    return [b.tolist() for b in DataLoader(range(30), batch_size=batch_size, sampler=sampler)]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_the_ranks_batches_together_are_the_one_process_batches(world: int, shuffle: bool) -> None:
    """One process iterating a seeded epoch order in batches of 6 vs `world` ranks each taking its share: batch b of
    every rank together is the one-process batch b (sets: the order inside a batch does not change a mean gradient).
    A DistributedSampler (what the Meta-VQA and latent loaders used before) cuts other global batches."""
    order = EpochOrder(30, seed=3, epoch=2, shuffle=shuffle)
    one = _batches(order, 6)
    shards = [_batches(EpochOrderShard(range(30), order, r, world), 6 // world) for r in range(world)]
    assert [sorted(sum((s[b] for s in shards), [])) for b in range(len(one))] == [sorted(b) for b in one]
    if shuffle:
        dist = [
            _batches(torch.utils.data.DistributedSampler(range(30), world, r, shuffle=True, seed=3), 6 // world)
            for r in range(world)
        ]
        assert [sorted(sum((s[b] for s in dist), [])) for b in range(len(one))] != [sorted(b) for b in one]
