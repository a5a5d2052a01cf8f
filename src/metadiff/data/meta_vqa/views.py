"""Views of one task's examples ("dataSubType" in the original code, spec §2.5) and n-shot sampling.

| view        | examples                                                                          |
|-------------|-----------------------------------------------------------------------------------|
| `train`     | the task's train split (evaluation support)                                       |
| `test`      | the task's test split (evaluation query; meta-training support by default)        |
| `traintest` | train + test                                                                      |
| `random`    | train + test, a random subset of ceil(N f) examples, f ~ U[2/3, 1)                |
| `random50`  | train + test, a random half (ceil(N / 2))                                          |

Randomness comes from the caller's `numpy.random.Generator` instead of global RNGs, so a DataLoader worker or a
DDP rank draws reproducible views from its own seed. n-shot sampling keeps the original's rule: per answer, a fresh
`RandomState(n_shot_seed)` permutes that answer's examples and the first n are kept, so the n-shot support of a
task is the same in every run, stage and view order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from metadiff.data.meta_vqa.tasks import Task

VIEWS = ("train", "test", "traintest", "random", "random50")
Example = tuple[str, int]


def task_view(
    task: Task, view: str, rng: np.random.Generator | None = None, data_idx: Sequence[int] | None = None
) -> list[Example]:
    """The examples of `task` in `view` (`data_idx` indexes train + test and overrides the view)."""
    both = list(task.train + task.test)
    if data_idx is not None:
        return [both[i] for i in data_idx]
    if view in ("train", "test", "traintest"):
        return list(task.split(view))
    if view not in VIEWS:
        raise ValueError(f"unknown task view '{view}' (expected one of {', '.join(VIEWS)})")
    if rng is None:
        raise ValueError(f"task view '{view}' is random: pass a numpy Generator")
    fraction = rng.uniform(2 / 3, 1.0) if view == "random" else 0.5
    size = math.ceil(len(both) * fraction)
    return [both[i] for i in rng.permutation(len(both))[:size]]


def n_shot(examples: Sequence[Example], n_answers: int, n: int | None, seed: int = 42) -> list[Example]:
    """At most `n` examples per answer (answer order; `None` keeps all), chosen by a fresh RNG per answer."""
    if n is None:
        return list(examples)
    if n < 1:
        raise ValueError(f"n_shot must be >= 1 or null (all examples), got {n}")
    out: list[Example] = []
    for answer in range(n_answers):
        mine = [ex for ex in examples if ex[1] == answer]
        order = np.random.RandomState(seed).permutation(len(mine))
        out += [mine[i] for i in order[:n]]
    return out


def split_random_disjoint(task: Task, rng: np.random.Generator, query_fraction: float = 2 / 3) -> tuple[list, list]:
    """MAML's `val_subtype=random`: re-split train + test at random into disjoint support and query."""
    both = list(task.train + task.test)
    order = rng.permutation(len(both))
    n_query = math.floor(len(both) * query_fraction)
    return [both[i] for i in order[n_query:]], [both[i] for i in order[:n_query]]
