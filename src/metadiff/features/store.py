"""The feature store: image, question and answer embeddings as memory-mappable `.npy` tables with an index.

Layout of a store directory:
    manifest.json          fingerprint (model + data), model/data descriptions, table shapes, throughput
    index.json             {"image": {name: row}, "question": {question: row}, "answer": {question: [first_row, n]}}
    image.npy question.npy answer.npy    float32 [rows, dim], opened with mmap_mode="r"
The whole directory is built under a temporary name from each rank's own shard files (`metadiff.features.shards`)
and renamed when complete, so readers never see a half-written store; a table file cut short is refused naming it.
A store built for another model or other data is refused (FeatureStoreMismatchError), never silently reused.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metadiff.errors import InputFileError, MissingInputError, UserError
from metadiff.features.shards import (
    read_shard,
    read_shard_list,
    shard_list_path,
    write_shard,
    write_shard_list,
)
from metadiff.utils.io import read_json, tmp_sibling, write_json

log = logging.getLogger(__name__)

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
        self.tables = {name: self._table(name, self.manifest["shapes"][name]) for name in TABLES}

    def __getstate__(self) -> dict[str, Path]:
        """Pickled as its root, reopened on the other side: a DataLoader worker started by spawn or forkserver
        receives its dataset pickled, and memory-mapped tables would travel as their whole contents."""
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Path]) -> None:
        FeatureStore.__init__(self, state["root"])

    def _table(self, name: str, shape: Sequence[int]) -> np.ndarray:
        """One table, memory-mapped, refused in one line naming the file if it is missing, truncated or not the
        shape the manifest records (a copy cut short, a full disk)."""
        path = self.root / f"{name}.npy"
        if not path.is_file():
            raise MissingInputError(f"feature store table {path} is missing; delete {self.root} to rebuild the store")
        try:
            table = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise InputFileError(
                f"feature store table {path} is truncated or corrupt ({err}); delete {self.root} to rebuild the store"
            ) from None
        if list(table.shape) != list(shape):
            raise InputFileError(
                f"feature store table {path} has shape {list(table.shape)}, its manifest "
                f"{list(shape)}; delete {self.root} to rebuild the store"
            )
        return table

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
    diffs = [
        f"{k}: store has {theirs.get(k)!r}, config asks {v!r}" for k, v in description.items() if theirs.get(k) != v
    ]
    raise FeatureStoreMismatchError(
        f"feature store {root} was built for a different model or data ({'; '.join(diffs) or 'fingerprint differs'}). "
        "Point the run at another store directory or delete this one."
    )


class FeatureStoreIncompleteError(UserError, RuntimeError):
    """Rows of a table were computed by no rank: the store is not committed."""


class FeatureStoreBuilder:
    """Builds a store in `<root>.partial/` from per-rank shard files (`metadiff.features.shards`), merged into the
    tables and renamed to `<root>` by rank 0's `commit()`.

    Rank 0 is constructed first (it prepares the folder: fresh, or resumed from a killed run's shards), the other
    ranks after a barrier. Every rank writes only its own files: one shard per `write`, and at `finish()` the list of
    the shards it wrote. Rank 0 commits once every rank has finished: it merges the shards that the lists (and the
    carried-over shards of a resumed run) name, and refuses in one line a list or shard that is missing or
    truncated, or a row that no shard holds. Layout of `<root>.partial/`:
        partial.json   fingerprint, rows per table, dim (the marker: without it a leftover folder is never resumed)
        run.json       this run's id, so shard names and lists of runs never collide
        carried.json   {shard: bytes} of earlier runs, checked by rank 0 when it resumed
        shards/<table>.<run>.r<rank>.<n>.npz    lists/<run>.rank<r>.json
    Nothing under `.partial` is ever read as a store."""

    def __init__(self, root: Path, dim: int, index: FeatureIndex, fingerprint: str, rank: int = 0, world_size: int = 1):
        self.root, self.index, self.dim = Path(root), index, dim
        self.rank, self.world_size = rank, world_size
        self.partial = self.root.with_name(self.root.name + ".partial")
        self.shards, self.lists = self.partial / "shards", self.partial / "lists"
        self.rows = {
            "image": len(index.image),
            "question": len(index.question),
            "answer": sum(n for _, n in index.answer.values()),
        }
        meta = {"fingerprint": fingerprint, "rows": dict(self.rows), "dim": dim}
        if rank == 0 and self._resumable(meta):
            self._resume()
        elif rank == 0:
            self._create(meta)
        elif read_json(self.partial / "partial.json", what="partial feature store marker") != meta:
            raise RuntimeError(f"rank {rank}: {self.partial} was prepared by rank 0 for another store")
        self.run = str(read_json(self.partial / "run.json", what="feature store run id")["run"])
        carried = read_json(self.partial / "carried.json", what="feature store carried shards")
        self.carried = {str(k): int(v) for k, v in carried.items()}
        self.resumed = bool(self.carried)  # rows of an earlier, killed run are kept
        self.covered = {name: np.zeros(n, dtype=bool) for name, n in self.rows.items()}
        for name, size in self.carried.items():
            rows, _ = read_shard(self.shards / name, size, self.rows[self._table_of(name)], dim)
            self.covered[self._table_of(name)][rows] = True
        self.written: dict[str, int] = {}

    @staticmethod
    def _table_of(shard: str) -> str:
        return shard.split(".", 1)[0]

    def _resumable(self, meta: Mapping[str, Any]) -> bool:
        marker = self.partial / "partial.json"
        if not marker.is_file():
            return False
        try:
            return read_json(marker, what="partial feature store marker") == meta
        except UserError:
            return False

    def _create(self, meta: Mapping[str, Any]) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
        self.shards.mkdir(parents=True)
        self.lists.mkdir()
        write_json(self.partial / "carried.json", {})
        write_json(self.partial / "run.json", {"run": uuid.uuid4().hex[:12]})
        write_json(self.partial / "partial.json", meta)  # the marker goes last

    def _resume(self) -> None:
        """Keep every complete shard a killed run left (a shard that exists was renamed into place complete; one
        that cannot be read is dropped and its rows computed again), drop the rest, start a new run id."""
        carried: dict[str, int] = {}
        for path in sorted(self.shards.iterdir()):
            table = self._table_of(path.name)
            try:
                if path.name.startswith(".") or table not in self.rows:
                    raise InputFileError(f"not a shard: {path}")
                read_shard(path, None, self.rows[table], self.dim)
                carried[path.name] = path.stat().st_size
            except UserError as err:
                log.warning("resuming %s: dropped %s (%s)", self.partial, path.name, err)
                path.unlink()
        shutil.rmtree(self.lists, ignore_errors=True)
        self.lists.mkdir()
        for name in TABLES:  # tables of a commit that was refused
            (self.partial / f"{name}.npy").unlink(missing_ok=True)
        write_json(self.partial / "carried.json", carried)
        write_json(self.partial / "run.json", {"run": uuid.uuid4().hex[:12]})

    def pending(self, table: str) -> np.ndarray:
        """Rows of `table` that no shard holds yet (all of them for a fresh store)."""
        return np.flatnonzero(~self.covered[table])

    def write(self, table: str, rows: np.ndarray, values: np.ndarray) -> None:
        """One shard of this rank: `values[i]` is row `rows[i]` of `table`."""
        rows = np.asarray(rows, np.int64)
        values = np.asarray(values, np.float32)
        if values.shape != (len(rows), self.dim):
            raise ValueError(f"feature table '{table}': values {values.shape}, expected [{len(rows)}, {self.dim}]")
        name = f"{table}.{self.run}.r{self.rank}.{len(self.written):06d}.npz"
        self.written[name] = write_shard(self.shards / name, rows, values)
        self.covered[table][rows] = True

    def finish(self) -> None:
        """This rank is done: list the shards it wrote (rank 0 merges only what the lists name)."""
        write_shard_list(shard_list_path(self.lists, self.run, self.rank), self.written)

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    def commit(self, fingerprint: str, description: Mapping[str, Any], extra: Mapping[str, Any]) -> FeatureStore:
        """Rank 0, once every rank has called `finish()`: merge every listed shard into the tables, check that every
        row is there, and publish the store by renaming the folder."""
        if self.rank != 0:
            raise RuntimeError(f"rank {self.rank}: only rank 0 commits a feature store")
        self.finish()
        shards = dict(self.carried)
        for rank in range(self.world_size):
            shards.update(read_shard_list(shard_list_path(self.lists, self.run, rank), rank, self.world_size))
        tables = {
            name: np.lib.format.open_memmap(
                self.partial / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n, self.dim)
            )
            for name, n in self.rows.items()
        }
        filled = {name: np.zeros(n, dtype=bool) for name, n in self.rows.items()}
        for name, size in sorted(shards.items()):
            table = self._table_of(name)
            rows, values = read_shard(self.shards / name, size, self.rows[table], self.dim)
            tables[table][rows] = values
            filled[table][rows] = True
        for name, done in filled.items():
            if not done.all():
                raise FeatureStoreIncompleteError(
                    f"feature table '{name}' is incomplete: {int((~done).sum())} rows "
                    f"never written (no shard in {self.shards} holds them)"
                )
        shapes = {name: list(t.shape) for name, t in tables.items()}
        for memmap in tables.values():
            memmap.flush()
        del tables
        shutil.rmtree(self.shards)
        shutil.rmtree(self.lists)
        for marker in ("carried.json", "run.json", "partial.json"):
            (self.partial / marker).unlink()
        write_json(
            self.partial / "index.json",
            {
                "image": self.index.image,
                "question": self.index.question,
                "answer": {q: list(v) for q, v in self.index.answer.items()},
            },
        )
        write_json(
            self.partial / "manifest.json",
            {"fingerprint": fingerprint, "description": dict(description), "shapes": shapes, **extra},
        )
        if self.root.exists():
            old = tmp_sibling(self.root)
            self.root.rename(old)
            shutil.rmtree(old)
        self.partial.rename(self.root)
        return FeatureStore(self.root)


def build_index(
    image_names: Sequence[str], questions: Sequence[str], answers: Mapping[str, Sequence[str]]
) -> FeatureIndex:
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
