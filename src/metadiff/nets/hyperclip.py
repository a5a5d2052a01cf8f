"""HyperCLIP: an encoder of network weights (or latents) into the CLIP text space (spec §3.6).

A standalone module (the original loaded a whole ViT-L CLIP only to host this MLP, §8 B15): `Mlp(in -> hidden -> e,
softplus)` on the (optionally standardised) weight vector, and a symmetric InfoNCE loss against the task's question
embedding. The temperature starts at 100 and is fixed by default, as in the original; it can be learned (clamped to
[1, 100]). The original sums the two directional cross-entropies; `loss_reduction: mean` averages them (same
gradient direction, half the scale).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from metadiff.nets.hypernet import Mlp

REDUCTIONS = ("sum", "mean")


class HyperCLIPEncoder(nn.Module):
    input_mean: torch.Tensor  # buffers
    input_std: torch.Tensor
    log_logit_scale: torch.Tensor  # a buffer, or a Parameter with learn_logit_scale

    def __init__(
        self,
        in_dim: int,
        embed_dim: int,
        hidden: list[int] | tuple = (128, 128),
        nonlinearity: str = "softplus",
        logit_scale: float = 100.0,
        learn_logit_scale: bool = False,
    ):
        super().__init__()
        self.mlp = Mlp(in_dim, list(hidden), embed_dim, nonlinearity=nonlinearity)
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        log_scale = torch.tensor(math.log(logit_scale))
        if learn_logit_scale:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor, std_min: float = 0.01) -> None:
        """Per-dimension standardisation of the input; std clipped below (the spec's 0.01)."""
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp_min(std_min))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(1.0, 100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings [B, e] of weight/latent vectors [B, in]."""
        return F.normalize(self.mlp((x.float() - self.input_mean) / self.input_std), dim=-1)

    def logits(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[B, C] similarity of B inputs with C text embeddings (raw CLIP embeddings, normalised here); the cosine in
        fp32 also under bf16/fp16 autocast: scaled by up to 100, a bf16 matmul (8 bits) moves the logits by ~0.4."""
        embedded = self(x)
        with torch.autocast(device_type=embedded.device.type, enabled=False):
            return self.logit_scale * embedded.float() @ F.normalize(text.float(), dim=-1).T


def contrastive_loss(logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Symmetric InfoNCE over a square [B, B] matrix whose diagonal holds the matching pairs."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss_reduction '{reduction}' is not one of {REDUCTIONS}")
    target = torch.arange(logits.shape[0], device=logits.device)
    both = F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
    return both if reduction == "sum" else both / 2


def retrieval_accuracy(logits: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Per-row hit [B] of the true column (the diagonal) among the top-k of each row of a [B, B] matrix."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == torch.arange(logits.shape[0], device=logits.device)[:, None]).any(1).float()


def n_way_accuracy(logits: torch.Tensor, n_way: int = 10, seed: int = 0) -> torch.Tensor:
    """Per-row hit [B] when the true column competes with n_way - 1 other columns drawn at random (the original's
    task-identification test, §4.10: chance = 1/n_way)."""
    n = logits.shape[0]
    if n < n_way:
        raise ValueError(f"{n_way}-way retrieval needs at least {n_way} tasks, got {n}")
    gen = torch.Generator().manual_seed(seed)
    hits = torch.empty(n)
    for i in range(n):  # B <= a few thousand tasks: a loop over rows is cheap and keeps the draw readable
        others = torch.randperm(n - 1, generator=gen)[: n_way - 1]
        others = others + (others >= i).long()  # skip the true column
        hits[i] = (logits[i, i] > logits[i, others.to(logits.device)].max()).float()
    return hits


GuidanceObjective = Literal["cosine", "softmax"]


def question_log_prob(
    embedded: torch.Tensor,
    question: torch.Tensor,
    objective: GuidanceObjective,
    logit_scale: torch.Tensor | float,
    others: torch.Tensor | None = None,
) -> torch.Tensor:
    """What HyperCLIP guidance ascends, per row of `embedded` [B, e] (unit HyperCLIP embeddings) and its task's
    `question` [B, e]: `cosine`, cos(embedding, question), the spec's (a similarity, not a log-probability: every
    question near the task's raises it as much); `softmax`, log p(question | weights) = the log-softmax of
    logit_scale * cos over the task's question and `others` [M, e] (e.g. the meta-train questions), the contrastive
    model's own probability: its gradient also pushes away from the questions the weights must not answer.
    (`others` equal to the task's question would only add log(2) per copy; `cosine` does not read `others`.)"""
    target = F.normalize(question.float(), dim=-1)
    cos = (embedded * target).sum(-1)
    if objective == "cosine":
        return cos
    if objective != "softmax":
        raise ValueError(f"HyperCLIP guidance objective {objective!r} is not one of 'cosine', 'softmax'")
    if others is None or others.numel() == 0:
        raise ValueError("HyperCLIP guidance objective 'softmax' needs the other questions it is normalised over")
    rest = embedded @ F.normalize(others.float(), dim=-1).T  # [B, M]
    logits = logit_scale * torch.cat([cos[:, None], rest], dim=1)
    return logits.log_softmax(dim=1)[:, 0]
