"""Few-shot readouts on episodes (spec §3.4 eval mode, §5): per-episode accuracies for mean ± 95% CI."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def prototype_logits(
    support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int, scale: float = 1.0
) -> torch.Tensor:
    """scale · cos(query, prototype) [B, Q, N]; prototypes are the class means of the (unnormalised) support
    features [B, S, D], as the original's eval mode.

    Always in fp32, also under bf16/fp16 autocast: the cosines of nearby prototypes differ in the third digit, which
    bf16's 8-bit mantissa rounds away. Measured (a random Conv4, 40 glyph 5-shot episodes): 0.502 in fp32, 0.370
    with this readout in bf16, 0.502 with bf16 features and this fp32 readout."""
    with torch.autocast(device_type=support.device.type, enabled=False):
        support, query = support.float(), query.float()
        onehot = F.one_hot(support_labels, n_way).to(support.dtype)  # [B, S, N]
        protos = torch.einsum("bsn,bsd->bnd", onehot, support) / onehot.sum(1).unsqueeze(-1)
        return scale * torch.einsum("bqd,bnd->bqn", F.normalize(query, dim=-1), F.normalize(protos, dim=-1))


def episode_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy of each episode [B] from logits [B, Q, N] and labels [B, Q]."""
    return (logits.argmax(-1) == labels).float().mean(-1)


def embed_episodes(embed, episodes) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of support and query images of a batch of episodes through `embed` ([n, C, H, W] -> [n, D])."""
    b, s = episodes.support.shape[:2]
    images = torch.cat(
        [rearrange(episodes.support, "b s c h w -> (b s) c h w"), rearrange(episodes.query, "b q c h w -> (b q) c h w")]
    )
    feats = embed(images)
    support, query = feats[: b * s], feats[b * s :]
    return rearrange(support, "(b s) d -> b s d", b=b), rearrange(query, "(b q) d -> b q d", b=b)


def prototype_episode_accuracy(features, episodes, scale: float) -> torch.Tensor:
    """Per-episode accuracy [B] of the prototype readout on unnormalised features (`features`: [n, C, H, W] ->
    [n, D]), the scoring the baseline, the dfml checkpoint selection and its test share."""
    support, query = embed_episodes(features, episodes)
    n_way = int(episodes.support_labels.max()) + 1
    return episode_accuracy(
        prototype_logits(support, episodes.support_labels, query, n_way, scale), episodes.query_labels
    )


def readout_lines(
    title: str, report: dict[str, float], shots: list[int], readouts: tuple[str, ...], width: int = 12
) -> str:
    """The printed table of a few-shot test: one `k-shot readout mean +- ci95` line per shot and readout, read from
    `report` keys `test/{readout}_{k}shot`."""
    lines = ["", title]
    for k in shots:
        for name in readouts:
            key = f"test/{name}_{k}shot"
            lines.append(f"  {k}-shot  {name:<{width}s} {report[key]:.3f} +- {report[key + '_ci95']:.3f}")
    return "\n".join(lines)


def paired_lines(
    title: str, report: dict[str, float], names: list[str], notes: dict[str, str] | None = None, width: int = 52
) -> str:
    """The printed paired differences of a few-shot test: one `name mean +- ci95[, note]` line per name, read from
    `report` keys `test/{name}` (written by `eval.per_task.paired_report`); `notes` appends e.g. a gap share."""
    lines = [f"  {title}"]
    for name in names:
        key = f"test/{name}"
        note = f", {notes[name]}" if notes and name in notes else ""
        lines.append(f"  {name:<{width}s} {report[key]:+.3f} +- {report[key + '_ci95']:.3f}{note}")
    return "\n".join(lines)
