"""A frozen generator of adapter weights from a task latent, and the latent every task starts from.

The stages after the HNET (adaptation, VAE, HyperCLIP, HyperLDM) all treat a task as a latent z [d] that a fixed
generator turns into adapter weights: the HNET's hypernetwork (spec §3.4 `enet`) or a VAE decoder (the "VAE
MetaModel", spec §3.5). `LatentLearner` gives both the interface of `FewShotLearner` (`initial_inner`, `logits`,
`query_logits`), so the batched inner loop of the few-shot stage adapts z for a whole batch of tasks unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from metadiff.config import ConfigError
from metadiff.meta.learner import LEARNER_SPEC, LEARNER_WEIGHTS, AlphaQueryLogits, FewShotLearner, Inner
from metadiff.nets.adapter import AdapterShape, adapter_logits
from metadiff.store import Artifact


class LatentLearner(AlphaQueryLogits, nn.Module):
    """z [T, d] -> generator -> flat adapter weights [T, P] -> logits. The generator is frozen (not meta-trained)."""

    def __init__(self, generator: nn.Module, init_latent: torch.Tensor, shape: AdapterShape,
                 logit_scale: float = 100.0, alpha: float = 1.0, question_init: bool = False):
        super().__init__()
        self.generator, self.shape = generator.requires_grad_(False), shape
        self.logit_scale, self.alpha, self.question_init = logit_scale, alpha, question_init
        self.register_buffer("init_latent", init_latent.detach().clone().float())

    @property
    def latent_dim(self) -> int:
        return int(self.init_latent.shape[-1])

    def initial_inner(self, question: torch.Tensor) -> Inner:
        if self.question_init:  # conditional HNET: every task starts from its own question embedding
            return {"z": question.detach().float()}
        return {"z": self.init_latent.unsqueeze(0).expand(question.shape[0], -1)}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Flat adapter weights [T, P] of latents [T, d] (the spec's vector layout)."""
        return self.generator(z.float())

    def adapter_weights(self, inner: Inner, question: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.shape.unflatten(self.decode(inner["z"]))

    def logits(self, inner: Inner, question: torch.Tensor, x: torch.Tensor, answers: torch.Tensor,
               answer_mask: torch.Tensor | None = None) -> torch.Tensor:
        return adapter_logits(self.adapter_weights(inner, question), x.float(), answers, answer_mask,
                              scale=self.logit_scale)

    def latent_logits(self, z: torch.Tensor, x: torch.Tensor, answers: torch.Tensor,
                      answer_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits({"z": z}, z, x, answers, answer_mask)


def load_fewshot_learner(artifact: Artifact) -> tuple[FewShotLearner, dict]:
    """The trained few-shot model of an `hnet`/`maml`/`multitask` artifact and its description."""
    spec = json.loads(Path(artifact.file(LEARNER_SPEC)).read_text())
    kwargs = {k: spec[k] for k in ("mode", "embed_dim", "adapter_hidden", "hnet_hidden", "embedding_dim",
                                   "question_init", "logit_scale", "adapter_init_std", "zero_init_output", "alpha")
              if k in spec}
    learner = FewShotLearner(**kwargs)
    learner.load_state_dict(torch.load(artifact.file(LEARNER_WEIGHTS), map_location="cpu", weights_only=True))
    return learner.eval(), spec


def hnet_latent_learner(artifact: Artifact) -> LatentLearner:
    """The HNET of a few-shot artifact as a latent learner: its hypernetwork and its meta-learned task embedding."""
    learner, spec = load_fewshot_learner(artifact)
    if learner.mode != "enet":
        raise ConfigError(
            f"upstream artifact {artifact.path} is a '{spec.get('method')}' model in '{learner.mode}' mode; the latent "
            "stages need an HNET (learner.mode=enet), e.g. experiment=hnet_synthvqa"
        )
    init = learner.enet.embedding if not learner.question_init else torch.zeros(learner.shape.embed_dim)
    return LatentLearner(learner.hnet, init, learner.shape, learner.logit_scale, learner.alpha, learner.question_init)
