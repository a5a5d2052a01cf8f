"""Ridge regression from a task's question embedding to its fine-tuned latent: the simplest zero-shot map.

A diagnostic beside the generative methods: if a linear map recovers part of the fine-tuned latents' gain on held-out
tasks, the question carries the task and a conditional model has something to learn; if not, no guidance can show.
Closed form (no library needed for a [n, e] x [e, d] solve): W = (Q'Q + alpha I)^-1 Q'Z on centred Z and on Q
standardised per dimension, so that alpha does not shrink the small directions that tell questions apart (question
embeddings share almost all of their direction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RidgeMap:
    weight: torch.Tensor  # [e, d]
    q_mean: torch.Tensor  # [e]
    q_scale: torch.Tensor  # [e]
    z_mean: torch.Tensor  # [d]

    @classmethod
    def fit(cls, questions: torch.Tensor, latents: torch.Tensor, alpha: float) -> RidgeMap:
        q, z = questions.double(), latents.double()
        # one task has no spread (its std is NaN): its question is only centred
        q_scale = q.std(0).clamp_min(1e-12) if len(q) > 1 else torch.ones_like(q[0])
        q_mean, z_mean = q.mean(0), z.mean(0)
        qc, zc = (q - q_mean) / q_scale, z - z_mean
        gram = qc.T @ qc + alpha * torch.eye(q.shape[1], dtype=q.dtype)
        weight = torch.linalg.solve(gram, qc.T @ zc)
        return cls(weight.float(), q_mean.float(), q_scale.float(), z_mean.float())

    def __call__(self, questions: torch.Tensor) -> torch.Tensor:
        d = questions.device
        q = (questions.float() - self.q_mean.to(d)) / self.q_scale.to(d)
        return q @ self.weight.to(d) + self.z_mean.to(d)
