"""The feature store: image, question and answer embeddings as memory-mappable `.npy` tables with an index.

Layout of a store directory:
    manifest.json          fingerprint (model + data), model/data descriptions, table shapes, throughput
    index.json             {"image": {name: row}, "question": {question: row}, "answer": {question: [first_row, n]}}
    image.npy question.npy answer.npy    float32 [rows, dim], opened with mmap_mode="r"
The whole directory is built under a temporary name and renamed when complete, so readers never see a half-written
store. A store built for another model or other data is refused (FeatureStoreMismatchError), never silently reused.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metadiff.errors import UserError
from metadiff.utils.io import read_json, tmp_sibling, write_json

TABLES = ("image", "question", "answer")


class FeatureStoreMismatchError(UserError, RuntimeError):
    """A store exists at the requested path but was built from another model or other data."""


@dataclass(frozen=True)
class FeatureIndex:
    image: dict[str, int]
    question: dict[str, int]
    answer: dict[str, tuple[int, int]]  # question -> (first row, number of answers), rows in answer order


class FeatureStore:
    """Read access to a finished store (memory-mapped, so a 123k-image table costs no RAM until touched)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest = read_json(self.root / "manifest.json", what="feature store manifest")
        raw = read_json(self.root / "index.json", what="feature store index")
        self.index = FeatureIndex(
            image=raw["image"], question=raw["question"], answer={q: tuple(v) for q, v in raw["answer"].items()}
        )
        self.tables = {name: np.load(self.root / f"{name}.npy", mmap_mode="r") for name in TABLES}

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def dim(self) -> int:
        return int(self.tables["image"].shape[1])

    def images(self, names: Sequence[str]) -> np.ndarray:
        try:
            rows = [self.index.image[n] for n in names]
        except KeyError as err:
            raise KeyError(f"feature store {self.root} has no image {err.args[0]!r}") from None
        return np.asarray(self.tables["image"][rows])

    def question(self, question: str) -> np.ndarray:
        if question not in self.index.question:
            raise KeyError(f"feature store {self.root} has no question {question!r}")
        return np.array(self.tables["question"][self.index.question[question]])  # a copy: writable, off the memmap

    def answers(self, question: str) -> np.ndarray:
        if question not in self.index.answer:
            raise KeyError(f"feature store {self.root} has no answers for question {question!r}")
        first, n = self.index.answer[question]
        return np.array(self.tables["answer"][first : first + n])  # a copy: writable, off the memmap


def check_existing(root: Path, fingerprint: str, description: Mapping[str, Any]) -> bool:
    """True if a complete store for exactly this fingerprint exists; raise if one for something else does."""
    root = Path(root)
    if not (root / "manifest.json").is_file():
        return False
    manifest = read_json(root / "manifest.json", what="feature store manifest")
    if manifest.get("fingerprint") == fingerprint:
        return True
    theirs = manifest.get("description", {})
    diffs = [f"{k}: store has {theirs.get(k)!r}, config asks {v!r}" for k, v in description.items() if theirs.get(k) != v]
    raise FeatureStoreMismatchError(
        f"feature store {root} was built for a different model or data ({'; '.join(diffs) or 'fingerprint differs'}). "
        "Point the run at another store directory or delete this one."
    )


class FeatureStoreBuilder:
    """Writes a store into `<root>.partial/`: preallocated memmaps filled by row, then renamed by `commit()`.

    Every process of a DDP run opens the same memmaps (rank 0 creates them, the others attach after a barrier) and
    writes the rows it computed; per-table `filled` markers, also memory-mapped, let the committer check that no row
    was missed whichever rank computed it. A run that was killed leaves `<root>.partial/` behind with its markers:
    the next run for the same fingerprint reopens it and computes only the rows still `pending` (a row's values are
    written before its marker, so a marked row is complete). Nothing under `.partial` is ever read as a store.
    """

    def __init__(self, root: Path, dim: int, index: FeatureIndex, fingerprint: str, create: bool = True):
        self.root = Path(root)
        self.index = index
        self.partial = self.root.with_name(self.root.name + ".partial")
        rows = {
            "image": len(index.image),
            "question": len(index.question),
            "answer": sum(n for _, n in index.answer.values()),
        }
        self.resumed = create and self._resumable(fingerprint, rows, dim)
        if create and not self.resumed:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            open_table = lambda name, n, dtype, width: np.lib.format.open_memmap(  # noqa: E731
                self.partial / name, mode="w+", dtype=dtype, shape=(n, width) if width else (n,)
            )
        else:
            open_table = lambda name, n, dtype, width: np.load(self.partial / name, mmap_mode="r+")  # noqa: E731
        self.tables = {name: open_table(f"{name}.npy", n, np.float32, dim) for name, n in rows.items()}
        self.filled = {name: open_table(f"filled_{name}.npy", n, np.bool_, 0) for name, n in rows.items()}
        if create and not self.resumed:  # the marker goes last: without it a leftover folder is never resumed
            write_json(self.partial / "partial.json", {"fingerprint": fingerprint, "rows": rows, "dim": dim})

    def _resumable(self, fingerprint: str, rows: Mapping[str, int], dim: int) -> bool:
        marker = self.partial / "partial.json"
        if not marker.is_file():
            return False
        try:
            meta = read_json(marker, what="partial feature store marker")
        except UserError:
            return False
        return meta == {"fingerprint": fingerprint, "rows": dict(rows), "dim": dim}

    def pending(self, table: str) -> np.ndarray:
        """Rows of `table` not computed yet (all of them for a fresh store)."""
        return np.flatnonzero(~np.asarray(self.filled[table]))

    def write(self, table: str, rows: np.ndarray, values: np.ndarray) -> None:
        self.tables[table][rows] = values
        self.filled[table][rows] = True

    def abort(self) -> None:
        self.tables.clear()
        self.filled.clear()
        shutil.rmtree(self.partial, ignore_errors=True)

    def commit(self, fingerprint: str, description: Mapping[str, Any], extra: Mapping[str, Any]) -> FeatureStore:
        for name, filled in self.filled.items():
            if not filled.all():
                raise RuntimeError(f"feature table '{name}' is incomplete: {int((~filled).sum())} rows never written")
        shapes = {name: list(t.shape) for name, t in self.tables.items()}
        for table in self.tables.values():
            table.flush()
        self.tables.clear()
        self.filled.clear()
        for name in TABLES:
            (self.partial / f"filled_{name}.npy").unlink()
        (self.partial / "partial.json").unlink()
        write_json(
            self.partial / "index.json",
            {"image": self.index.image, "question": self.index.question, "answer": {q: list(v) for q, v in self.index.answer.items()}},
        )
        write_json(self.partial / "manifest.json", {"fingerprint": fingerprint, "description": dict(description), "shapes": shapes, **extra})
        if self.root.exists():
            old = tmp_sibling(self.root)
            self.root.rename(old)
            shutil.rmtree(old)
        self.partial.rename(self.root)
        return FeatureStore(self.root)


def build_index(image_names: Sequence[str], questions: Sequence[str], answers: Mapping[str, Sequence[str]]) -> FeatureIndex:
    """Rows in the given order; answer rows are contiguous per question, in the task's answer order."""
    answer_rows: dict[str, tuple[int, int]] = {}
    row = 0
    for q in questions:
        answer_rows[q] = (row, len(answers[q]))
        row += len(answers[q])
    return FeatureIndex(
        image={n: i for i, n in enumerate(image_names)},
        question={q: i for i, q in enumerate(questions)},
        answer=answer_rows,
    )
