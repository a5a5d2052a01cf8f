"""OmegaConf resolvers the config tree uses; registered when `metadiff.config` is imported (before any config value
is resolved: OmegaConf resolves lazily, on first access)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"  # pinned files shipped inside the package


def cfg_label(scale: float) -> str:
    """The name HyperLDM logs a guidance scale's accuracy under (`val/cfg1.5`), so a sweep over the scale can name
    the metric it optimises: `optimized_metric: val/${cfg_label:${model.guidance_scales}}`."""
    return f"cfg{float(scale):g}"


def asset(relative: str) -> str:
    """`${asset:clip_synthvqa/clip.pt}`: the absolute path of a file shipped in `metadiff/assets/` (pinned weights
    with their manifest), wherever the package is installed and whatever `paths.root_dir` a run writes under."""
    path = ASSETS_DIR / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"asset '{relative}': no file {path} (the package ships {sorted(ASSETS_DIR.glob('*'))})"
        )
    return str(path)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("cfg_label", cfg_label, replace=True)
    OmegaConf.register_new_resolver("asset", asset, replace=True)
