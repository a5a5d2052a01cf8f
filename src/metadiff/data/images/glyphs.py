"""`glyphs`: an embedded, offline, Omniglot-style many-class image set rendered from KanjiVG stroke data.

KanjiVG (the PyPI package `kanjivg`, © Ulrich Apel, CC BY-SA 3.0, https://kanjivg.tagaini.net) ships one SVG of
stroke paths per character. A class is one character; each image re-draws its strokes with a random global affine
(rotation, scale, shear, shift), a random per-stroke shift/rotation/scale and a random pen width, the way different
people's drawings of one Omniglot character differ. Everything is a function of the config (seed included), rendered
once (~20 s on one CPU core) and cached under `paths.data_dir/glyphs/` by the config's fingerprint.

Why hand-written: no package renders SVG strokes without a system library (cairo); `svg.path` parses the path
syntax and PIL draws the polylines, so only the jitter model lives here.
"""

from __future__ import annotations

import logging
import math
import random
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from svg.path import parse_path

from metadiff.config import ConfigError
from metadiff.errors import MissingInputError
from metadiff.utils.hashing import fingerprint
from metadiff.utils.io import atomic_path, build_once
from metadiff.utils.tensor_files import load_tensors, save_tensors

log = logging.getLogger(__name__)
SVG_NS = "{http://www.w3.org/2000/svg}"
KANJI_BOX = 109.0  # KanjiVG's viewBox side


@dataclass(frozen=True)
class GlyphSpec:
    """`data.source.render`: what the rendered set looks like; every value is in `conf/data/glyphs.yaml`."""

    n_classes: int
    images_per_class: int
    image_size: int
    supersample: int  # render at image_size * supersample, then box-filter down (anti-aliasing)
    min_strokes: int
    max_strokes: int
    pen_width: tuple[float, float]  # in KanjiVG units (the box is 109)
    rotation_deg: float
    scale: tuple[float, float]
    shear: float
    shift: float  # fraction of the box
    stroke_shift: float  # KanjiVG units
    stroke_rotation_deg: float
    stroke_scale: tuple[float, float]
    stroke_drop: float  # chance that a drawing leaves out a stroke (not the first)
    wobble: float  # KanjiVG units: a smooth random bend along each stroke
    points_per_stroke: int
    seed: int

    def __post_init__(self) -> None:
        for name in ("pen_width", "scale", "stroke_scale"):  # tuples, as the set's fingerprint and cached file hold
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.n_classes < 2 or self.images_per_class < 1 or self.image_size < 8:
            raise ConfigError(f"data.glyphs: need n_classes >= 2, images_per_class >= 1, image_size >= 8; got {self}")
        if not 1 <= self.min_strokes <= self.max_strokes:
            raise ConfigError(f"data.glyphs: min_strokes={self.min_strokes} must be in 1..max_strokes")


def kanjivg_dir() -> Path:
    try:
        return Path(str(metadata.distribution("kanjivg").locate_file("kanji")))
    except metadata.PackageNotFoundError:
        raise MissingInputError("data=glyphs needs the PyPI package 'kanjivg' (pip install kanjivg)") from None


def stroke_paths(svg_file: Path) -> list[str]:
    """The `d` attribute of every stroke, in stroke order."""
    root = ET.parse(svg_file).getroot()
    group = next(g for g in root.iter(f"{SVG_NS}g") if g.get("id", "").startswith("kvg:StrokePaths"))
    return [p.attrib["d"] for p in group.iter(f"{SVG_NS}path")]


def choose_characters(spec: GlyphSpec, source: Path) -> list[Path]:
    """`n_classes` CJK ideographs (no variant files) with a stroke count in range, chosen by the seed."""
    pattern = re.compile(r"^(0[4-9][0-9a-f]{3})\.svg$")  # U+4E00..U+9FFF, the unified ideographs
    files = sorted(f for f in source.iterdir() if pattern.match(f.name) and int(f.stem, 16) >= 0x4E00)
    rng = random.Random(spec.seed)
    rng.shuffle(files)
    chosen = []
    for f in files:
        if spec.min_strokes <= len(stroke_paths(f)) <= spec.max_strokes:
            chosen.append(f)
            if len(chosen) == spec.n_classes:
                return chosen
    raise ConfigError(
        f"data.glyphs: only {len(chosen)} characters in {source} have {spec.min_strokes}.."
        f"{spec.max_strokes} strokes; n_classes={spec.n_classes} asked"
    )


# svg.path measures segment lengths (which pick the segment of each point) to 1e-12 by default: 80% of the render
# time. 1e-9 renders the default 100-class set bit-identically, 2.9x faster (45.8 s -> 16.0 s, measured).
ARC_LENGTH_ERROR = 1e-9


def sample_strokes(svg_file: Path, n_points: int) -> list[np.ndarray]:
    """Each stroke as an [n_points, 2] polyline in KanjiVG units."""
    ts = np.linspace(0.0, 1.0, n_points)
    out = []
    for d in stroke_paths(svg_file):
        path = parse_path(d)
        pts = [path.point(float(t), error=ARC_LENGTH_ERROR) for t in ts]
        out.append(np.array([[p.real, p.imag] for p in pts]))
    return out


def _affine(rng: np.random.Generator, rotation_deg: float, scale: tuple[float, float], shear: float) -> np.ndarray:
    angle = math.radians(rng.uniform(-rotation_deg, rotation_deg))
    s = rng.uniform(*scale)
    sh = rng.uniform(-shear, shear)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return s * rot @ np.array([[1.0, sh], [0.0, 1.0]])


def draw(strokes: list[np.ndarray], spec: GlyphSpec, rng: np.random.Generator) -> np.ndarray:
    """One jittered drawing of a character: uint8 [S, S], strokes bright on black."""
    side = spec.image_size * spec.supersample
    centre = np.array([KANJI_BOX / 2, KANJI_BOX / 2])
    glob = _affine(rng, spec.rotation_deg, spec.scale, spec.shear)
    shift = rng.uniform(-spec.shift, spec.shift, size=2) * KANJI_BOX
    pen = rng.uniform(*spec.pen_width) * side / KANJI_BOX
    image = Image.new("L", (side, side), 0)
    pen_draw = ImageDraw.Draw(image)
    for i, stroke in enumerate(strokes):
        if i > 0 and rng.random() < spec.stroke_drop:
            continue
        local = _affine(rng, spec.stroke_rotation_deg, spec.stroke_scale, 0.0)
        mid = stroke.mean(axis=0)
        moved = (stroke - mid) @ local.T + mid + rng.uniform(-spec.stroke_shift, spec.stroke_shift, size=2)
        if spec.wobble > 0:  # a random walk along the stroke, centred: bends it without moving it
            walk = np.cumsum(rng.normal(0.0, spec.wobble / math.sqrt(len(stroke)), size=stroke.shape), axis=0)
            moved = moved + walk - walk.mean(axis=0)
        placed = ((moved - centre) @ glob.T + centre + shift) * side / KANJI_BOX
        pen_draw.line([tuple(p) for p in placed], fill=255, width=max(1, round(pen)), joint="curve")
        radius = pen / 2  # round caps, as KanjiVG's stroke-linecap
        for end in (placed[0], placed[-1]):
            pen_draw.ellipse([end[0] - radius, end[1] - radius, end[0] + radius, end[1] + radius], fill=255)
    small = image.resize((spec.image_size, spec.image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def render_glyphs(spec: GlyphSpec) -> dict:
    """The whole set: images uint8 [C * n, 1, S, S], targets, class names (character and code point)."""
    files = choose_characters(spec, kanjivg_dir())
    rng = np.random.default_rng(spec.seed)
    images = np.empty((len(files) * spec.images_per_class, 1, spec.image_size, spec.image_size), dtype=np.uint8)
    for c, f in enumerate(files):
        strokes = sample_strokes(f, spec.points_per_stroke)
        for j in range(spec.images_per_class):
            images[c * spec.images_per_class + j, 0] = draw(strokes, spec, rng)
    return {
        "images": torch.from_numpy(images),
        "targets": torch.arange(len(files)).repeat_interleave(spec.images_per_class),
        "classes": [f"{chr(int(f.stem, 16))}_U+{f.stem.upper()}" for f in files],
        "spec": asdict(spec),
    }


def load_glyphs(spec: GlyphSpec, cache_dir: Path) -> dict:
    """The rendered set, from the cache or rendered now and cached atomically."""
    key = {**asdict(spec), "kanjivg": metadata.version("kanjivg")}  # other stroke data = another set
    path = Path(cache_dir) / f"glyphs-{fingerprint(key)[:12]}.pt"
    build_once(path, path.is_file, lambda: _render_to(spec, path))
    return load_tensors(path)


def _render_to(spec: GlyphSpec, path: Path) -> None:
    log.info("rendering %d glyph classes x %d images (cached at %s)", spec.n_classes, spec.images_per_class, path)
    data = render_glyphs(spec)
    with atomic_path(path) as tmp:
        save_tensors(data, tmp)
