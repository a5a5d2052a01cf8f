"""Build open_clip models offline: registered custom configs, weights only from local files.

No hub access ever happens here: `pretrained` is either None (random init, e.g. the small CPU model that the
`clip_synthvqa` stage trains) or a path to a local checkpoint file, which open_clip loads itself. A checkpoint that
does not fit the architecture is reported in one line naming the file and the architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from metadiff.config import ConfigError
from metadiff.errors import InputFileError, MissingInputError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Make metadiff's own architectures (e.g. `metadiff-tiny-vit`) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


@dataclass
class ClipBundle:
    """A model with the pieces needed to feed it: tokenizer and image normalisation."""

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    arch: str


def create_clip(arch: str, checkpoint: str | Path | None = None) -> ClipBundle:
    """Instantiate `arch` (any open_clip architecture) with optional weights from a local checkpoint file."""
    register_model_configs()
    if arch not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip architecture '{arch}' (see open_clip.list_models())")
    model = open_clip.create_model(arch, pretrained=None, pretrained_text=False, output_dict=True)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise MissingInputError(
                f"CLIP checkpoint not found: {path} (put the open_clip weights for '{arch}' there; no download is attempted)"
            )
        try:  # read once on its own, so a corrupt file and a wrong architecture get different messages
            torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - torch.load errors for truncated/corrupt files vary
            raise InputFileError(f"checkpoint {path} could not be read as a torch checkpoint ({type(err).__name__}: {err})") from None
        try:
            open_clip.load_checkpoint(model, str(path))
        except (RuntimeError, AssertionError, KeyError, ValueError) as err:
            lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
            detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
            raise InputFileError(f"checkpoint {path} does not fit architecture '{arch}': {detail}") from None
    size, mean, std = image_preprocessing(arch)
    return ClipBundle(model=model, tokenizer=open_clip.get_tokenizer(arch), image_size=size, mean=mean, std=std,
                      arch=arch)


def image_preprocessing(arch: str) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Input size and normalisation of `arch`'s image tower, from its config (no model is built)."""
    register_model_configs()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ConfigError(f"unknown open_clip architecture '{arch}' (see open_clip.list_models())")
    vision = cfg["vision_cfg"]
    pp = {**vision.get("preprocess_cfg", {}), **cfg.get("preprocess_cfg", {})}
    size = pp.get("size", vision.get("image_size", 224))
    size = size[0] if isinstance(size, list | tuple) else size
    return (int(size), tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)))


def context_length(arch: str) -> int:
    register_model_configs()
    cfg = open_clip.get_model_config(arch) or {}
    return int(cfg.get("text_cfg", {}).get("context_length", 77))
