"""Meta-training throughput (tasks/s): the batched inner loop vs a per-task loop, on the same task batches.

Both run a full meta-step (K inner steps on the support sets, query loss, backward to the meta-parameters) for the
HNET (`enet`) and MAML (`mnet`) modes; the per-task loop calls the same code with one unpadded task at a time.
Task sizes follow the Meta-VQA statistics (support = `test` split, ~13 examples; query = `train`, ~30; ~7 answers),
embeddings of the embedded CLIP (e = 128). Runs alternate and the best of `repeats` is kept.
"""

from __future__ import annotations

import time

import torch

from metadiff.data.meta_vqa.batches import TaskExample, collate_tasks
from metadiff.meta.inner_loop import InnerLoop, query_loss, task_slice
from metadiff.meta.learner import FewShotLearner


def synthetic_task_batch(n_tasks: int, embed_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for t in range(n_tasks):
        n_answers = int(torch.randint(2, 12, (1,), generator=g))
        n_support = int(torch.randint(6, 25, (1,), generator=g))
        n_query = int(torch.randint(12, 60, (1,), generator=g))
        items.append(
            TaskExample(
                support_x=torch.randn(n_support, embed_dim, generator=g),
                support_y=torch.randint(n_answers, (n_support,), generator=g),
                query_x=torch.randn(n_query, embed_dim, generator=g),
                query_y=torch.randint(n_answers, (n_query,), generator=g),
                answers=torch.randn(n_answers, embed_dim, generator=g),
                question=torch.randn(embed_dim, generator=g),
                task_index=t,
            )
        )
    return collate_tasks(items)


def _meta_step_batched(learner, loop, batch) -> None:
    loss = query_loss(learner, batch, loop.adapt(learner, batch))
    loss.backward()


def _meta_step_per_task(learner, loop, batch) -> None:
    for t in range(batch.n_tasks):
        one = task_slice(batch, t)
        (query_loss(learner, one, loop.adapt(learner, one)) / batch.n_tasks).backward()


def _tasks_per_s(step, learner, loop, batch, device: str) -> float:
    step(learner, loop, batch)  # warm-up
    learner.zero_grad()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(learner, loop, batch)
    if device == "cuda":
        torch.cuda.synchronize()
    learner.zero_grad()
    return batch.n_tasks / (time.perf_counter() - start)


def bench_inner_loop(
    data_dir,
    device: str,
    n_tasks: int = 32,
    embed_dim: int = 128,
    adapter_hidden: int = 256,
    steps: int = 10,
    repeats: int = 3,
) -> dict:
    batch = synthetic_task_batch(n_tasks, embed_dim)
    batch = type(batch)(**{k: v.to(device) for k, v in vars(batch).items()})
    results = {}
    for mode in ("enet", "mnet"):
        for order in (False, True):
            torch.manual_seed(0)
            learner = FewShotLearner(mode, embed_dim, adapter_hidden, hnet_hidden=[128, 128, 128]).to(device)
            loop = InnerLoop(steps=steps, lr=0.1, second_order=order)
            batched, per_task = [], []
            for _ in range(repeats):
                batched.append(_tasks_per_s(_meta_step_batched, learner, loop, batch, device))
                per_task.append(_tasks_per_s(_meta_step_per_task, learner, loop, batch, device))
            key = f"{mode}_{'second' if order else 'first'}_order"
            results[key] = {
                "batched_tasks_per_s": max(batched),
                "per_task_tasks_per_s": max(per_task),
                "speedup": max(batched) / max(per_task),
            }
    return {
        "benchmark": f"meta-step throughput, {n_tasks} tasks/batch, {steps} inner steps, e={embed_dim}, "
        f"adapter hidden {adapter_hidden}, hnet [128,128,128]",
        "results": results,
    }
