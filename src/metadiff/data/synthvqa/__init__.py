"""Offline, procedurally generated twin of the Meta-VQA few-shot benchmark (same file schema).

Build names are imported lazily so that ``python -m metadiff.data.synthvqa.build`` runs cleanly.
"""

from typing import Any

from metadiff.data.synthvqa.questions import (
    FAMILIES,
    Filter,
    Question,
    QuestionTemplate,
    SceneTable,
    enumerate_questions,
    true_statements,
)
from metadiff.data.synthvqa.scenes import (
    COLOR_RGB,
    GRID_CELLS,
    Scene,
    SceneObject,
    SceneSpec,
    caption_scene,
    grid_cell,
    horizontal_region,
    quadrant_of,
    region_of,
    render_scene,
    sample_scene,
    vertical_region,
)

_BUILD_NAMES = (
    "FILES", "SynthVQAConfig", "build_synthvqa", "fingerprint", "load_or_build_synthvqa", "read_manifest",
    "task_statistics",
)  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _BUILD_NAMES:
        from metadiff.data.synthvqa import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "COLOR_RGB", "FAMILIES", "GRID_CELLS", "Filter", "Question", "QuestionTemplate", "Scene", "SceneObject",
    "SceneSpec", "SceneTable", "caption_scene", "enumerate_questions", "grid_cell", "horizontal_region",
    "quadrant_of", "region_of", "render_scene", "sample_scene", "true_statements", "vertical_region",
    *_BUILD_NAMES,
]  # fmt: skip
