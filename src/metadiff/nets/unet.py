"""The image denoiser of the zoo: diffusers' `UNet2DModel` (a well-kept ADM-style UNet: ResNet blocks with
scale-shift time conditioning, optional self-attention per level), behind the eps_model(x_t, t) signature of
`metadiff.diffusion.sampling`. The config is stored beside the weights so a zoo loads without the run's config.

Two ADM features diffusers' constructor does not express (spec §3.6):
* `learn_sigma`: the UNet outputs 2C channels, eps and the variance interpolation v of improved DDPM's learned-range
  variance (`metadiff.diffusion.losses`); `forward` still returns eps alone, `forward_with_variance` both.
* `attention_heads`: a fixed number of heads in every attention layer (ADM: 4, so 32 to 128 channels per head
  across levels). `UNet2DModel` takes one `attention_head_dim` for all levels, i.e. a fixed head *width*.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d import UNet2DModel  # not `from diffusers`: mypy reads that as a no-torch dummy
from torch import nn

from metadiff.config import ConfigError


def set_attention_heads(unet: nn.Module, heads: int) -> None:
    """Give every diffusers `Attention` of `unet` `heads` heads of width inner_dim / heads.

    Why this is exact: the weights of an Attention do not depend on the head count (to_q/k/v map C -> inner_dim
    whatever the split); the split lives in three attributes, which `Attention.__init__` derives from its arguments:
    `heads` (read by every processor to reshape q/k/v to [B, heads, L, inner_dim / heads]), `scale` (the softmax
    temperature 1 / sqrt(head width), read by the non-SDPA processors; SDPA derives the same from the reshaped
    tensors) and `sliceable_head_dim` (the unit of attention slicing). Setting the three equals constructing
    `Attention(heads=heads, dim_head=inner_dim // heads)` with the same weights (tests/test_adm_unet.py checks it
    under both processors). ADM's "legacy" QKV order is a layout of a fused qkv weight; a model trained from scratch
    has no such layout to match."""
    for module in unet.modules():
        if isinstance(module, Attention):
            if module.inner_dim % heads:
                raise ConfigError(
                    f"model.attention_heads = {heads} does not divide an attention layer's {module.inner_dim} channels"
                )
            module.heads = module.sliceable_head_dim = heads
            if module.scale_qk:
                module.scale = (module.inner_dim // heads) ** -0.5


class ImageDenoiser(nn.Module):
    def __init__(
        self,
        image_size: int,
        channels: int,
        unet: dict[str, Any],
        *,
        learn_sigma: bool = False,
        attention_heads: int | None = None,
    ):
        """`unet`: `UNet2DModel` keyword arguments. `attention_heads`: heads per attention layer (None: diffusers'
        own split, channels / `unet.attention_head_dim` heads); `learn_sigma`: 2C output channels (eps, v). The
        defaults are the plain diffusers eps-UNet, for code that builds one directly (tests, benches); the stage
        passes both from its config, where they are required keys."""
        super().__init__()
        self.config: dict[str, Any] = {
            "image_size": int(image_size),
            "channels": int(channels),
            "unet": dict(unet),
            "learn_sigma": bool(learn_sigma),
            "attention_heads": attention_heads,
        }
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in unet.items()}
        if attention_heads is not None:
            if "attention_head_dim" in kwargs:
                raise ConfigError(
                    "model.unet.attention_head_dim and model.attention_heads both set the attention split: keep one"
                )
            kwargs["attention_head_dim"] = None  # one head of all channels at construction: inner_dim = channels
        out_channels = 2 * channels if learn_sigma else channels
        self.unet = UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=out_channels, **kwargs)
        if attention_heads is not None:
            set_attention_heads(self.unet, attention_heads)

    @property
    def learn_sigma(self) -> bool:
        return bool(self.config["learn_sigma"])

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps prediction for x_t in [-1, 1]-scaled pixel space."""
        return self.unet(x_t, t).sample[:, : self.config["channels"]]

    def forward_with_variance(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, v) of a learned-sigma model: v the raw variance interpolation, frac = (v + 1) / 2 of improved
        DDPM's log sigma^2 = frac log beta_t + (1 - frac) log beta_tilde_t."""
        if not self.learn_sigma:
            raise ValueError("forward_with_variance needs a model built with learn_sigma = true")
        eps, v = self.unet(x_t, t).sample.chunk(2, dim=1)
        return eps, v

    def sampling_model(
        self,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """What `metadiff.diffusion.sampling.sample` should call: (eps, v) when the variance is learned, so that
        ancestral (eta = 1) steps use it (DDIM ignores it), else eps."""
        return self.forward_with_variance if self.learn_sigma else self

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImageDenoiser:
        """Rebuild from a stored config. Backward-compatible reader: configs written before `learn_sigma` and
        `attention_heads` existed were eps-only models with diffusers' own head split, so a missing key reads as
        False / None (the only defaults here; the training config must set both)."""
        return cls(
            config["image_size"],
            config["channels"],
            config["unet"],
            learn_sigma=config.get("learn_sigma", False),
            attention_heads=config.get("attention_heads"),
        )
