"""Class-learner guidance of the zoo's unconditional models (spec §4.4): the score of the wanted pseudo class under
the time-conditioned class-learner c_phi(normalize(GAP(g(x_t))), t) steers DDIM sampling (classifier guidance in
eps form, `metadiff.diffusion.sampling.classifier_guidance`).

`compat` decides the two details the original got wrong:
* the guidance target: `fixed` guides pseudo class i toward class-learner output i; `faithful` toward i mod 5, as
  the original's in-place `y % 5` did (§8 B1);
* the guide's input domain: `fixed` feeds the meta-model the image it would see, (x_t + 1) / 2 in [0, 1] (its own
  normalisation is inside the backbone); `faithful` feeds the raw diffusion-space x_t (§8 B5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

Compat = Literal["fixed", "faithful"]  # the stages' `compat` argument: checked when the config is composed
COMPAT = get_args(Compat)


def check_compat(compat: str) -> None:
    if compat not in COMPAT:
        raise ValueError(f"compat '{compat}' is not one of {COMPAT}")


def guidance_target(pseudo_class: int, compat: str) -> int:
    """Which class-learner output guides pseudo class `pseudo_class`."""
    check_compat(compat)
    return pseudo_class if compat == "fixed" else pseudo_class % 5


def guide_input(x_t: torch.Tensor, compat: str) -> torch.Tensor:
    """What the meta-model backbone sees of a diffusion-space sample (its [0, 1] input, or the raw x_t)."""
    check_compat(compat)
    return (x_t + 1.0) / 2.0 if compat == "fixed" else x_t


def class_log_prob(
    backbone: nn.Module, class_learner: nn.Module, targets: torch.Tensor, compat: str
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """log p(target | x_t, t) under the class-learner on the backbone's embedding of x_t, per sample [B]."""

    def log_prob(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        features = F.normalize(backbone(guide_input(x_t, compat)).mean(dim=(2, 3)), dim=-1)
        logits = class_learner(features, t)
        return logits.log_softmax(-1).gather(1, targets.view(-1, 1)).squeeze(1)

    return log_prob
