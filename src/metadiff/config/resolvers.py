"""OmegaConf resolvers the config tree uses; registered when `metadiff.config` is imported (before any config value
is resolved: OmegaConf resolves lazily, on first access)."""

from __future__ import annotations

from omegaconf import OmegaConf


def cfg_label(scale: float) -> str:
    """The name HyperLDM logs a guidance scale's accuracy under (`val/cfg1.5`), so a sweep over the scale can name
    the metric it optimises: `optimized_metric: val/${cfg_label:${model.guidance_scales}}`."""
    return f"cfg{float(scale):g}"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("cfg_label", cfg_label, replace=True)
