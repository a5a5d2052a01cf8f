"""Sharing one artifacts dir between processes: an upstream is built once, and concurrent publishes never tear it."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from metadiff.utils.io import atomic_dir, build_lock
from metadiff.utils.ranks import RANK_VARIABLES, launched_as_follower_rank


def _build_once(target: str, log: str) -> None:
    """What `_find_or_build` does: check under the lock, build (slowly) only if nobody has."""
    path = Path(target)
    with build_lock(path):
        if path.exists():
            return
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        with atomic_dir(path) as tmp:
            (tmp / "weights.txt").write_text("done")


def _publish(target: str, content: str) -> None:
    for _ in range(20):
        with atomic_dir(Path(target), overwrite=True) as tmp:
            (tmp / "weights.txt").write_text(content)


def test_two_processes_build_a_shared_upstream_once(tmp_path: Path) -> None:
    target, log = tmp_path / "clip" / "clip-abc", tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build_once, args=(str(target), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text().splitlines() == ["built"]
    assert (target / "weights.txt").read_text() == "done"
    assert sorted(p.name for p in target.parent.iterdir()) == [".locks", "clip-abc"]


def test_concurrent_overwriting_publishes_leave_one_complete_copy(tmp_path: Path) -> None:
    target = tmp_path / "stage" / "task-abc"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_publish, args=(str(target), name)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (target / "weights.txt").read_text() in {"a", "b"}
    assert [p.name for p in target.parent.iterdir()] == ["task-abc"]  # no temporary or moved-aside copies left


@pytest.mark.parametrize(("env", "follower"), [
    ({}, False),
    ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, False),  # rank 0 after Lightning's launcher set its variables
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, True),   # a rank that Lightning's subprocess launcher started
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, True),   # rank 0 of the second node
    ({"RANK": "3"}, True),                          # torchrun
    ({"SLURM_PROCID": "2"}, True),
    ({"SLURM_PROCID": "0"}, False),
])
def test_follower_ranks_are_told_apart_before_any_trainer(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                          follower: bool) -> None:
    # followers build a missing upstream alongside their rank 0 instead of waiting for the lock it holds
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launched_as_follower_rank() is follower
