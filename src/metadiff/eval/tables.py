"""The results table a stage hands to `metadiff.run` (`Stage.set_results_text`), printed as the last lines of a run.

One format for every stage's headline figures: a title, then one line per figure, `label  mean +- ci95` (a key with a
`_ci95` twin in the report) or `label  value`. A paired difference (a key named `<a>_minus_<b>`, as
`eval.per_task.paired_report` names them) is signed. Labels are phrases, never one word: the run's metrics block
above the table is read back as `name value` lines (tests/conftest.py `parse_summary`), and a table line must not
look like one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Row = tuple[str, str]  # (label, report key)


def figure(report: Mapping[str, float], key: str) -> str:
    """`mean +- ci95` of `key` (its value alone without a `_ci95` twin); signed for a paired difference."""
    value = f"{report[key]:+.3f}" if "_minus_" in key else f"{report[key]:.3f}"
    ci = report.get(f"{key}_ci95")
    return value if ci is None else f"{value} +- {ci:.3f}"


def results_table(title: str, report: Mapping[str, float], rows: Sequence[Row], width: int = 52) -> str:
    """The title, then one line per (label, key) of `rows` whose key is in `report` (others left out: an option
    that was off)."""
    lines = ["", title]
    lines += [f"  {label:<{width}s} {figure(report, key)}" for label, key in rows if key in report]
    return "\n".join(lines)
