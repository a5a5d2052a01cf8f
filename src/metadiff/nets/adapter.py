"""The CLIP adapter main network ("mnet", spec §3.1), written for a batch of tasks at once.

    u = relu(x W1s^T + b1) W2s^T + b2 + x,   W1s = W1/sqrt(e), W2s = W2/sqrt(h)
    logits = scale * (u/|u|) (T/|T|)^T

Weights carry a leading task dimension ([T, h, e], ...), so T tasks with their own weights run as batched matmuls
(`torch.baddbmm`): no per-task Python and no `vmap` tracing. This is written by hand because the forward is three
lines and the batched layout is what makes the inner loop fast; a flat-vector view ([W1, W2, b1, b2], row-major, the
spec's layout) lets a hypernetwork or a VAE emit the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metadiff.utils.dtypes import full_precision


@dataclass(frozen=True)
class AdapterShape:
    embed_dim: int
    hidden_dim: int

    @property
    def sizes(self) -> dict[str, tuple[int, ...]]:
        e, h = self.embed_dim, self.hidden_dim
        return {"W1": (h, e), "W2": (e, h), "b1": (h,), "b2": (e,)}

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.sizes.values())

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """[..., P] -> {name: [..., *shape]} in the spec's order W1, W2, b1, b2.

        One `split` (views): its backward is one concatenation, where four slices would each allocate and fill a
        zero tensor of the full [..., P] gradient (measured: 18% of an HNET inner step)."""
        parts = torch.split(flat, [math.prod(shape) for shape in self.sizes.values()], dim=-1)
        return {
            name: part.reshape(*flat.shape[:-1], *shape)
            for (name, shape), part in zip(self.sizes.items(), parts, strict=True)
        }

    def flatten(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        lead = weights["b1"].shape[:-1]
        return torch.cat([weights[name].reshape(*lead, -1) for name in self.sizes], dim=-1)


def adapter_logits(
    weights: dict[str, torch.Tensor],
    x: torch.Tensor,
    answers: torch.Tensor,
    answer_mask: torch.Tensor | None = None,
    scale: float = 100.0,
    scaled_init: bool = False,
) -> torch.Tensor:
    """Logits [T, N, A] of T tasks: weights [T, ...], image features x [T, N, e], answer embeddings [T, A, e].

    `scaled_init=False` divides W1, W2 by sqrt(e), sqrt(h) in the forward (the spec's default); True means the
    weights were scaled at init ("straight_through"). Padded answers get -inf logits.
    """
    w1, w2, b1, b2 = weights["W1"], weights["W2"], weights["b1"], weights["b2"]
    # the 1/sqrt(fan-in) scaling as the matmuls' alpha: dividing the [T, h, e] weights would copy them, and their
    # gradient, in every inner step
    alpha1, alpha2 = (1.0, 1.0) if scaled_init else (1 / math.sqrt(w1.shape[-1]), 1 / math.sqrt(w2.shape[-1]))
    hidden = torch.relu(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2), alpha=alpha1))
    u = torch.baddbmm(b2.unsqueeze(1) + x, hidden, w2.transpose(1, 2), alpha=alpha2)
    # the cosine in fp32 also under bf16/fp16 autocast, like the prototype readout: scaled by 100, a bf16 bmm of the
    # unit vectors (8 bits) moves the logits by up to ~0.4
    with torch.autocast(device_type=u.device.type, enabled=False):
        logits = scale * torch.bmm(
            F.normalize(full_precision(u), dim=-1), F.normalize(full_precision(answers), dim=-1).transpose(1, 2)
        )
    if answer_mask is not None:
        logits = logits.masked_fill(~answer_mask.unsqueeze(1), float("-inf"))
    return logits


def masked_task_losses(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per task [T] over its real (unpadded) examples."""
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    ce = ce.masked_fill(~mask, 0.0)
    return ce.sum(1) / mask.sum(1).clamp_min(1)


def masked_task_accuracy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Accuracy per task [T] over its real examples."""
    hits = (logits.argmax(-1) == labels) & mask
    return hits.sum(1).float() / mask.sum(1).clamp_min(1)


class CLIPAdapter(nn.Module):
    """One shared set of adapter weights (the `mnet`/multitask case); `expand(T)` gives the batched view."""

    def __init__(self, embed_dim: int, hidden_dim: int, init_std: float = 1.0, zero_output: bool = False):
        super().__init__()
        self.shape = AdapterShape(embed_dim, hidden_dim)
        self.weights = nn.ParameterDict(
            {name: nn.Parameter(torch.randn(size) * init_std) for name, size in self.shape.sizes.items()}
        )
        if zero_output:  # W2 = b2 = 0: the identity adapter, i.e. exactly CLIP zero-shot (spec §3.1)
            nn.init.zeros_(self.weights["W2"])
            nn.init.zeros_(self.weights["b2"])

    def expand(self, n_tasks: int) -> dict[str, torch.Tensor]:
        return {name: p.unsqueeze(0).expand(n_tasks, *p.shape) for name, p in self.weights.items()}
