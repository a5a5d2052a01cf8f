"""The self-taught class-learner's objective (spec §4.3): classify *noised* pseudo images by their pseudo class, and
match the meta-model's posterior on the clean image (KL to the teacher), so that it can guide sampling at any t.

The backbone g is only read here (the original let gradients reach g and then zeroed them before g's update, which
is the same as not computing them). Noise domain by `compat`:
* fixed: noise in the diffusion space, x_t = q(2x - 1, t), and feed g what guidance feeds it, (x_t + 1) / 2;
* faithful: noise the classifier's input as is and feed it raw (the original noised ImageNet-normalised images while
  guidance fed g raw diffusion-space x_t, §8 B5).
KL reduction: `batchmean` is the true KL per sample; the original's `mean` divides it by the number of classes too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metadiff.dfml.guidance import check_compat, guide_input
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.diffusion.zoo import to_diffusion
from metadiff.nets.backbones import Backbone
from metadiff.utils.transfer import host_to_device

KL_REDUCTIONS = ("batchmean", "mean")


def noised_guide_input(
    images: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor, noise: torch.Tensor, compat: str
) -> torch.Tensor:
    """What g sees of [0, 1] `images` noised to step t (the input guidance gives it at that step)."""
    check_compat(compat)
    if compat == "fixed":
        return guide_input(schedule.add_noise(to_diffusion(images), noise, t), compat)
    return schedule.add_noise(images, noise, t)


def class_learner_loss(
    backbone: Backbone,
    teacher_head: nn.Module,
    class_learner: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    schedule: NoiseSchedule,
    compat: str,
    kl_reduction: str,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE + KL, CE, KL) of the class-learner on `images` [N, C, H, W] in [0, 1] with pseudo `labels` [N]; t is
    uniform over the schedule's steps, per image."""
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction '{kl_reduction}' is not one of {KL_REDUCTIONS}")
    t = host_to_device(torch.randint(0, schedule.n_timesteps, (len(images),), generator=generator), images.device)
    noise = host_to_device(torch.randn(images.shape, generator=generator), images.device, images.dtype)
    with torch.no_grad():
        teacher = teacher_head(backbone.embed(images)).log_softmax(-1)
        noisy = backbone.embed(noised_guide_input(images, schedule, t, noise, compat))
    logits = class_learner(noisy, t)
    ce = F.cross_entropy(logits, labels)
    # written out rather than F.kl_div(reduction='mean'), which PyTorch announces will become 'batchmean'
    kl = F.kl_div(logits.log_softmax(-1), teacher, reduction="none", log_target=True).sum(-1).mean()
    if kl_reduction == "mean":
        kl = kl / logits.shape[-1]
    return ce + kl, ce, kl
