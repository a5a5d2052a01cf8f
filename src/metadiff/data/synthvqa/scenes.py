"""Procedural scenes of coloured shapes: sampling, rendering and captions.

A scene is a handful of flat shapes (shape x colour x size) on a dark, noisy background.  It plays the
role of a COCO image in the offline Meta-VQA twin: one pool of scenes is shared by every question, and
each question's answer is a pure function of the scene description, so labels are exact.

Coordinates are image-normalised, x to the right and y *downwards* (image convention), so "top"
means small y.  Colours and shapes are drawn with Zipf-like frequencies (``attribute_skew``) because
real VQA answers are long-tailed; that skew is what keeps the majority-class baseline well above
chance, as in the real benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

#: RGB of every colour name a ``SceneSpec`` may use; chosen to stay distinct after jitter at 48 px.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 225, 40),
    "purple": (150, 55, 205),
    "orange": (250, 140, 25),
    "cyan": (40, 215, 225),
    "white": (240, 240, 240),
    "gray": (130, 130, 130),
    "brown": (140, 85, 40),
    "pink": (245, 140, 190),
}

#: Shapes that ``render_scene`` knows how to draw.
SUPPORTED_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")


@dataclass(frozen=True)
class SceneObject:
    """One shape; ``x``/``y`` is its centre in [0, 1] (y grows downwards)."""

    shape: str
    color: str
    size: str
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    """An image description: the objects, in drawing order."""

    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class SceneSpec:
    """Everything that shapes the image distribution (mirrored in the Hydra config)."""

    image_size: int = 48
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
    sizes: tuple[str, ...] = ("small", "medium", "large")
    #: diameter of each size as a fraction of the image side (same order as ``sizes``)
    size_diameters: tuple[float, ...] = (0.22, 0.3, 0.4)
    min_objects: int = 2
    max_objects: int = 5
    #: std of per-object RGB noise, as a fraction of 255
    colour_jitter: float = 0.04
    #: std of per-pixel noise over the whole image, as a fraction of 255
    background_noise: float = 0.03
    #: brightest channel value of the random dark background, as a fraction of 255
    background_max: float = 0.22
    #: Zipf exponent for colour/shape frequencies (0 = uniform); long tails as in real VQA answers
    attribute_skew: float = 1.0
    #: Zipf exponent of colour and size GIVEN the shape, over a shape-specific order (0 = independent of the shape,
    #: the marginal ``attribute_skew`` law). > 0 makes answer priors depend on the question, as in real VQA
    #: ("What color is the banana?"): a task's prior is then something its question tells and a shared model cannot
    conditional_skew: float = 0.0
    #: share of caption statements written as "<question> <answer>" instead of the declarative prompt, so the CLIP
    #: text tower also reads question forms (the task condition is the question's embedding)
    question_caption_prob: float = 0.0
    #: Beta(c, c) law of object centres along each axis (1 = uniform, > 1 = photographer's centre bias)
    position_concentration: float = 1.0
    #: minimal centre distance, as a fraction of the two objects' summed radii
    min_separation: float = 1.05
    #: rejection-sampling attempts per object before it is dropped from the scene
    max_placement_tries: int = 40
    #: render at this multiple of ``image_size`` and box-downsample (antialiasing)
    supersample: int = 3

    def __post_init__(self) -> None:
        for name in ("shapes", "colors", "sizes", "size_diameters"):  # a config's lists: the same (hashable) spec
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [c for c in self.colors if c not in COLOR_RGB]
        if unknown:
            raise ValueError(f"colours without an RGB entry: {unknown}")
        bad_shapes = [s for s in self.shapes if s not in SUPPORTED_SHAPES]
        if bad_shapes:
            raise ValueError(f"unsupported shapes: {bad_shapes}")
        if len(self.size_diameters) != len(self.sizes):
            raise ValueError("size_diameters must have one entry per size")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        if self.conditional_skew < 0:
            raise ValueError(f"conditional_skew = {self.conditional_skew}: expected >= 0")
        if not 0 <= self.question_caption_prob <= 1:
            raise ValueError(f"question_caption_prob = {self.question_caption_prob}: expected a probability")

    def diameter(self, size: str) -> float:
        """Relative diameter of a size name."""
        return self.size_diameters[self.sizes.index(size)]


# ----------------------------------------------------------------------------------------- regions


def horizontal_region(obj: SceneObject) -> str:
    """'left' or 'right' half of the image (centre decides)."""
    return "left" if obj.x < 0.5 else "right"


def vertical_region(obj: SceneObject) -> str:
    """'top' or 'bottom' half of the image (y grows downwards)."""
    return "top" if obj.y < 0.5 else "bottom"


def quadrant_of(obj: SceneObject) -> str:
    """Quadrant name such as 'top left'; also the answer of position questions."""
    return f"{vertical_region(obj)} {horizontal_region(obj)}"


#: Names of the 3x3 grid cells, row-major; answers of position questions ("Where is the red circle?").
GRID_CELLS: tuple[str, ...] = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)  # fmt: skip


def grid_cell(obj: SceneObject) -> str:
    """3x3 grid cell of the centre: finer than quadrants, so position questions have 9 answers."""
    col = int(obj.x >= 1 / 3) + int(obj.x >= 2 / 3)
    row = int(obj.y >= 1 / 3) + int(obj.y >= 2 / 3)
    return GRID_CELLS[3 * row + col]


def region_of(obj: SceneObject) -> frozenset[str]:
    """All region names that contain the object: its half on each axis and its quadrant."""
    return frozenset({horizontal_region(obj), vertical_region(obj), quadrant_of(obj)})


# ---------------------------------------------------------------------------------------- sampling


def zipf_weights(n: int, exponent: float) -> np.ndarray:
    """Normalised weights proportional to 1/(rank+1)**exponent."""
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return w / w.sum()


def conditional_weights(n: int, shape_index: int, exponent: float) -> np.ndarray:
    """Zipf weights over n values in an order that starts at value ``shape_index mod n``: each shape favours its
    own colour (and size), and the favourites differ between shapes."""
    return np.roll(zipf_weights(n, exponent), shape_index % n)


def _fits(x: float, y: float, r: float, placed: list[tuple[float, float, float]], sep: float) -> bool:
    return all(math.hypot(x - px, y - py) >= sep * (r + pr) for px, py, pr in placed)


def sample_scene(rng: np.random.Generator, spec: SceneSpec) -> Scene:
    """Draw attributes, then place objects by bounded rejection sampling.

    An object that finds no free spot after ``max_placement_tries`` is dropped; if that leaves fewer
    than ``min_objects`` the whole scene is redrawn (also bounded; two objects always fit).
    """
    color_p = zipf_weights(len(spec.colors), spec.attribute_skew)
    shape_p = zipf_weights(len(spec.shapes), spec.attribute_skew)
    for _ in range(spec.max_placement_tries):
        n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
        shapes = rng.choice(len(spec.shapes), size=n, p=shape_p)
        if spec.conditional_skew > 0:
            colors = np.array(
                [
                    rng.choice(len(spec.colors), p=conditional_weights(len(spec.colors), int(s), spec.conditional_skew))
                    for s in shapes
                ]
            )
            sizes = np.array(
                [
                    rng.choice(len(spec.sizes), p=conditional_weights(len(spec.sizes), int(s), spec.conditional_skew))
                    for s in shapes
                ]
            )
        else:
            colors = rng.choice(len(spec.colors), size=n, p=color_p)
            sizes = rng.integers(0, len(spec.sizes), size=n)
        objects: list[SceneObject] = []
        placed: list[tuple[float, float, float]] = []
        for sh, co, sz in zip(shapes, colors, sizes, strict=True):
            r = spec.size_diameters[sz] / 2
            for _ in range(spec.max_placement_tries):
                x, y = r + (1 - 2 * r) * rng.beta(spec.position_concentration, spec.position_concentration, size=2)
                if _fits(x, y, r, placed, spec.min_separation):
                    placed.append((x, y, r))
                    objects.append(SceneObject(spec.shapes[sh], spec.colors[co], spec.sizes[sz], float(x), float(y)))
                    break
        if len(objects) >= spec.min_objects:
            return Scene(tuple(objects))
    raise RuntimeError("could not place min_objects objects; size_diameters too large for the image")


# --------------------------------------------------------------------------------------- rendering


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.45 * r
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _cross(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    w = 0.34 * r
    return [
        (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
        (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
        (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
    ]  # fmt: skip


def _triangle(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    # equilateral, pointing up; shifted down a little so its bounding box is centred
    return [
        (cx + r * math.cos(a), cy + 0.25 * r + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
    ]


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.82 * r  # similar visual area to the circle of the same size class
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon(_triangle(cx, cy, 1.1 * r), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)], fill=fill)
    elif shape == "cross":
        draw.polygon(_cross(cx, cy, r), fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, 1.1 * r), fill=fill)
    else:  # guarded by SceneSpec.__post_init__
        raise ValueError(f"unknown shape {shape!r}")


def _jittered_rgb(color: str, rng: np.random.Generator, jitter: float) -> tuple[int, int, int]:
    rgb = np.asarray(COLOR_RGB[color], dtype=np.float64) + rng.normal(0.0, jitter * 255.0, size=3)
    r, g, b = (int(v) for v in np.clip(np.rint(rgb), 0, 255))
    return r, g, b


def render_scene(scene: Scene, spec: SceneSpec, rng: np.random.Generator) -> np.ndarray:
    """Rasterise to uint8 [S, S, 3]: draw at ``supersample``x, box-downsample, add pixel noise."""
    big = spec.image_size * spec.supersample
    bg = tuple(int(v) for v in rng.integers(0, int(spec.background_max * 255) + 1, size=3))
    canvas = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        r = spec.diameter(obj.size) / 2 * big
        _draw_object(draw, obj.shape, obj.x * big, obj.y * big, r, _jittered_rgb(obj.color, rng, spec.colour_jitter))
    small = canvas.resize((spec.image_size, spec.image_size), Image.Resampling.BOX)
    img = np.asarray(small, dtype=np.float32)
    if spec.background_noise > 0:
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(spec.background_noise * 255.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------- captions


def describe_object(obj: SceneObject) -> str:
    """Noun phrase used in captions' object lists, e.g. 'a small red circle'."""
    return f"a {obj.size} {obj.color} {obj.shape}"


def caption_scene(
    scene: Scene,
    rng: np.random.Generator,
    spec: SceneSpec,
    max_statements: int = 4,
    object_list_prob: float = 0.5,
) -> str:
    """A CLIP pre-training caption: 1..``max_statements`` true statements worded exactly like the
    task prompts (so a captions-trained CLIP can zero-shot score prompts), sometimes followed by a
    list of the objects.  Deterministic given ``rng``; ``spec`` is the spec the scene was drawn from.
    """
    from metadiff.data.synthvqa.questions import true_statements  # questions builds on this module

    n = int(rng.integers(1, max_statements + 1))
    parts = true_statements(scene, rng, n, question_prob=spec.question_caption_prob)
    if rng.random() < object_list_prob:
        order = rng.permutation(len(scene.objects))
        parts.append(", ".join(describe_object(scene.objects[i]) for i in order))
    return ". ".join(parts)
