"""Where each run's plots go inside the report folder, and copying them there.

Plots are copied, not linked, so the report folder can be moved or zipped on its own; every page refers to them by
a path relative to itself: `plots/<stage>/<run>/<file>.png`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from metadiff.report.collect import Run

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"


@dataclass(frozen=True)
class Plot:
    source: Path
    relpath: str  # from the report folder, '/'-separated

    @property
    def name(self) -> str:
        return self.source.name


def plan_plots(runs: Sequence[Run]) -> dict[Path, list[Plot]]:
    """Artifact path -> its plots' places in the report. Two runs with the same stage/run name (the same artifact in
    two outputs dirs) get distinct folders (`<run>-2`)."""
    taken: set[tuple[str, str]] = set()
    plan: dict[Path, list[Plot]] = {}
    for run in runs:
        folder, n = run.name, 1
        while (run.stage, folder) in taken:
            n += 1
            folder = f"{run.name}-{n}"
        taken.add((run.stage, folder))
        plan[run.path] = [Plot(p, f"{PLOTS_DIR}/{run.stage}/{folder}/{p.name}") for p in run.plots]
    return plan


def copy_plots(plan: dict[Path, list[Plot]], plots_dir: Path) -> dict[Path, list[Plot]]:
    """Copy every planned plot into `plots_dir` (the report's `plots/`); return the plan without the plots that
    vanished meanwhile, so the pages never show a broken image."""
    copied: dict[Path, list[Plot]] = {}
    for run, plots in plan.items():
        copied[run] = []
        for plot in plots:
            target = plots_dir / Path(plot.relpath).relative_to(PLOTS_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(plot.source, target)
            except FileNotFoundError:
                log.warning("plot %s disappeared before it could be copied", plot.source)
                continue
            copied[run].append(plot)
    return copied
