"""Which rank this process was launched as, before any Trainer exists."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from metadiff.utils.io import atomic_path

# Set per process by launchers that run the whole command once per rank: Lightning's subprocess launcher
# (trainer=ddp, ddp_cpu: LOCAL_RANK, NODE_RANK), torchrun (RANK) and SLURM (SLURM_PROCID).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


def launched_as_follower_rank() -> bool:
    """True in every rank but rank 0 of a job whose launcher runs the whole command per rank. Such a job builds its
    missing upstreams on all ranks in step (each build is a DDP run the ranks share), so its followers must not wait
    for a build lock that their own rank 0 holds: they would never join the run that rank 0 waits in."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in RANK_VARIABLES)


# -------------------------------------------------------------------------------------- rank 0 decides each build
BUILD, BUILT = "build", "built"
# A follower waits as long as its rank 0 waits for another job's build of the same upstream (hours on a cluster);
# the job's own time limit bounds it, so this only has to be longer than any build.
DECISION_WAIT = timedelta(days=7)


class BuildDecisions:
    """How rank 0 of a job whose launcher starts every rank at once (torchrun, srun) tells its followers, before any
    process group exists, whether it builds a missing upstream (`BUILD`: they join that DDP run) or found it built
    (`BUILT`). Without it the followers started building at once while rank 0 could still be waiting for another
    job's build lock, then skip it: the followers sat in the upstream's collectives while rank 0 went on (a deadlock).

    Decisions are numbered per artifact in the order they are taken, which every rank of a job shares (they run the
    same code), so a path decided twice in one job is two decisions. The channel: torchrun's agent store (a TCPStore
    the launcher already serves to its workers), or under srun a file per decision keyed by the job, step and restart
    (SLURM never reuses that key, so no file of another job can be read). Lightning's own launcher needs neither: it
    starts the followers when rank 0, already holding the lock, starts the upstream's training."""

    def __init__(self, store: Any | None, job_key: str | None) -> None:
        self.store, self.job_key = store, job_key
        self._count: dict[str, int] = {}

    def _key(self, path: Path) -> str:
        n = self._count[str(path)] = self._count.get(str(path), 0) + 1
        return f"{path}#{n}"

    def _file(self, key: str) -> Path:
        path, n = key.rsplit("#", 1)
        return Path(path).parent / ".locks" / f"{Path(path).name}.{self.job_key}.{n}.decision"

    def announce(self, path: Path, decision: str) -> None:
        key = self._key(path)
        if self.store is not None:
            self.store.set(f"metadiff/build/{key}", decision)
            return
        file = self._file(key)
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as tmp:
            tmp.write_text(decision)

    def wait(self, path: Path) -> str:
        key = self._key(path)
        if self.store is not None:
            return self.store.get(f"metadiff/build/{key}").decode()
        file, deadline = self._file(key), time.monotonic() + DECISION_WAIT.total_seconds()
        while not file.is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 announced no build decision for {path} in {DECISION_WAIT}")
            time.sleep(1.0)
        return file.read_text()


_DECISIONS: BuildDecisions | None = None


def build_decisions() -> BuildDecisions | None:
    """This job's channel for rank 0's build decisions, or None where no launcher starts the ranks together (one
    process, Lightning's launcher, `trainer=ddp_sim`'s spawned ranks, which build nothing)."""
    global _DECISIONS
    env = os.environ
    if _DECISIONS is None:
        if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(env.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=DECISION_WAIT)
            _DECISIONS = BuildDecisions(store, None)
        elif "SLURM_JOB_ID" in env and "TORCHELASTIC_RUN_ID" not in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            job = (
                f"slurm-{env['SLURM_JOB_ID']}-{env.get('SLURM_STEP_ID', 'batch')}-{env.get('SLURM_RESTART_COUNT', '0')}"
            )
            _DECISIONS = BuildDecisions(None, job)
    return _DECISIONS
