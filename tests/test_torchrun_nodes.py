"""Several machines on an existing engine: `trainer=ddp` with `trainer.num_nodes=2`, launched by `torchrun` as two
nodes of one process each on localhost (gloo on the CPU), the launch a SLURM or multi-machine job uses. The
two-node run of `hnet_synthvqa` finds the feature store a 1-process run built (the fingerprint leaves the devices
and nodes out) and its first meta-step equals the 1-process step on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_train, written_artifact
from test_parity import HNET_TASK_ORDER

pytestmark = pytest.mark.slow

# hnet_synthvqa's config in task order with SGD: one meta-step on the global batch (8 tasks), weights compared to 1e-5
HNET = [*HNET_TASK_ORDER, "test=false", "model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=1.0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_two_nodes(args: list[str], root: Path, out: Path) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2 --nproc_per_node 1 --node_rank {0,1}` with one rendezvous on localhost, as two machines
    would start it; bounded in time so a hang fails the test instead of stalling CI."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(REPO / "train.py"),
            *args,
            f"paths.root_dir={root}",
            f"paths.output_dir={out / f'node{node}'}",
            "hydra.job.chdir=false",
        ]
        procs.append(
            subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    done = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=600)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            proc.kill()
    return done


def _learner(log: str) -> dict[str, torch.Tensor]:
    return torch.load(written_artifact(log, "hnet") / "learner.pt", weights_only=True)


def test_torchrun_two_nodes_equal_one_process_on_the_global_batch(cache_root: Path, tmp_path: Path) -> None:
    single = run_train([*HNET, "trainer.max_steps=1", "task_name=hnet_nodes_1"], cache_root)
    nodes = _torchrun_two_nodes(
        [
            *HNET,
            "trainer.max_steps=1",
            "trainer=ddp_cpu",
            "trainer.devices=1",
            "trainer.num_nodes=2",
            "task_name=hnet_nodes_2",
        ],
        cache_root,
        tmp_path,
    )
    for node, proc in enumerate(nodes):
        assert proc.returncode == 0, f"node {node} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    logs = [p.stdout + p.stderr for p in nodes]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]  # one job of two nodes, not two jobs
    assert "upstream 'features': using" in logs[0]  # the 1-process run's store: same fingerprint on 2 nodes
    one, two = _learner(single.stdout + single.stderr), _learner(logs[0])  # node 0 holds global rank 0: it publishes
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def _torchrun_job(args: list[str], root: Path, out: Path) -> subprocess.Popen:
    """One 2-rank job as `torchrun --standalone --nproc_per_node 2` starts it: both ranks at once."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "train.py"),
        *args,
        f"paths.root_dir={root}",
        f"paths.output_dir={out}",
        "hydra.job.chdir=false",
    ]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("upstream_trainer", ["[trainer]", "[]"], ids=["ddp_upstream", "one_process_upstream"])
def test_two_torchrun_jobs_sharing_a_missing_upstream_both_finish(
    upstream_trainer: str, cache_root: Path, tmp_path: Path
) -> None:
    """Two 2-rank jobs started together on one machine, each training its own HNET on the same missing upstream
    chain (CLIP -> feature store, in a fresh artifacts dir). One job's rank 0 builds each upstream (with its follower
    when the upstream inherits the trainer: a 2-rank DDP run; alone when it does not); the other's rank 0 waits for
    the build lock and its follower waits for rank 0's decision, then both reuse it. Before, the followers started
    building at once: the waiting job's follower sat in the upstream's collectives while its rank 0 went on (the job
    hung, bounded here by the timeout), and a one-process upstream was built by both ranks into one feature store."""
    common = [
        *HNET,
        "trainer.max_steps=1",
        "trainer=ddp_cpu",
        f"paths.artifacts_dir={tmp_path / 'artifacts'}",
        f"upstream.features.inherit_groups={upstream_trainer}",
    ]
    jobs = [_torchrun_job([*common, f"task_name=hnet_job{j}"], cache_root, tmp_path / f"job{j}") for j in (0, 1)]
    done = []
    try:
        for job in jobs:
            stdout, stderr = job.communicate(timeout=360)
            done.append((job.returncode, stdout + stderr))
    finally:
        for job in jobs:
            job.kill()
    for j, (code, log) in enumerate(done):
        assert code == 0, f"job {j} failed ({code}):\n{log[-6000:]}"
    built = {
        stage: sorted(p.name for p in (tmp_path / "artifacts" / stage).iterdir() if not p.name.startswith("."))
        for stage in ("clip", "features", "hnet")
    }
    assert len(built["clip"]) == len(built["features"]) == 1, built  # each upstream built once, by one job
    assert len(built["hnet"]) == 2, built
    assert sum("upstream 'features': built" in log for _, log in done) == 1  # printed by the building job's rank 0
