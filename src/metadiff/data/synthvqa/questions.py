"""Question families over procedural scenes, their exact answers and declarative prompts.

A concrete question is a *query* applied to the objects selected by a *filter*.  Filters combine
shape, colour, size and image region (halves / quadrants), optionally a superlative ("the leftmost
circle", among >= 2 matches) or an anchor ("the object closest to the red circle").  Queries ask for
the referent's colour, shape, size, 3x3 grid position or identity ("red circle"), the set of colours
of a group ("What color are the circles?" -> "blue and red"), or a count (0 allowed).

Questions about one object presuppose a single referent: they are unanswerable (``None``) when the
referent is absent or ambiguous, as a VQA annotator would not ask them.  The family mix (``FAMILIES``)
was tuned so that the task statistics match the real benchmark (see ``build``).

Every rule exists twice: ``Question.answer`` is the readable per-scene reference and
``Question.answer_codes`` evaluates it on a whole ``SceneTable`` at once (the builder needs ~2e3
questions x 1e4 scenes); tests check that both agree.  ``true_statements`` fills the very same prompt
templates with true answers for CLIP captions, so meta-test prompts are sentences of the captions'
language.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np

from metadiff.data.synthvqa.scenes import GRID_CELLS, Scene, SceneObject, SceneSpec, grid_cell, region_of

#: Regions a filter may name: image halves, then quadrants.
REGIONS: tuple[str, ...] = (
    "left",
    "right",
    "top",
    "bottom",
    "top left",
    "top right",
    "bottom left",
    "bottom right",
)
#: Superlatives pick one object among >= 2 matches ("the leftmost circle").
EXTREMES: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottommost")
QUERIES: tuple[str, ...] = ("color", "colors", "shape", "size", "position", "identity", "count")
#: Order in which filter slots are written in a noun phrase ("the leftmost small red circle on the left").
OWN_SLOTS: tuple[str, ...] = ("extreme", "size", "color", "shape", "region")
#: Pattern slot names: a filter's own slots, then those of its anchor ("the object closest to the <anchor>").
SLOTS: tuple[str, ...] = OWN_SLOTS + ("near_size", "near_color", "near_shape")


def plural(noun: str) -> str:
    """English plural of the few head nouns used here (cross -> crosses)."""
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def region_phrase(region: str) -> str:
    """Prepositional phrase for a region: 'on the left', 'at the top', 'in the top left'."""
    if region in ("left", "right"):
        return f"on the {region}"
    if region in ("top", "bottom"):
        return f"at the {region}"
    return f"in the {region}"


# ------------------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class SceneTable:
    """Scenes as padded integer/float arrays [n_scenes, max_objects]; code -1 marks padding."""

    spec: SceneSpec
    shape: np.ndarray
    color: np.ndarray
    size: np.ndarray
    x: np.ndarray
    y: np.ndarray

    @classmethod
    def from_scenes(cls, scenes: Sequence[Scene], spec: SceneSpec) -> SceneTable:
        n, k = len(scenes), max([spec.max_objects, *(len(s.objects) for s in scenes)])
        codes = {name: np.full((n, k), -1, dtype=np.int16) for name in ("shape", "color", "size")}
        xy = {name: np.full((n, k), np.nan, dtype=np.float64) for name in ("x", "y")}
        index = {"shape": spec.shapes, "color": spec.colors, "size": spec.sizes}
        lookup = {name: {v: i for i, v in enumerate(vals)} for name, vals in index.items()}
        for i, scene in enumerate(scenes):
            for j, obj in enumerate(scene.objects):
                for name in codes:
                    codes[name][i, j] = lookup[name][getattr(obj, name)]
                xy["x"][i, j], xy["y"][i, j] = obj.x, obj.y
        return cls(spec=spec, **codes, **xy)

    @property
    def valid(self) -> np.ndarray:
        return self.shape >= 0

    @staticmethod
    def grid_index(coord: np.ndarray) -> np.ndarray:
        """0/1/2 third of a coordinate (same comparisons as scenes.grid_cell)."""
        return (coord >= 1 / 3).astype(np.int64) + (coord >= 2 / 3)

    def in_region(self, region: str) -> np.ndarray:
        """Boolean [n, k]: object centre lies in the region (same comparisons as scenes.region_of)."""
        masks = {"left": self.x < 0.5, "right": self.x >= 0.5, "top": self.y < 0.5, "bottom": self.y >= 0.5}
        return np.logical_and.reduce([masks[part] for part in region.split()])


# ----------------------------------------------------------------------------------------- filters


@dataclass(frozen=True)
class Filter:
    """Selects objects by any subset of attributes (``None`` = any); the referent of 'the <noun>' is
    the unique match, or with ``extreme`` the extreme one of >= 2 matches, or with ``near`` the match
    closest to the referent of that anchor filter ("the object closest to the red circle")."""

    extreme: str | None = None
    size: str | None = None
    color: str | None = None
    shape: str | None = None
    region: str | None = None
    near: Filter | None = None

    @property
    def slots(self) -> tuple[str, ...]:
        """Set slots, anchor slots prefixed with 'near_' (the names used in family patterns)."""
        own = tuple(s for s in OWN_SLOTS if getattr(self, s) is not None)
        return own + (tuple(f"near_{s}" for s in self.near.slots) if self.near else ())

    def matches(self, obj: SceneObject) -> bool:
        """Attribute/region match (ignores ``extreme`` and ``near``)."""
        return (
            (self.size is None or obj.size == self.size)
            and (self.color is None or obj.color == self.color)
            and (self.shape is None or obj.shape == self.shape)
            and (self.region is None or self.region in region_of(obj))
        )

    def referent(self, scene: Scene) -> SceneObject | None:
        """The object 'the <noun>' refers to, or None if there is no single such object."""
        if self.near is not None:
            anchor = self.near.referent(scene)
            hits = [o for o in scene.objects if o is not anchor and self.matches(o)]
            if anchor is None or not hits:
                return None
            return min(hits, key=lambda o: (o.x - anchor.x) ** 2 + (o.y - anchor.y) ** 2)
        hits = [o for o in scene.objects if self.matches(o)]
        if self.extreme is None:
            return hits[0] if len(hits) == 1 else None
        if len(hits) < 2:
            return None
        pick = min if self.extreme in ("leftmost", "topmost") else max
        return pick(hits, key=lambda o: o.x if self.extreme in ("leftmost", "rightmost") else o.y)

    def mask(self, table: SceneTable) -> np.ndarray:
        """Vectorised ``matches``: bool [n_scenes, max_objects]."""
        m = table.valid.copy()
        spec = table.spec
        for attr, values in (("size", spec.sizes), ("color", spec.colors), ("shape", spec.shapes)):
            value = getattr(self, attr)
            if value is not None:
                m &= getattr(table, attr) == values.index(value)
        if self.region is not None:
            m &= table.in_region(self.region)
        return m

    def referent_index(self, table: SceneTable) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised ``referent``: (object column per scene, whether the referent exists)."""
        m = self.mask(table)
        if self.near is not None:
            a_col, a_ok = self.near.referent_index(table)
            rows = np.arange(len(a_col))
            m &= np.arange(m.shape[1]) != a_col[:, None]
            dist = (table.x - table.x[rows, a_col][:, None]) ** 2 + (table.y - table.y[rows, a_col][:, None]) ** 2
            return np.where(m, dist, np.inf).argmin(axis=1), a_ok & m.any(axis=1)
        count = m.sum(axis=1)
        if self.extreme is None:
            return m.argmax(axis=1), count == 1
        key = table.x if self.extreme in ("leftmost", "rightmost") else table.y
        if self.extreme in ("leftmost", "topmost"):
            return np.where(m, key, np.inf).argmin(axis=1), count >= 2
        return np.where(m, key, -np.inf).argmax(axis=1), count >= 2

    def noun(self, plural_form: bool = False) -> str:
        """'leftmost small red circle on the left' / 'objects' (no article; plural drops the region)."""
        head = self.shape or "object"
        words = [w for w in (self.extreme, self.size, self.color) if w] + [plural(head) if plural_form else head]
        phrase = " ".join(words)
        if self.near is not None:
            phrase += f" closest to the {self.near.noun()}"
        return phrase if self.region is None or plural_form else f"{phrase} {region_phrase(self.region)}"


def color_list(colors: Sequence[str]) -> str:
    """Answer of plural colour questions: distinct colours, alphabetical: 'blue, red and white'."""
    names = sorted(set(colors))
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# --------------------------------------------------------------------------------------- questions

_LEADS = {"color": "What color is", "shape": "What shape is", "size": "What size is",
          "position": "Where is", "identity": "What is"}  # fmt: skip
_LINKS = {"color": "", "shape": "a ", "size": "", "position": "in the ", "identity": "the "}


@dataclass(frozen=True)
class Question:
    """A concrete question: ``query`` asked about the objects selected by ``filter``.

    Queries: colour/shape/size/position/identity of the referent; ``colors`` = the set of colours of
    >= 2 matching objects ("What color are the circles?"); ``count`` = number of matches (0 allowed).
    """

    family: str
    query: str
    filter: Filter

    @property
    def text(self) -> str:
        f = self.filter
        if self.query in ("count", "colors"):
            where = region_phrase(f.region) if f.region else "there"
            if self.query == "count":
                return f"How many {f.noun(plural_form=True)} are {where}?"
            return f"What color are the {f.noun(plural_form=True)}{' ' + where if f.region else ''}?"
        return f"{_LEADS[self.query]} the {f.noun()}?"

    @property
    def prompt(self) -> str:
        """Declarative template with exactly one '{}' for the answer."""
        f = self.filter
        tail = f" {region_phrase(f.region)}" if f.region else ""
        if self.query == "count":
            return f"there are {{}} {f.noun(plural_form=True)}{tail}"
        if self.query == "colors":
            return f"the {f.noun(plural_form=True)}{tail} are {{}}"
        return f"the {f.noun()} is {_LINKS[self.query]}{{}}"

    def answer(self, scene: Scene) -> str | None:
        """Reference answer for one scene, or None when the question's presupposition fails."""
        if self.query in ("count", "colors"):
            hits = [o for o in scene.objects if self.filter.matches(o)]
            if self.query == "count":
                return str(len(hits))
            return color_list([o.color for o in hits]) if len(hits) >= 2 else None
        obj = self.filter.referent(scene)
        if obj is None:
            return None
        if self.query == "position":
            return grid_cell(obj)
        if self.query == "identity":
            return f"{obj.color} {obj.shape}"
        return getattr(obj, self.query)

    def answer_space(self, spec: SceneSpec) -> tuple[str, ...]:
        """All answers ``answer_codes`` can index into."""
        if self.query == "count":
            return tuple(str(n) for n in range(spec.max_objects + 1))
        if self.query == "colors":  # code = bitmask of present colours - 1
            n = len(spec.colors)
            return tuple(color_list([spec.colors[i] for i in range(n) if b >> i & 1]) for b in range(1, 2**n))
        if self.query == "position":
            return GRID_CELLS
        if self.query == "identity":
            return tuple(f"{c} {s}" for c in spec.colors for s in spec.shapes)
        return {"color": spec.colors, "shape": spec.shapes, "size": spec.sizes}[self.query]

    def answer_codes(self, table: SceneTable) -> np.ndarray:
        """Vectorised ``answer``: int index into ``answer_space`` per scene, -1 if unanswerable."""
        if self.query in ("count", "colors"):
            m = self.filter.mask(table)
            if self.query == "count":
                return m.sum(axis=1).astype(np.int64)
            bits = np.where(m, np.left_shift(1, np.maximum(table.color, 0).astype(np.int64)), 0)
            present = np.bitwise_or.reduce(bits, axis=1)
            return np.where(m.sum(axis=1) >= 2, present - 1, -1).astype(np.int64)
        cols, ok = self.filter.referent_index(table)
        rows = np.arange(len(cols))
        if self.query == "position":
            values = 3 * table.grid_index(table.y[rows, cols]) + table.grid_index(table.x[rows, cols])
        elif self.query == "identity":
            values = table.color[rows, cols].astype(np.int64) * len(table.spec.shapes) + table.shape[rows, cols]
        else:
            values = getattr(table, self.query)[rows, cols]
        return np.where(ok, values, -1).astype(np.int64)


def filter_from_slots(values: dict[str, str]) -> Filter:
    """Build a filter from pattern slot values; 'near_*' slots form the anchor filter."""
    own: dict[str, Any] = {k: v for k, v in values.items() if not k.startswith("near_")}  # no key "near"
    anchor: dict[str, Any] = {k.removeprefix("near_"): v for k, v in values.items() if k.startswith("near_")}
    return Filter(**own, near=Filter(**anchor) if anchor else None)


@dataclass(frozen=True)
class QuestionTemplate:
    """A question family: one query and the filter slot patterns it is asked with."""

    name: str
    query: str
    patterns: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if self.query not in QUERIES:
            raise ValueError(f"{self.name}: unknown query {self.query!r}")
        near = {"near_size", "near_color", "near_shape"}
        forbidden = {"color": {"color"}, "colors": {"color", "extreme"} | near, "shape": {"shape"},
                     "size": {"size"}, "position": {"region"}, "identity": {"color", "shape"},
                     "count": {"extreme"} | near}[self.query]  # fmt: skip
        for pattern in self.patterns:
            bad = forbidden & set(pattern) or not set(pattern) <= set(SLOTS)
            if bad or ("extreme" in pattern and near & set(pattern)):
                raise ValueError(f"{self.name}: pattern {pattern} invalid for query {self.query!r}")
            if not pattern and self.query not in ("count", "colors"):
                raise ValueError(f"{self.name}: a query about one object needs a non-empty filter")

    def instances(self, spec: SceneSpec) -> list[Question]:
        """All concrete questions, patterns in order, slot values in spec order."""
        domain = {"extreme": EXTREMES, "size": spec.sizes, "color": spec.colors, "shape": spec.shapes,
                  "region": REGIONS}  # fmt: skip
        domain |= {f"near_{k}": domain[k] for k in ("size", "color", "shape")}
        out = []
        for pattern in self.patterns:
            ordered = [s for s in SLOTS if s in pattern]
            for values in product(*(domain[s] for s in ordered)):
                out.append(Question(self.name, self.query, filter_from_slots(dict(zip(ordered, values, strict=True)))))
        return out


#: The families, in enumeration order.  Their pattern lists set the family mix of the benchmark.
FAMILIES: tuple[QuestionTemplate, ...] = (
    QuestionTemplate("color_of_shape", "color",
                     (("shape",), ("size", "shape"), ("shape", "region"), ("size", "shape", "region"),
                      ("extreme", "shape"), ("extreme", "size", "shape"), ("extreme", "shape", "region"))),
    QuestionTemplate("color_of_object", "color",
                     (("size",), ("region",), ("size", "region"), ("extreme",), ("extreme", "size"),
                      ("extreme", "region"), ("extreme", "size", "region"))),
    QuestionTemplate("colors_of_group", "colors",
                     (("shape",), ("size",), ("region",), ("size", "shape"), ("shape", "region"),
                      ("size", "region"))),
    QuestionTemplate("shape_of_color", "shape",
                     (("color",), ("size", "color"), ("color", "region"), ("extreme", "color"),
                      ("extreme", "size", "color"))),
    QuestionTemplate("shape_of_object", "shape",
                     (("size",), ("region",), ("size", "region"), ("extreme",), ("extreme", "size"))),
    QuestionTemplate("size", "size", (("color", "shape"), ("shape", "region"))),
    QuestionTemplate("position", "position",
                     (("shape",), ("color",), ("color", "shape"), ("size", "shape"), ("size", "color"),
                      ("size", "color", "shape"), ("extreme",), ("extreme", "size"), ("extreme", "shape"),
                      ("extreme", "color"))),
    QuestionTemplate("identity", "identity",
                     (("size",), ("region",), ("size", "region"), ("extreme",), ("extreme", "size"),
                      ("extreme", "region"), ("extreme", "size", "region"))),
    QuestionTemplate("color_near", "color",
                     (("near_shape",), ("near_color",), ("near_color", "near_shape"), ("near_size", "near_shape"),
                      ("near_size", "near_color"), ("near_size", "near_color", "near_shape"))),
    QuestionTemplate("shape_near", "shape",
                     (("near_shape",), ("near_color",), ("near_color", "near_shape"), ("near_size", "near_shape"),
                      ("near_size", "near_color"))),
    QuestionTemplate("identity_near", "identity",
                     (("near_shape",), ("near_color",), ("near_color", "near_shape"), ("near_size", "near_shape"),
                      ("near_size", "near_color"), ("near_size", "near_color", "near_shape"))),
    QuestionTemplate("count", "count", ((), ("shape",), ("color",), ("size",), ("region",), ("size", "region"))),
)  # fmt: skip


def enumerate_questions(spec: SceneSpec, families: Sequence[QuestionTemplate] = FAMILIES) -> list[Question]:
    """Every concrete question, in a deterministic order; question strings are unique."""
    questions = [q for fam in families for q in fam.instances(spec)]
    texts = [q.text for q in questions]
    if len(set(texts)) != len(texts):
        raise ValueError("two concrete questions share the same text")
    return questions


# ---------------------------------------------------------------------------------------- captions


def _random_question(obj: SceneObject, rng: np.random.Generator, families: Sequence[QuestionTemplate]) -> Question:
    """A question whose filter describes ``obj`` (so it is usually answerable for its scene)."""
    fam = families[int(rng.integers(len(families)))]
    pattern = fam.patterns[int(rng.integers(len(fam.patterns)))]
    regions = sorted(region_of(obj))
    values = {"size": obj.size, "color": obj.color, "shape": obj.shape,
              "region": regions[int(rng.integers(len(regions)))],
              "extreme": EXTREMES[int(rng.integers(len(EXTREMES)))]}  # fmt: skip
    values |= {f"near_{k}": values[k] for k in ("size", "color", "shape")}  # obj is also the anchor
    return Question(fam.name, fam.query, filter_from_slots({s: values[s] for s in pattern}))


def true_statements(
    scene: Scene,
    rng: np.random.Generator,
    n: int,
    families: Sequence[QuestionTemplate] = FAMILIES,
    max_tries_per_statement: int = 10,
    question_prob: float = 0.0,
) -> list[str]:
    """Up to ``n`` distinct true prompt sentences about ``scene`` (fewer only if retries run out); with probability
    ``question_prob`` a statement is the question followed by its answer ("What color is the circle? red")."""
    out: list[str] = []
    for _ in range(n * max_tries_per_statement):
        if len(out) == n:
            break
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        q = _random_question(obj, rng, families)
        ans = q.answer(scene)
        if ans is None:
            continue
        # no rng draw when question_prob = 0: captions of the earlier configurations stay exactly as they were
        s = f"{q.text} {ans}" if question_prob > 0 and rng.random() < question_prob else q.prompt.format(ans)
        if s not in out:
            out.append(s)
    return out
