"""The few-shot model of the HyperCLIP family with its three inner modes (spec §3.4).

| mode   | adapter weights come from            | inner (adapted per task)   | meta-parameters            |
|--------|--------------------------------------|----------------------------|----------------------------|
| `mnet` | the adapter itself (MAML, multitask) | adapter W1, b1, W2, b2     | adapter                    |
| `enet` | hnet(task embedding z) ("HNET")      | z                          | hnet + z's initial value   |
| `hnet` | hnet(question CLIP embedding)        | every hnet weight          | hnet                       |

Inner parameters always carry a leading task dimension [T, ...], so one call serves a batch of tasks.
"""

from __future__ import annotations

import torch
from torch import nn

from metadiff.nets.adapter import AdapterShape, CLIPAdapter, adapter_logits
from metadiff.nets.hypernet import Mlp, TaskEmbedding
from metadiff.utils.dtypes import full_precision

MODES = ("mnet", "enet", "hnet")
Inner = dict[str, torch.Tensor]


class AdapterLearner(nn.Module):
    """What every learner of the family shares, and all the inner loop needs (`metadiff.meta.inner_loop`): inner
    parameters [T, ...] per task, the adapter weights they make, and one implementation of the logits of those
    weights (`logits`, `query_logits`). Subclasses: `FewShotLearner` (meta-trained) and
    `metadiff.meta.latent.LatentLearner` (a frozen generator of weights from a task latent)."""

    shape: AdapterShape
    logit_scale: float
    alpha: float

    def initial_inner(self, question: torch.Tensor) -> Inner:
        """The inner parameters every task of a batch starts from, [T, ...]."""
        raise NotImplementedError

    def adapter_weights(self, inner: Inner, question: torch.Tensor) -> dict[str, torch.Tensor]:
        """The adapter weights [T, ...] (`metadiff.nets.adapter` layout) of inner parameters."""
        raise NotImplementedError

    def logits(
        self,
        inner: Inner,
        question: torch.Tensor,
        x: torch.Tensor,
        answers: torch.Tensor,
        answer_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Answer logits [T, N, A] of inputs x [T, N, e] under each task's adapter weights."""
        return adapter_logits(
            self.adapter_weights(inner, question), full_precision(x), answers, answer_mask, scale=self.logit_scale
        )

    def query_logits(
        self,
        adapted: Inner,
        initial: Inner,
        question: torch.Tensor,
        x: torch.Tensor,
        answers: torch.Tensor,
        answer_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the adapted model; with alpha != 1, alpha * (f(adapted) - f(init)) + f(init) (spec §3.4)."""
        out = self.logits(adapted, question, x, answers, answer_mask)
        if self.alpha != 1.0:
            start = self.logits(initial, question, x, answers, answer_mask)
            out = self.alpha * (out - start) + start
        return out


class FewShotLearner(AdapterLearner):
    def __init__(
        self,
        mode: str,
        embed_dim: int,
        adapter_hidden: int = 256,
        hnet_hidden: list[int] | tuple = (128,),
        embedding_dim: int = 128,
        question_init: bool = False,
        logit_scale: float = 100.0,
        adapter_init_std: float = 1.0,
        zero_init_output: bool = False,
        alpha: float = 1.0,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"inner mode '{mode}' is not one of {MODES}")
        self.mode, self.question_init, self.logit_scale, self.alpha = mode, question_init, logit_scale, alpha
        self.shape = AdapterShape(embed_dim, adapter_hidden)
        if mode == "mnet":
            self.adapter = CLIPAdapter(embed_dim, adapter_hidden, adapter_init_std, zero_output=zero_init_output)
        else:
            in_dim = embed_dim if (mode == "hnet" or question_init) else embedding_dim
            self.hnet = Mlp(in_dim, list(hnet_hidden), self.shape.n_params)
            if mode == "enet" and not question_init:
                self.enet = TaskEmbedding(in_dim)

    def initial_inner(self, question: torch.Tensor) -> Inner:
        """The inner parameters every task starts from, [T, ...], still attached to the meta-parameters."""
        n_tasks = question.shape[0]
        if self.mode == "mnet":
            return self.adapter.expand(n_tasks)
        if self.mode == "enet":
            if self.question_init:  # start from the task's own question (detached: no meta-gradient, spec §3.4)
                return {"z": full_precision(question.detach())}
            return {"z": self.enet.embedding.unsqueeze(0).expand(n_tasks, -1)}
        return {name: p.unsqueeze(0).expand(n_tasks, *p.shape) for name, p in self.hnet.named_parameters()}

    def adapter_weights(self, inner: Inner, question: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.mode == "mnet":
            return inner
        if self.mode == "enet":
            return self.shape.unflatten(self.hnet(inner["z"]))
        return self.shape.unflatten(self.hnet(full_precision(question), params=inner))

    def flat_weights(self, inner: Inner, question: torch.Tensor) -> torch.Tensor:
        """The adapter weights as the spec's flat vectors [T, P] (what adaptation datasets store)."""
        return self.shape.flatten(self.adapter_weights(inner, question))
