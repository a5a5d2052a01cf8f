"""Which rank this process was launched as, before any Trainer exists."""

from __future__ import annotations

import os

# Set per process by launchers that run the whole command once per rank: Lightning's subprocess launcher
# (trainer=ddp, ddp_cpu: LOCAL_RANK, NODE_RANK), torchrun (RANK) and SLURM (SLURM_PROCID).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


def launched_as_follower_rank() -> bool:
    """True in every rank but rank 0 of a job whose launcher runs the whole command per rank. Such a job builds its
    missing upstreams on all ranks in step (each build is a DDP run the ranks share), so its followers must not wait
    for a build lock that their own rank 0 holds: they would never join the run that rank 0 waits in."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in RANK_VARIABLES)
