"""Write the report folder so that it is never seen half-written.

The plots are copied into a temporary `plots/` that is renamed into place, then each page is written under a
temporary name and renamed (metadiff.utils.io), HTML last. A crash leaves the previous report, not a mix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from metadiff.errors import UserError
from metadiff.report.plots import PLOTS_DIR, Plot, copy_plots
from metadiff.utils.io import atomic_dir, atomic_path

MARKER = ".metadiff-report"  # in `plots/`: the folder is ours to replace


class ReportOutError(UserError, FileExistsError):
    """`--out` holds a `plots/` folder that this tool did not write."""


def write_report(
    out: Path, plan: dict[Path, list[Plot]], render: Callable[[dict[Path, list[Plot]]], tuple[str, str]]
) -> tuple[Path, Path]:
    """Copy the planned plots into `<out>/plots/`, render the pages from the plots that were copied, write
    `<out>/report.md` and `<out>/report.html`; return their paths."""
    out = Path(out)
    plots_dir = out / PLOTS_DIR
    if plots_dir.exists() and not (plots_dir / MARKER).exists():
        raise ReportOutError(
            f"{plots_dir} exists and was not written by metadiff.report (no {MARKER} in it): "
            f"refusing to replace it; pick another --out"
        )
    with atomic_dir(plots_dir, overwrite=True) as tmp:
        (tmp / MARKER).write_text("written by python -m metadiff.report; replaced on every run\n")
        markdown, page = render(copy_plots(plan, tmp))
    paths = (out / "report.md", out / "report.html")
    for path, text in zip(paths, (markdown, page), strict=True):
        with atomic_path(path) as tmp_file:
            tmp_file.write_text(text, encoding="utf-8")
    return paths
