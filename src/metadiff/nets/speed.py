"""Opt-in execution options of a stage's convolutional nets (`model.speed` in conf): `torch.compile` and the
channels_last memory format. Both off by default: every published figure is eager NCHW, and on a 2-core CPU a
compile costs more than it saves; on a GPU both usually shorten a UNet step (channels_last lets cuDNN run the
convolutions on tensor cores without transposes; compile fuses the normalisation and activation kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SpeedSpec:
    """`model.speed`: how the stage's nets execute (not what they compute, up to float rounding)."""

    compile: bool  # torch.compile the net's forward (`nn.Module.compile`: same module, same state_dict keys)
    channels_last: bool  # NHWC weights; convolutions then also give NHWC outputs for NCHW inputs


def speed_up(net: nn.Module, spec: SpeedSpec) -> nn.Module:
    """Apply `spec` to `net` in place (and return it). Call it after any copy of the module that must stay eager,
    e.g. the EMA callback's deep copy of the stage: a compiled forward stays bound to the module it was made for."""
    if spec.channels_last:
        net.to(memory_format=torch.channels_last)
    if spec.compile:
        net.compile()
    return net
