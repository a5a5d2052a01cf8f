"""The few-shot stage learns on tasks built to be learnable (raw CLIP is at chance on them). DDP meta-gradients
(several MAML steps on 2 processes equal to 1 process): tests/test_parity.py."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from metadiff.data.meta_vqa.datamodule import MetaTaskDataModule
from metadiff.data.meta_vqa.tasks import Task
from metadiff.features.store import FeatureStoreBuilder, build_index
from metadiff.stages.fewshot import FewShotModule

E = 16


class _Tasks:
    """A TaskSource stub: only `tasks(split)` is needed on top of a ready feature store."""

    def __init__(self, tasks: dict[str, list[Task]]):
        self._tasks = tasks

    def tasks(self, split: str) -> list[Task]:
        return self._tasks[split]


def rotated_answer_store(root: Path, n_tasks: int = 48, seed: int = 0) -> _Tasks:
    """Image feature = R @ (answer embedding) + noise with one rotation R shared by all tasks: raw CLIP similarity is
    at chance, an adapter that learns R^-1 (from any tasks) answers new tasks."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(E, E)))
    images, questions, answers, features, tasks = [], [], {}, {}, []
    answer_rows = []
    for t in range(n_tasks):
        question = f"q{t}?"
        names = [f"a{t}_{k}" for k in range(4)]
        emb = rng.normal(size=(4, E))
        answers[question], questions = names, [*questions, question]
        answer_rows.append(emb)
        examples = []
        for i in range(24):
            label = int(rng.integers(4))
            image = f"img{t}_{i}"
            features[image] = rotation @ emb[label] + 0.3 * rng.normal(size=E)
            images.append(image)
            examples.append((image, label))
        tasks.append(Task(question, tuple(names), tuple(examples[:16]), tuple(examples[16:])))
    index = build_index(images, questions, answers)
    builder = FeatureStoreBuilder(root, E, index, "fp")
    builder.write("image", np.arange(len(images)), np.stack([features[n] for n in images]).astype(np.float32))
    builder.write("question", np.arange(len(questions)), rng.normal(size=(len(questions), E)).astype(np.float32))
    builder.write("answer", np.arange(4 * n_tasks), np.concatenate(answer_rows).astype(np.float32))
    builder.commit("fp", {}, {})
    # no meta-val split (validation falls back to meta-test, as with data.source.meta_val.fraction = 0)
    return _Tasks({"meta_train": tasks[: n_tasks * 3 // 4], "meta_val": [], "meta_test": tasks[n_tasks * 3 // 4 :]})


def _fit(tmp_path: Path, mode: str, train_steps: int) -> dict[str, float]:
    pl.seed_everything(0)
    source = rotated_answer_store(tmp_path / "store")
    data = MetaTaskDataModule(source, tasks_per_batch=8, eval_tasks_per_batch=16, store_dir=str(tmp_path / "store"))
    model = FewShotModule(
        method=mode,
        learner={
            "mode": mode,
            "adapter_hidden": 64,
            "hnet_hidden": [32],
            "embedding_dim": 8,
            "question_init": False,
            "logit_scale": 10.0,
            "adapter_init_std": 0.3,
            "zero_init_output": False,
            "alpha": 1.0,
        },
        inner={"steps": train_steps, "lr": 0.5, "second_order": False},
        eval_steps=5,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        n_shot_max=2,
        n_shot_reruns=1,
        plot=False,
        embed_dim=E,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=40,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        inference_mode=False,
        check_val_every_n_epoch=100,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    return model.summary_metrics


@pytest.mark.parametrize("mode,train_steps", [("mnet", 0), ("enet", 2)])
def test_meta_learner_solves_tasks_raw_clip_cannot(tmp_path: Path, mode: str, train_steps: int) -> None:
    m = _fit(tmp_path, mode, train_steps)
    assert m["test/clip_acc"] < 0.45, m  # raw similarity is near chance (0.25) by construction
    assert m["test/fewshot_acc"] > 0.8, m  # the learned map transfers to unseen tasks
    assert m["test/fewshot_minus_clip"] - m["test/fewshot_minus_clip_ci95"] > 0.3, m
    assert m["test/1shot_acc"] > 0.25 and "test/2shot_acc_ci95" in m  # above chance from 1 shot per answer
