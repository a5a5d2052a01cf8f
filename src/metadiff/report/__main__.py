"""`python -m metadiff.report [OUTPUTS ...] [--out DIR]`: every artifact's metrics and plots on one page.

Reads `<OUTPUTS>/artifacts/<stage>/<run>/` (manifest.json, config.yaml, PNGs, plus the PNGs its run left in its
Hydra run dir) of one or more outputs dirs, and writes `<out>/report.md`, `<out>/report.html` and `<out>/plots/`.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

from metadiff.errors import UserError
from metadiff.report.collect import collect
from metadiff.report.plots import plan_plots
from metadiff.report.render import Page, render_html, render_markdown
from metadiff.report.tables import build_families
from metadiff.report.write import write_report


def default_outputs() -> Path:
    """The outputs dir a run writes to by default: `paths.root_dir`/outputs (conf/paths/default.yaml), with
    `root_dir` = $METADIFF_ROOT or the current directory."""
    return Path(os.environ.get("METADIFF_ROOT") or ".") / "outputs"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m metadiff.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "outputs", nargs="*", type=Path, help=f"outputs dirs holding artifacts/ (default: {default_outputs()})"
    )
    parser.add_argument("--out", type=Path, help="report folder (default: <first outputs dir>/report)")
    parser.add_argument(
        "--strict", action="store_true", help="fail on a malformed artifact instead of skipping it with a warning"
    )
    parser.add_argument(
        "--max-columns",
        type=int,
        default=8,
        help="headline metric columns per stage table; the rest go to a second table (default 8)",
    )
    args = parser.parse_args(argv)
    if args.max_columns < 1:
        parser.error("--max-columns must be at least 1")
    args.outputs = args.outputs or [default_outputs()]
    args.out = args.out or args.outputs[0] / "report"
    return args


def make_report(outputs: list[Path], out: Path, strict: bool = False, max_columns: int = 8) -> tuple[Path, Path]:
    """Collect, tabulate, copy plots, render and write; return the paths of report.md and report.html."""
    found = collect(outputs, strict=strict)
    for problem in found.problems:
        print(f"warning: skipped {problem}", file=sys.stderr)
    if not found.runs:
        raise UserError(f"no readable artifacts under {', '.join(map(str, outputs))}")
    families = build_families(found.runs, max_columns=max_columns)
    generated = datetime.now().strftime("%Y-%m-%d %H:%M")

    def render(plots: dict) -> tuple[str, str]:
        page = Page(families, plots, [p.resolve() for p in outputs], found.problems, generated)
        return render_markdown(page), render_html(page)

    return write_report(out, plan_plots(found.runs), render)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        paths = make_report(args.outputs, args.out, strict=args.strict, max_columns=args.max_columns)
    except UserError as err:  # bad input: one clear line, no stack trace (as train.py)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
