"""The meta-val split (`data.source.meta_val`, spec §8 B24): carved out of the meta-train tasks, deterministic in its
seed, recorded in the source's fingerprint; no meta-test task reaches a validation loader, on the generated
benchmark and on the real task-file format; the metric the experiments optimise is logged by validation."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from conftest import REPO, compose_config, debug
from metadiff.config import ConfigError
from metadiff.data.meta_vqa.datamodule import MetaTaskDataModule, split_tasks
from metadiff.data.meta_vqa.tasks import Task, load_task_file
from metadiff.data.sources import META_SPLITS, MetaValSplit, TaskSource
from metadiff.features.store import FeatureStoreBuilder, build_index
from metadiff.stages.features import store_contents
from metadiff.stages.fewshot import FewShotModule
from test_fewshot import rotated_answer_store

AUTHORS = REPO.parent / "shared" / "data" / "meta-vqa-authors"
SMALL_SYNTH = ["data.source.generator.n_scenes=1500", "data.source.generator.n_tasks=200"]


def _config(tmp_path: Path, experiment: str, overrides: list[str]) -> DictConfig:
    return compose_config([f"experiment={experiment}", *overrides], tmp_path, tmp_path / "out")


def _source(tmp_path: Path, experiment: str, overrides: list[str]) -> TaskSource:
    """The benchmark exactly as the experiment's config builds it."""
    return instantiate(_config(tmp_path, experiment, overrides).data.source)


def _questions(tasks: list[Task]) -> list[str]:
    return [t.question for t in tasks]


def _fake_store(source: TaskSource, root: Path) -> Path:
    """A store with what the features stage would put in it (`store_contents`), random 4-d features: enough to
    iterate every loader, and a KeyError if a split's question or image were missing from the store."""
    images, questions, answers = store_contents(source)
    index = build_index(images, questions, answers)
    builder = FeatureStoreBuilder(root, 4, index, "fp")
    rng = np.random.default_rng(0)
    n_answers = sum(n for _, n in index.answer.values())
    for table, n in (("image", len(images)), ("question", len(questions)), ("answer", n_answers)):
        builder.write(table, np.arange(n), rng.normal(size=(n, 4)).astype(np.float32))
    builder.commit("fp", {}, {})
    return root


def _loader_questions(loader: torch.utils.data.DataLoader) -> list[str]:
    """The questions of every task a loader yields, read back from the batches' task indices."""
    tasks = loader.dataset.tasks
    return [tasks[int(i)].question for batch in loader for i in batch.task_index]


def _check_loaders(tmp_path: Path, experiment: str, overrides: list[str], file_meta_train: list[str]) -> dict:
    """Build the experiment's DataModule over a fake store and check what each loader holds."""
    cfg = _config(tmp_path, experiment, [*overrides, "data.max_val_tasks=null"])
    data: MetaTaskDataModule = instantiate(cfg.data, store_dir=str(tmp_path / "store"))
    _fake_store(data.source, tmp_path / "store")
    data.setup("fit")
    splits = {s: _questions(data.source.tasks(s)) for s in META_SPLITS}
    # meta-val and the new meta-train partition the task file's meta-train tasks, each in file order
    assert splits["meta_val"] and not set(splits["meta_val"]) & set(splits["meta_train"])
    assert sorted(splits["meta_val"] + splits["meta_train"]) == sorted(file_meta_train)
    assert splits["meta_train"] == [q for q in file_meta_train if q not in set(splits["meta_val"])]
    fit, selection = (_loader_questions(loader) for loader in data.val_dataloader())
    assert fit == splits["meta_train"] and selection == splits["meta_val"]
    for loader in data.val_dataloader():
        assert not set(_loader_questions(loader)) & set(splits["meta_test"]), "a meta-test task is in validation"
    assert _loader_questions(data.test_dataloader()) == splits["meta_test"]
    assert not set(_loader_questions(data.train_dataloader())) & (set(splits["meta_val"]) | set(splits["meta_test"]))
    return splits


# ------------------------------------------------------------------------------------------- the split itself


def _tasks(n: int) -> list[Task]:
    return [Task(f"q{i}?", ("a", "b"), ((f"i{i}", 0),), ((f"j{i}", 1),)) for i in range(n)]


def test_split_is_deterministic_in_its_seed_and_changes_with_it() -> None:
    tasks = _tasks(870)
    train, val = MetaValSplit(fraction=0.1, seed=0).carve(tasks)
    assert (len(train), len(val)) == (783, 87)
    again = MetaValSplit(fraction=0.1, seed=0).carve(tasks)
    assert _questions(again[1]) == _questions(val) and _questions(again[0]) == _questions(train)
    other = MetaValSplit(fraction=0.1, seed=1).carve(tasks)[1]
    assert len(other) == 87 and set(_questions(other)) != set(_questions(val))
    assert MetaValSplit(fraction=0.0, seed=0).carve(tasks) == (tasks, [])  # the authors' split, untouched
    assert len(MetaValSplit(fraction=0.1, seed=0).carve(_tasks(2))[1]) == 1  # round(0.2) = 0, at least one


@pytest.mark.parametrize(
    "values, key",
    [
        ({"fraction": 1.0, "seed": 0}, "fraction = 1.0"),
        ({"fraction": -0.1, "seed": 0}, "fraction = -0.1"),
        ({"fraction": "0.1", "seed": 0}, "fraction = '0.1'"),
        ({"fraction": 0.1, "seed": 0.5}, "seed = 0.5"),
        ({"fraction": 0.1}, r"'data\.source\.meta_val\.seed' is missing"),
        ({"fractoin": 0.1, "seed": 0}, r"'data\.source\.meta_val\.fractoin'"),
    ],
)
def test_bad_meta_val_config_names_the_key(values: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        MetaValSplit.from_config(values)


def test_a_split_that_leaves_no_meta_train_task_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"meta_val\.fraction = 0\.9: 2 meta-val tasks would leave none of the 2"):
        MetaValSplit(fraction=0.9, seed=0).carve(_tasks(2))


def test_synthvqa_split_counts_and_fingerprints(tmp_path: Path) -> None:
    """The default benchmark: 870 meta-train tasks -> 783 + 87 meta-val, 373 meta-test; the fingerprint (which keys
    the feature store) follows the split, and fraction 0 keeps the one the benchmark had before meta-val existed."""
    default = _source(tmp_path, "hnet_synthvqa", [])
    counts = {s: len(default.tasks(s)) for s in META_SPLITS}
    assert counts == {"meta_train": 783, "meta_val": 87, "meta_test": 373}
    file_train = _questions(load_task_file(default.root / "meta_train.json"))
    assert sorted(_questions(default.tasks("meta_train") + default.tasks("meta_val"))) == sorted(file_train)
    assert _questions(default.tasks("meta_test")) == _questions(load_task_file(default.root / "meta_test.json"))
    fingerprints = {
        (f, s): _source(
            tmp_path, "hnet_synthvqa", [f"data.source.meta_val.fraction={f}", f"data.source.meta_val.seed={s}"]
        ).fingerprint()
        for f, s in ((0.1, 0), (0.1, 1), (0.2, 0), (0.0, 0), (0.0, 1))
    }
    assert len({fingerprints[k] for k in ((0.1, 0), (0.1, 1), (0.2, 0), (0.0, 0))}) == 4
    assert fingerprints[(0.1, 0)] == default.fingerprint()
    assert fingerprints[(0.0, 0)] == fingerprints[(0.0, 1)]  # no meta-val: the seed picks nothing
    faithful = _source(tmp_path, "hnet_synthvqa", ["data.source.meta_val.fraction=0"])
    assert _questions(faithful.tasks("meta_train")) == file_train and faithful.tasks("meta_val") == []


def test_authors_published_files_split_783_87_373(tmp_path: Path) -> None:
    if not AUTHORS.is_dir():
        pytest.fail(f"the authors' Meta-VQA files are expected beside the repo in {AUTHORS}")
    source = _source(tmp_path, "hnet_vqa", [f"paths.meta_vqa_dir={AUTHORS}", "data.source.check_images=false"])
    splits = {s: _questions(source.tasks(s)) for s in META_SPLITS}
    assert {s: len(q) for s, q in splits.items()} == {"meta_train": 783, "meta_val": 87, "meta_test": 373}
    file_train = _questions(load_task_file(AUTHORS / "meta_train.json"))
    assert sorted(splits["meta_train"] + splits["meta_val"]) == sorted(file_train)
    assert not set(splits["meta_val"]) & set(splits["meta_train"])
    assert splits["meta_test"] == _questions(load_task_file(AUTHORS / "meta_test.json"))


# ------------------------------------------------------------------------- no meta-test task in validation


def test_synthvqa_validation_loaders_never_hold_a_meta_test_task(tmp_path: Path) -> None:
    source = _source(tmp_path, "hnet_synthvqa", SMALL_SYNTH)
    file_train = _questions(load_task_file(source.root / "meta_train.json"))
    splits = _check_loaders(tmp_path, "hnet_synthvqa", SMALL_SYNTH, file_train)
    assert (len(splits["meta_train"]), len(splits["meta_val"]), len(splits["meta_test"])) == (126, 14, 60)


def test_real_format_validation_loaders_never_hold_a_meta_test_task(vqa_tree: dict, tmp_path: Path) -> None:
    """Task files built from the self-written VQA v2 tree (3 tasks: 2 meta-train -> 1 + 1 meta-val, 1 meta-test),
    through the latents DataModule's parent and the images the real source checks."""
    overrides = [
        f"paths.vqa_dir={vqa_tree['vqa_dir']}",
        f"paths.coco_dir={vqa_tree['coco_dir']}",
        f"data.source.prompts={vqa_tree['prompts']}",
        debug("smoke_vqa"),  # the fixture's few tasks: its one incomplete batch (data.drop_last=false)
    ]
    source = _source(tmp_path, "hnet_vqa", overrides)
    file_train = _questions(load_task_file(source.root / "meta_train.json"))
    splits = _check_loaders(tmp_path, "hnet_vqa", overrides, file_train)
    assert (len(splits["meta_train"]), len(splits["meta_val"]), len(splits["meta_test"])) == (1, 1, 1)


def test_without_meta_val_validation_reads_meta_test_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """fraction 0 (the authors' protocol) is an explicit choice: validation reads meta-test, with a warning."""
    source = _source(tmp_path, "hnet_synthvqa", [*SMALL_SYNTH, "data.source.meta_val.fraction=0"])
    with caplog.at_level(logging.WARNING):
        tasks = split_tasks(source)
    assert tasks["meta_val"] == tasks["meta_test"] and len(tasks["meta_train"]) == 140
    assert "data.source.meta_val.fraction = 0" in caplog.text and "META-TEST" in caplog.text


# ------------------------------------------------------------------- the optimised metric is logged by validation


def test_fewshot_validation_logs_the_optimised_metric_and_no_meta_test_metric(tmp_path: Path) -> None:
    """The metric hnet/maml/multitask optimise (their configs) is what validation logs, for the meta-val split."""
    source = rotated_answer_store(tmp_path / "store", n_tasks=24)
    source._tasks["meta_val"], source._tasks["meta_train"] = (
        source._tasks["meta_train"][:6],
        source._tasks["meta_train"][6:],
    )
    data = MetaTaskDataModule(source, tasks_per_batch=8, eval_tasks_per_batch=16, store_dir=str(tmp_path / "store"))
    model = FewShotModule(
        method="hnet",
        learner={
            "mode": "enet",
            "adapter_hidden": 16,
            "hnet_hidden": [8],
            "embedding_dim": 4,
            "question_init": False,
            "logit_scale": 10.0,
            "adapter_init_std": 0.3,
            "zero_init_output": False,
            "alpha": 1.0,
        },
        inner={"steps": 1, "lr": 0.5, "second_order": False},
        eval_steps=1,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        n_shot_max=0,
        n_shot_reruns=1,
        plot=False,
        embed_dim=16,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        inference_mode=False,
        default_root_dir=tmp_path,
    )
    trainer.validate(model, datamodule=data, verbose=False)
    logged = set(trainer.callback_metrics)
    for experiment in ("hnet_synthvqa", "maml_synthvqa", "multitask_synthvqa", "hnet_vqa"):
        assert _config(tmp_path, experiment, []).optimized_metric in logged, experiment
    assert "val/meta_val_fewshot_acc" in logged and "val/meta_train_fewshot_acc" in logged
    assert not [name for name in logged if "meta_test" in name], logged
