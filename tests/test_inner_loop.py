"""The batched inner loop equals the per-task reference: adapted parameters and meta-gradients, every mode, first and
second order, on tasks of different sizes (padding and masks must not leak)."""

from __future__ import annotations

import pytest
import torch

from metadiff.data.meta_vqa.batches import TaskExample, collate_tasks
from metadiff.meta.inner_loop import InnerLoop, adapt_per_task_reference, query_loss, task_slice
from metadiff.meta.learner import FewShotLearner

E = 16


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for t, (n_support, n_query, n_answers) in enumerate(((3, 5, 2), (9, 4, 5), (6, 7, 3))):
        items.append(
            TaskExample(
                support_x=torch.randn(n_support, E, generator=g),
                support_y=torch.randint(n_answers, (n_support,), generator=g),
                query_x=torch.randn(n_query, E, generator=g),
                query_y=torch.randint(n_answers, (n_query,), generator=g),
                answers=torch.randn(n_answers, E, generator=g),
                question=torch.randn(E, generator=g),
                task_index=t,
            )
        )
    return collate_tasks(items)


def _learner(mode: str) -> FewShotLearner:
    torch.manual_seed(0)
    return FewShotLearner(mode, embed_dim=E, adapter_hidden=8, hnet_hidden=[6], embedding_dim=4, logit_scale=10.0)


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("mode", ["mnet", "enet", "hnet"])
def test_batched_equals_per_task_reference(mode: str, second_order: bool) -> None:
    batch = _batch()
    loop = InnerLoop(steps=3, lr=0.05, second_order=second_order)
    learner = _learner(mode)
    params = [p for p in learner.parameters()]

    adapted = loop.adapt(learner, batch)
    batched_loss = query_loss(learner, batch, adapted)
    batched_grads = torch.autograd.grad(batched_loss, params)

    reference = adapt_per_task_reference(loop, learner, batch)
    losses = [query_loss(learner, task_slice(batch, t), inner) for t, inner in enumerate(reference)]
    reference_grads = torch.autograd.grad(torch.stack(losses).mean(), params)

    for t, inner in enumerate(reference):
        for name, value in inner.items():
            torch.testing.assert_close(adapted[name][t], value[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched_loss, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(learner.named_parameters(), batched_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"meta-gradient of {name}")


def test_second_order_differs_from_first_order() -> None:
    batch = _batch(1)
    learner = _learner("mnet")
    grads = {}
    for order in (False, True):
        loss = query_loss(learner, batch, InnerLoop(steps=2, lr=0.5, second_order=order).adapt(learner, batch))
        grads[order] = torch.autograd.grad(loss, list(learner.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(grads[False], grads[True], strict=True))


def test_inner_loop_lowers_support_loss_and_leaves_meta_params_alone_in_eval() -> None:
    from metadiff.nets.adapter import masked_task_losses

    batch = _batch(2)
    learner = _learner("enet")
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    with torch.no_grad():
        start = learner.initial_inner(batch.question)
        adapted = InnerLoop(steps=20, lr=0.05).adapt(learner, batch)
        losses = [
            masked_task_losses(
                learner.logits(inner, batch.question, batch.support_x, batch.answers, batch.answer_mask),
                batch.support_y,
                batch.support_mask,
            )
            for inner in (start, adapted)
        ]
    assert (losses[1] < losses[0]).all(), losses
    for n, p in learner.named_parameters():
        assert torch.equal(p, before[n])


def test_identity_adapter_is_clip_zero_shot() -> None:
    batch = _batch(3)
    learner = FewShotLearner("mnet", embed_dim=E, adapter_hidden=8, zero_init_output=True)
    logits = learner.logits(
        learner.initial_inner(batch.question), batch.question, batch.query_x, batch.answers, batch.answer_mask
    )
    clip = (
        100.0
        * torch.nn.functional.normalize(batch.query_x, dim=-1)
        @ torch.nn.functional.normalize(batch.answers, dim=-1).transpose(1, 2)
    )
    real = batch.answer_mask.unsqueeze(1).expand_as(logits)
    torch.testing.assert_close(logits[real], clip[real])
