"""A frozen generator of adapter weights from a task latent, and the latent every task starts from.

The stages after the HNET (adaptation, VAE, HyperCLIP, HyperLDM) all treat a task as a latent z [d] that a fixed
generator turns into adapter weights: the HNET's hypernetwork (spec §3.4 `enet`) or a VAE decoder (the "VAE
MetaModel", spec §3.5). `LatentLearner` is an `AdapterLearner` like `FewShotLearner` (`initial_inner`, `logits`,
`query_logits`), so the batched inner loop of the few-shot stage adapts z for a whole batch of tasks unchanged.
The HNET of a few-shot artifact is read as one by `metadiff.stages.fewshot.load_hnet_latent_learner`, next to its writer.
"""

from __future__ import annotations

import torch
from torch import nn

from metadiff.meta.learner import AdapterLearner, Inner
from metadiff.nets.adapter import AdapterShape
from metadiff.utils.dtypes import full_precision


class LatentLearner(AdapterLearner):
    """z [T, d] -> generator -> flat adapter weights [T, P] -> logits. The generator is frozen (not meta-trained)."""

    init_latent: torch.Tensor  # a buffer: the latent every task starts from

    def __init__(
        self,
        generator: nn.Module,
        init_latent: torch.Tensor,
        shape: AdapterShape,
        logit_scale: float = 100.0,
        alpha: float = 1.0,
        question_init: bool = False,
    ):
        super().__init__()
        self.generator, self.shape = generator.requires_grad_(False), shape
        self.logit_scale, self.alpha, self.question_init = logit_scale, alpha, question_init
        self.register_buffer("init_latent", init_latent.detach().clone().float())

    @property
    def latent_dim(self) -> int:
        return int(self.init_latent.shape[-1])

    def initial_inner(self, question: torch.Tensor) -> Inner:
        if self.question_init:  # conditional HNET: every task starts from its own question embedding
            return {"z": full_precision(question.detach())}
        return {"z": self.init_latent.unsqueeze(0).expand(question.shape[0], -1)}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Flat adapter weights [T, P] of latents [T, d] (the spec's vector layout)."""
        return self.generator(full_precision(z))

    def adapter_weights(self, inner: Inner, question: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.shape.unflatten(self.decode(inner["z"]))

    def latent_logits(
        self, z: torch.Tensor, x: torch.Tensor, answers: torch.Tensor, answer_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.logits({"z": z}, z, x, answers, answer_mask)
