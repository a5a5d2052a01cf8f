"""Runs -> one table per stage, stages grouped by family, with a seed-aggregate row per set of seeds.

Nothing here knows a stage's metric names. A stage's headline columns are its `test/*` metrics that carry a 95% CI
(`<name>_ci95`) and its paired differences (`<a>_minus_<b>`); the differences also rank them: a metric a stage
compares against others (or others against it) is what the stage is about, so it comes first. Rows are labelled by
task, variant, seed and the config keys that set a run apart from the other runs of its task.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from metadiff.report.collect import Run
from metadiff.store import DEFAULT_FINGERPRINT_EXCLUDE

FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "HyperCLIP / HyperLDM",
        ("clip", "features", "multitask", "maml", "hnet", "adaptation", "vae", "hyperclip", "hyperldm"),
    ),
    ("Data-free meta-learning", ("classifier", "diffusion_unet", "diffusion_zoo", "dfml", "diffusionmix")),
)
OTHER_FAMILY = "Other stages"
CI = "_ci95"
DIFF = "_minus_"
# Config keys that never tell two runs' results apart (where they ran, how they logged): the artifact fingerprint's
# own exclusions, except the upstream choices, which do change a result.
IGNORED_KEYS = tuple(k for k in DEFAULT_FINGERPRINT_EXCLUDE if k not in ("upstream", "upstream_overrides")) + ("hydra",)
MAX_LABEL_KEYS = 3


# ------------------------------------------------------------------------------------------------ formatting
def fmt(x: float, signed: bool = False) -> str:
    """A metric value: 3 decimals (`0.606`), large counts whole, tiny values to 2 significant digits; `+` on
    differences."""
    sign = "+" if signed else "-"
    a = abs(x)
    if a >= 10 and float(x).is_integer():
        text = f"{int(x):{sign}d}"
    elif a >= 1000:
        text = f"{x:{sign}.1f}"
    elif a == 0 or a >= 0.001:
        text = f"{x:{sign}.3f}"
    elif a >= 1e-8:  # two significant digits, still fixed-point so that a column reads as one scale
        text = f"{x:{sign}.{1 - math.floor(math.log10(a))}f}"
    else:
        text = f"{x:{sign}.1e}"
    return "0.000" if text in ("-0.000", "+0.000") else text


@dataclass(frozen=True)
class Cell:
    """A formatted value; `detail` is secondary text (a seed aggregate's min-max range)."""

    text: str
    detail: str = ""

    def plain(self) -> str:
        return f"{self.text} {self.detail}".strip()


def value_cell(metrics: dict[str, float], key: str) -> Cell:
    """`0.606 ± 0.023` where the metric has a CI partner, else the bare value."""
    signed = DIFF in key
    if key + CI in metrics:
        return Cell(f"{fmt(metrics[key], signed)} ± {fmt(metrics[key + CI])}")
    return Cell(fmt(metrics[key], signed))


def spread_cell(values: Sequence[float], signed: bool) -> Cell:
    """Mean, sample standard deviation and [min, max] over seeds."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return Cell(
        f"{fmt(statistics.fmean(values), signed)} sd {fmt(sd)}",
        f"[{fmt(min(values), signed)}, {fmt(max(values), signed)}]",
    )


def natural_key(text: str) -> list[Any]:
    """Sort `cfg1.5` before `cfg15` and `2shot` before `10shot`."""
    return [
        (0, float(part), "") if i % 2 else (1, 0.0, part) for i, part in enumerate(re.split(r"(\d+(?:\.\d+)?)", text))
    ]


# ------------------------------------------------------------------------------------------- headline metrics
def is_difference(key: str) -> bool:
    return DIFF in key.rpartition("/")[2]


def _sides(key: str) -> tuple[str, str]:
    """`test/guidance/guided_minus_init` -> (`test/guidance/guided`, `test/guidance/init`)."""
    space, _, name = key.rpartition("/")
    left, _, right = name.partition(DIFF)
    prefix = f"{space}/" if space else ""
    return prefix + left, prefix + right


def _compared(side: str, difference: str, plain: Sequence[str]) -> list[str]:
    """The plain metrics a side of a difference names: itself, or itself with the difference's suffix
    (`trained` in `trained_minus_random_init_1shot` is `trained_1shot`), or the one metric it prefixes."""
    exact = [p for p in plain if p == side or (p.startswith(side) and difference.endswith(p[len(side) :]))]
    if exact:
        return exact
    loose = [p for p in plain if p.startswith(side + "_")]
    return loose if len(loose) == 1 else []


def headline_metrics(keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """(plain headline metrics, paired differences), each most telling first.

    Headline: `test/*` metrics with a CI, and `test/*` differences. A stage without them (features, adaptation,
    the zoo, the classifier) falls back to any metric with a CI outside train/val/sys, then `test/*`, then `val/*`."""
    keys = set(keys)
    values = sorted((k for k in keys if not k.endswith(CI)), key=natural_key)
    tiers = [
        [k for k in values if k.startswith("test/") and (k + CI in keys or is_difference(k))],
        [k for k in values if k + CI in keys and not k.startswith(("train/", "val/", "sys/"))],
        [k for k in values if k.startswith("test/")],
        [k for k in values if k.startswith("val/")],
    ]
    chosen = next((tier for tier in tiers if tier), [])
    diffs = [k for k in chosen if is_difference(k)]
    plain = [k for k in chosen if not is_difference(k)]
    score: dict[str, int] = defaultdict(int)
    for d in diffs:
        for side in _sides(d):
            for p in _compared(side, d, plain):
                score[p] += 1
    plain.sort(key=lambda p: (-score[p], natural_key(p)))
    rank = {p: i for i, p in enumerate(plain)}

    def minuend_rank(d: str) -> int:
        return min((rank[p] for p in _compared(_sides(d)[0], d, plain)), default=len(plain))

    diffs.sort(key=lambda d: (minuend_rank(d), natural_key(d)))
    return plain, diffs


def main_columns(plain: Sequence[str], diffs: Sequence[str], cap: int) -> list[str]:
    """At most `cap` columns: up to a third of them paired differences, the rest plain metrics; a short list
    leaves its slots to the other."""
    n_diff = min(len(diffs), max(cap // 3, 1)) if diffs else 0
    n_plain = min(len(plain), cap - n_diff)
    n_diff = min(len(diffs), cap - n_plain)
    return [*plain[:n_plain], *diffs[:n_diff]]


# ------------------------------------------------------------------------------------------- config labels
def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted key -> value text. `upstream_overrides.<experiment>` lists of `key=value` become keys of their own, so
    a seed handed down a chain (`seed=1`) is recognised as the seed."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, key + "."))
        elif (
            isinstance(v, list)
            and key.startswith("upstream_overrides.")
            and all(isinstance(i, str) and "=" in i for i in v)
        ):
            for item in v:
                name, _, value = item.lstrip("+~").partition("=")
                out[f"{key}.{name}"] = value
        else:
            out[key] = _text(v)
    return out


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in IGNORED_KEYS)


@dataclass(frozen=True)
class Labelled:
    run: Run
    overrides: tuple[str, ...]  # `key=value` of the keys that set it apart from the other runs of its task
    signature: tuple[str | None, ...]  # those values: equal signature = same config up to the seed


def label_runs(runs: Sequence[Run]) -> list[Labelled]:
    """Label the runs of one task (same task_name and variant) by the config keys whose values differ between them,
    leaving out the seed and every key that tracks it (`data.seed`, `model.train_seed`, `upstream_overrides.*.seed`:
    equal to the run's `seed` in every run)."""
    flats = [flatten_config(r.config) for r in runs]
    keys = set().union(*flats)
    seed_like = {"seed"}
    if all(r.seed is not None for r in runs):
        seed_like |= {k for k in keys if all(f.get(k) == _text(r.seed) for f, r in zip(flats, runs, strict=True))}
    varying = sorted(
        (k for k in keys if k not in seed_like and not _ignored(k) and len({f.get(k) for f in flats}) > 1),
        key=natural_key,
    )
    return [
        Labelled(r, tuple(f"{k}={f.get(k, '(unset)')}" for k in varying), tuple(f.get(k) for k in varying))
        for r, f in zip(runs, flats, strict=True)
    ]


# -------------------------------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class Row:
    """A run, or (`run` None) the aggregate over the seeds of the runs above it."""

    label: str  # task_name [variant]
    seed: str
    overrides: tuple[str, ...]
    cells: dict[str, Cell]
    run: Run | None = None
    n_seeds: int = 1

    @property
    def is_aggregate(self) -> bool:
        return self.run is None

    @property
    def aggregate_note(self) -> str:
        return f"mean over {self.n_seeds} seeds" if self.is_aggregate else ""

    def config_text(self, limit: int = MAX_LABEL_KEYS) -> str:
        shown = ", ".join(self.overrides[:limit])
        more = len(self.overrides) - limit
        return f"{shown} (+{more} more)" if more > 0 else shown


@dataclass(frozen=True)
class StageTable:
    stage: str
    prefix: str  # namespace every main column shares, shown once instead of in each header
    columns: list[str]  # main columns (full metric keys)
    more: list[str]  # every other metric, for the second table
    rows: list[Row]
    runs: list[Run]

    def header(self, key: str) -> str:
        return key[len(self.prefix) :]


@dataclass(frozen=True)
class Family:
    name: str
    stages: list[StageTable] = field(default_factory=list)


def family_of(stage: str) -> str:
    return next((name for name, stages in FAMILIES if stage in stages), OTHER_FAMILY)


def _task_label(run: Run) -> str:
    return run.task_name if run.variant is None else f"{run.task_name} [{run.variant}]"


def _aggregate(group: Sequence[Labelled]) -> Row:
    runs = [g.run for g in group]
    shared = set.intersection(*(set(r.metrics) for r in runs))
    cells = {k: spread_cell([r.metrics[k] for r in runs], is_difference(k)) for k in shared if not k.endswith(CI)}
    seeds = ", ".join(_text(r.seed) for r in runs)
    return Row(label=_task_label(runs[0]), seed=seeds, overrides=group[0].overrides, cells=cells, n_seeds=len(runs))


def _rows(runs: Sequence[Run]) -> list[Row]:
    by_task: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        by_task[(run.task_name, run.variant or "")].append(run)
    rows: list[Row] = []
    for task in sorted(by_task, key=lambda t: (natural_key(t[0]), natural_key(t[1]))):
        groups: dict[tuple[str | None, ...], list[Labelled]] = defaultdict(list)
        for labelled in label_runs(by_task[task]):
            groups[labelled.signature].append(labelled)
        for signature in sorted(groups, key=lambda s: natural_key(json.dumps(s))):
            group = sorted(groups[signature], key=lambda g: natural_key(_text(g.run.seed)))
            for g in group:
                cells = {k: value_cell(g.run.metrics, k) for k in g.run.metrics if not k.endswith(CI)}
                rows.append(
                    Row(
                        _task_label(g.run),
                        _text(g.run.seed) if g.run.seed is not None else "–",
                        g.overrides,
                        cells,
                        run=g.run,
                    )
                )
            if len(group) > 1 and len({_text(g.run.seed) for g in group}) > 1:
                rows.append(_aggregate(group))
    return rows


def stage_table(stage: str, runs: Sequence[Run], max_columns: int = 8) -> StageTable:
    """One stage's table: headline columns (capped), every other metric kept for the second table."""
    keys = set().union(*(r.metrics for r in runs))
    plain, diffs = headline_metrics(keys)
    columns = main_columns(plain, diffs, max_columns)
    prefix = os.path.commonprefix(columns).rpartition("/")[0] if columns else ""
    prefix = f"{prefix}/" if prefix else ""
    shown = set(columns)
    rest = [k for k in [*plain, *diffs] if k not in shown]
    others = sorted((k for k in keys if not k.endswith(CI) and k not in shown and k not in rest), key=natural_key)
    return StageTable(stage, prefix, columns, [*rest, *others], _rows(runs), list(runs))


def build_families(runs: Iterable[Run], max_columns: int = 8) -> list[Family]:
    """Families in pipeline order (stages within them too); unknown stages last, in an 'other' family."""
    by_stage: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_stage[run.stage].append(run)
    order = [s for _, stages in FAMILIES for s in stages]
    families = [Family(name) for name, _ in FAMILIES] + [Family(OTHER_FAMILY)]
    for stage in sorted(by_stage, key=lambda s: (order.index(s) if s in order else len(order), s)):
        family = next(f for f in families if f.name == family_of(stage))
        family.stages.append(stage_table(stage, by_stage[stage], max_columns))
    return [f for f in families if f.stages]
