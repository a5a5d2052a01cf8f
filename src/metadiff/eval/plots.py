"""Figures saved beside a run (PNG, written atomically) and sent to loggers that take images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metadiff.utils.io import atomic_path

if TYPE_CHECKING:
    import torch


def save_shots_plot(curves: dict[str, list[tuple[int, float, float]]], path: Path, title: str) -> Path:
    """Accuracy vs shots per answer, one line per method with its 95% CI band."""
    return save_curve_plot(curves, path, title, xlabel="shots per answer")


def log_image(loggers: list, key: str, path: Path) -> None:
    """Send a saved PNG to every logger that takes images (TensorBoard, W&B)."""
    for logger in loggers:
        experiment: Any = getattr(logger, "experiment", None)
        if type(logger).__name__ == "WandbLogger":
            logger.log_image(key=key, images=[str(path)])
        elif hasattr(experiment, "add_image"):  # TensorBoard
            import matplotlib.image

            experiment.add_image(key, matplotlib.image.imread(path), dataformats="HWC")


def save_curve_plot(
    curves: Mapping[str, Sequence[tuple[float, float, float]]], path: Path, title: str, xlabel: str
) -> Path:
    """Accuracy vs a swept value (shots, guidance scale), one line per method with its 95% CI band.

    A method whose accuracy does not depend on the swept value (a reference row repeated at every x) is drawn as a
    dashed line without markers or band, and the legend sits outside the axes, so that many rows stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=120)
    for name, points in curves.items():
        xs = [p[0] for p in points]
        mean = [p[1] for p in points]
        if len(points) > 1 and len(set(mean)) == 1:
            ax.plot(xs, mean, linestyle="--", linewidth=1.2, label=name)
            continue
        (line,) = ax.plot(xs, mean, marker="o", label=name)
        ax.fill_between(
            xs,
            [m - p[2] for m, p in zip(mean, points, strict=True)],
            [m + p[2] for m, p in zip(mean, points, strict=True)],
            color=line.get_color(),
            alpha=0.15,
        )
    ax.set(xlabel=xlabel, ylabel="query accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small", frameon=False)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    """A PNG grid of [0, 1] images, written atomically (samples and pseudo data of the image stages)."""
    import torchvision.utils as vutils

    with atomic_path(path) as tmp:
        vutils.save_image(images, tmp, nrow=nrow, padding=1, format="png")
    return path
