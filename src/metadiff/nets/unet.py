"""The image denoiser of the zoo: diffusers' `UNet2DModel` (a well-kept ADM-style UNet: ResNet blocks with
scale-shift time conditioning, optional self-attention per level), behind the eps_model(x_t, t) signature of
`metadiff.diffusion.sampling`. The config is stored beside the weights so a zoo loads without the run's config.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DModel
from torch import nn


class ImageDenoiser(nn.Module):
    def __init__(self, image_size: int, channels: int, unet: dict[str, Any]):
        super().__init__()
        self.config = {"image_size": int(image_size), "channels": int(channels), "unet": dict(unet)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in unet.items()}
        self.unet = UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, **kwargs)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps prediction for x_t in [-1, 1]-scaled pixel space."""
        return self.unet(x_t, t).sample

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImageDenoiser:
        return cls(config["image_size"], config["channels"], config["unet"])
