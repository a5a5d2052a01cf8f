"""The data-free meta-model (spec §3.4): a backbone g, a global MLP head h over the pseudo classes, and cosine
prototype scores with scale s (`scale_cls`).

Training returns both the global logits of the queries (C-way over all pseudo classes) and the *spatial* episodic
scores: every query location, channel-normalised, against the GAP-pooled normalised prototype of each way. Evaluation
returns s · cos(GAP(query), GAP(prototype)), the prototype being the mean of the unnormalised support maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from metadiff.nets.backbones import Backbone
from metadiff.nets.heads import MLPHead


def class_means(values: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Per-way means of `values` [B, S, ...] over the support items of each way -> [B, N, ...]."""
    onehot = F.one_hot(labels, n_way).to(values.dtype)  # [B, S, N]
    flat = values.flatten(2)
    means = torch.einsum("bsn,bsf->bnf", onehot, flat) / onehot.sum(1).unsqueeze(-1)
    return means.view(*means.shape[:2], *values.shape[2:])


class MetaModel(nn.Module):
    def __init__(self, backbone: Backbone, n_classes: int, head_norm: str = "batch_stats", scale_cls: float = 7.0):
        super().__init__()
        self.backbone, self.scale_cls = backbone, scale_cls
        self.head = MLPHead(backbone.out_dim, n_classes, norm=head_norm)

    def maps(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone maps of an episode batch in one pass: support [B, S, D, h, w], query [B, Q, D, h, w]."""
        b, s = support.shape[:2]
        images = torch.cat(
            [rearrange(support, "b s c h w -> (b s) c h w"), rearrange(query, "b q c h w -> (b q) c h w")]
        )
        maps = self.backbone(images)
        return (
            rearrange(maps[: b * s], "(b s) d h w -> b s d h w", b=b),
            rearrange(maps[b * s :], "(b q) d h w -> b q d h w", b=b),
        )

    def train_forward(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(global logits [B*Q, C], spatial episodic scores [B*Q, N, h, w])."""
        f_s, f_q = self.maps(support, query)
        protos = F.normalize(class_means(f_s, support_labels, n_way).mean(dim=(3, 4)), dim=-1)  # [B, N, D]
        spatial = self.scale_cls * torch.einsum("bqdhw,bnd->bqnhw", F.normalize(f_q, dim=2), protos)
        global_logits = self.head(F.normalize(f_q.mean(dim=(3, 4)), dim=-1).flatten(0, 1))
        return global_logits, spatial.flatten(0, 1)

    def episode_scores(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        """Eval-mode scores [B, Q, N] = s · cos(GAP(F_q), GAP(P_n)), in fp32 under autocast too, like
        `eval.fewshot.prototype_logits` (why: there). Its own op order, which the published dfml figures used."""
        f_s, f_q = self.maps(support, query)
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            protos = class_means(f_s.float(), support_labels, n_way).mean(dim=(3, 4))
            q = f_q.float().mean(dim=(3, 4))
            return self.scale_cls * torch.einsum("bqd,bnd->bqn", F.normalize(q, dim=-1), F.normalize(protos, dim=-1))


def spatial_episodic_loss(spatial: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the N ways at every location, averaged over locations and queries (spec §4.2 L2)."""
    h, w = spatial.shape[-2:]
    targets = query_labels.reshape(-1, 1, 1).expand(-1, h, w)
    return F.cross_entropy(spatial, targets)
