"""Inner-loop adaptation: K gradient steps on each task's support set, for a whole batch of tasks at once.

Batched path: the per-task losses of T tasks are summed and differentiated once with `torch.autograd.grad`. Task t's
loss depends only on slice t of the inner parameters, so slice t of the gradient is exactly task t's own gradient:
one fused backward (batched matmuls) replaces T small ones, with no per-task Python and no `vmap` tracing. Padded
examples and answers are masked out of every loss.

Reference path: a Python loop over tasks on their unpadded tensors with `torch.func.grad`, kept for the tests and
the benchmark. First order (`second_order=False`) uses the detached gradient, so d(adapted)/d(init) = I (spec §4.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metadiff.data.meta_vqa.batches import TaskBatch
from metadiff.meta.learner import AdapterLearner, Inner
from metadiff.nets.adapter import masked_task_losses


@dataclass(frozen=True)
class InnerLoop:
    steps: int = 10
    lr: float = 0.1
    second_order: bool = False

    def adapt(
        self, learner: AdapterLearner, batch: TaskBatch, inner: Inner | None = None, steps: int | None = None
    ) -> Inner:
        """Adapted inner parameters [T, ...] after `steps` (default: self.steps) SGD steps on the support sets."""
        inner = learner.initial_inner(batch.question) if inner is None else inner
        steps = self.steps if steps is None else steps
        if steps == 0:
            return inner
        if not torch.is_grad_enabled() or not any(v.requires_grad for v in inner.values()):
            # evaluation: adapt a detached copy, the meta-parameters stay untouched
            inner = {k: v.detach().clone().requires_grad_(True) for k, v in inner.items()}
            with torch.enable_grad():
                return {k: v.detach() for k, v in self._steps(learner, batch, inner, steps, False).items()}
        return self._steps(learner, batch, inner, steps, self.second_order)

    def _steps(self, learner: AdapterLearner, batch: TaskBatch, inner: Inner, steps: int, create_graph: bool) -> Inner:
        names = list(inner)
        for _ in range(steps):
            logits = learner.logits(inner, batch.question, batch.support_x, batch.answers, batch.answer_mask)
            loss = masked_task_losses(logits, batch.support_y, batch.support_mask).sum()
            grads = torch.autograd.grad(loss, [inner[n] for n in names], create_graph=create_graph)
            inner = {
                n: inner[n] - self.lr * (g if create_graph else g.detach()) for n, g in zip(names, grads, strict=True)
            }
        return inner


def task_slice(batch: TaskBatch, t: int) -> TaskBatch:
    """Task t of a batch, unpadded (the reference path never sees padding)."""
    s, q, a = batch.support_mask[t], batch.query_mask[t], batch.answer_mask[t]
    return TaskBatch(
        support_x=batch.support_x[t, s][None],
        support_y=batch.support_y[t, s][None],
        support_mask=torch.ones(1, int(s.sum()), dtype=torch.bool),
        query_x=batch.query_x[t, q][None],
        query_y=batch.query_y[t, q][None],
        query_mask=torch.ones(1, int(q.sum()), dtype=torch.bool),
        answers=batch.answers[t, a][None],
        answer_mask=torch.ones(1, int(a.sum()), dtype=torch.bool),
        question=batch.question[t : t + 1],
        task_index=batch.task_index[t : t + 1],
    )


def adapt_per_task_reference(loop: InnerLoop, learner: AdapterLearner, batch: TaskBatch) -> list[Inner]:
    """The plain loop: each task alone, its inner gradient from `torch.func.grad` (always differentiable)."""
    adapted = []
    for t in range(batch.n_tasks):
        one = task_slice(batch, t)
        inner = learner.initial_inner(one.question)

        def support_loss(params: Inner, one: TaskBatch = one) -> torch.Tensor:
            logits = learner.logits(params, one.question, one.support_x, one.answers)
            return masked_task_losses(logits, one.support_y, one.support_mask).sum()

        for _ in range(loop.steps):
            grads = torch.func.grad(support_loss)(inner)
            inner = {n: v - loop.lr * (grads[n] if loop.second_order else grads[n].detach()) for n, v in inner.items()}
        adapted.append(inner)
    return adapted


def query_loss(learner: AdapterLearner, batch: TaskBatch, adapted: Inner, initial: Inner | None = None) -> torch.Tensor:
    """Mean over tasks of each task's mean query cross-entropy (the meta-objective)."""
    initial = adapted if initial is None else initial
    logits = learner.query_logits(adapted, initial, batch.question, batch.query_x, batch.answers, batch.answer_mask)
    return masked_task_losses(logits, batch.query_y, batch.query_mask).mean()
