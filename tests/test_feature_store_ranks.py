"""The feature store across DDP ranks (several nodes on a network filesystem): every rank writes files of its own,
rank 0 merges them into the store, and a store built by 2 ranks holds the rows of a 1-process build. A shared
memory-mapped table written by ranks on different nodes loses rows (each node writes back whole pages of its own
view) and its `filled` markers are a stale view on the committing node, so no file may be written by two ranks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import TWO_RANKS, run_train, smoke_budget
from metadiff.errors import InputFileError, MissingInputError
from metadiff.features.store import TABLES, FeatureStore, FeatureStoreBuilder, build_index, check_existing

ARCH = "metadiff-tiny-vit"


def _store_dir(root: Path) -> Path:
    (store_dir,) = (root / "outputs" / "data" / "features").glob(f"meta_vqa-{ARCH}-*[!l]")  # not .partial
    return store_dir


@pytest.mark.slow
def test_two_ranks_write_disjoint_files_and_give_the_one_process_store(vqa_tree: dict, tmp_path: Path) -> None:
    """`features_vqa` under 2-rank `trainer=ddp_sim`, with every file each rank opens for writing in the feature
    folder recorded (tests/file_audit.py): no file is written by both ranks, each rank wrote some, and the store
    equals the 1-process one row by row (by name: row order is the index's)."""
    one, two, audit = tmp_path / "one", tmp_path / "two", tmp_path / "audit"
    run_train(["experiment=features_vqa", *smoke_budget("features_vqa", vqa_tree)], one)
    features = two / "outputs" / "data" / "features"
    proc = run_train(
        [
            "experiment=features_vqa",
            *smoke_budget("features_vqa", vqa_tree),
            "trainer=ddp_sim",
            "+callbacks.audit._target_=file_audit.WriteOpens",
            f"+callbacks.audit.watch={features}",
            f"+callbacks.audit.log_dir={audit}",
        ],
        two,
    )
    assert TWO_RANKS in proc.stdout + proc.stderr
    opened = [set(json.loads((audit / f"rank{rank}.json").read_text())) for rank in (0, 1)]
    assert opened[0] and opened[1], opened
    assert not opened[0] & opened[1], f"files written by both ranks: {sorted(opened[0] & opened[1])}"
    reference, store = FeatureStore(_store_dir(one)), FeatureStore(_store_dir(two))
    assert store.index == reference.index
    for table in TABLES:
        np.testing.assert_allclose(store.tables[table], reference.tables[table], rtol=1e-5, atol=1e-6)


def _two_rank_build(root: Path) -> tuple[FeatureStoreBuilder, FeatureStoreBuilder]:
    """Two ranks of one job (rank 0 prepares, rank 1 attaches), each writing interleaved rows, both finished."""
    index = build_index(["a", "b", "c", "d"], ["q"], {"q": ["x", "y"]})
    rank0 = FeatureStoreBuilder(root, 2, index, "fp", rank=0, world_size=2)
    rank1 = FeatureStoreBuilder(root, 2, index, "fp", rank=1, world_size=2)
    for builder, rows in ((rank0, [0, 2]), (rank1, [1, 3])):
        builder.write("image", np.array(rows), np.array(rows, np.float32)[:, None].repeat(2, 1))
    rank0.write("question", np.array([0]), np.zeros((1, 2), np.float32))
    rank1.write("answer", np.array([0, 1]), np.ones((2, 2), np.float32))
    rank0.finish()
    rank1.finish()
    return rank0, rank1


def _rank1_image_shard(root: Path) -> Path:
    (shard,) = root.with_name(root.name + ".partial").glob("shards/image.*.r1.*.npz")
    return shard


def test_two_ranks_shards_merge_into_the_store(tmp_path: Path) -> None:
    rank0, _ = _two_rank_build(tmp_path / "store")
    store = rank0.commit("fp", {}, {})
    assert store.images(["a", "b", "c", "d"])[:, 0].tolist() == [0, 1, 2, 3]
    assert not (tmp_path / "store.partial").exists()


@pytest.mark.parametrize("fault", ["missing", "truncated", "unfinished"])
def test_a_store_with_a_missing_or_torn_shard_is_refused_naming_the_file(fault: str, tmp_path: Path) -> None:
    """Rank 1's shard deleted or cut short (a node's write that never reached the filesystem), or rank 1 never
    listing its shards: the commit is refused in one line naming the file, and no store becomes visible."""
    root = tmp_path / "store"
    rank0, rank1 = _two_rank_build(root)
    shard = _rank1_image_shard(root)
    if fault == "missing":
        shard.unlink()
        named, error = shard, MissingInputError
    elif fault == "truncated":
        shard.write_bytes(shard.read_bytes()[:-40])
        named, error = shard, InputFileError
    else:
        (named,) = root.with_name("store.partial").glob("lists/*.rank1.json")
        named.unlink()
        error = MissingInputError
    with pytest.raises(error, match=re.escape(str(named))) as caught:
        rank0.commit("fp", {}, {})
    assert "\n" not in str(caught.value)
    assert not root.exists() and not check_existing(root, "fp", {})


def test_a_truncated_store_table_is_refused_naming_the_file(tmp_path: Path) -> None:
    """A committed store whose table file was cut short (a copy of the outputs tree, a full disk): one line naming
    the file, not numpy's mmap error. Before: ValueError 'mmap length is greater than file size', no file named."""
    rank0, _ = _two_rank_build(tmp_path / "store")
    rank0.commit("fp", {}, {})
    table = tmp_path / "store" / "image.npy"
    table.write_bytes(table.read_bytes()[:-8])
    with pytest.raises(InputFileError, match=f"feature store table {re.escape(str(table))} is truncated"):
        FeatureStore(tmp_path / "store")
