"""Synthetic referring data in the refer format: the embedded default that needs no download.

Each image shows 3-5 flat shapes (7 shape categories x 4 colours, 22-38% of the short image
side) on a noisy grey background, with at most slight overlap. Every image has two objects that
share a colour or a shape, so an expression has to be understood to find its object. Each
referred object gets up to three short expressions of the chosen kinds (``kinds``, default all):

- attribute: "the red circle", "the red shape", "the circle";
- position: "the leftmost shape", "the blue shape on the right", "the top square";
- relation: "the square above the blue star", "the shape left of the green cross".

The CPU demo uses attribute expressions only (like RefCOCO+, which bans location words): its
miniature CLIP learnt no position words in pretraining (checkpoints/tiny_synthetic/report.md), and
positions and relations are reported as a separate run (README).

An expression is kept only if its meaning, evaluated on the scene (``denotation``), is exactly
its object. Positions use the centroid of the visible mask; a superlative or relation needs a
margin (``_MARGIN`` of the long side) for the object it names and a clear "no" for every other
candidate, so there are no borderline cases.

The output is exactly the refer layout, so the real loaders read it:
``<out>/synthetic/refs(unc).p``, ``<out>/synthetic/instances.json`` and the PNG images in
``<out>/images/mscoco/images/train2014/`` (the refer image folder). Unoccluded objects are stored
as polygons, objects partly hidden by a later one as uncompressed RLE of their visible pixels
(COCO's two formats).

Two worlds (``WORLDS``; ``world=``):

- ``flat`` (the default, as above): objects lie apart, so one click fixes an object and its extent;
- ``ambiguous``: the flat layout plus, in a share of the scenes, a shape inside a larger shape
  (``NEST_PROB``; the larger one's ground truth is the ring left visible around the smaller) and
  two same-coloured shapes of different kinds overlapping (``TOUCH_PROB``; the one below keeps
  its visible part). A click on a larger shape's middle lands on the smaller, a click on a
  same-coloured pair fits the pair as well as either: what a click cannot say, the words ("the
  blue square", "the star") and the coarse mask's extent can. Each object's situation
  (``SITUATIONS``) is written as data, ``<out>/synthetic/situations.json`` ({ann_id: situation}),
  for per-situation reports.

Splits are per image: train / val / testA / testB (70/10/10/10). Shape
categories ``SYNTHETIC_UNSEEN`` play the role of COCO's unseen classes: the category split is
written as data, ``<out>/synthetic/category_split.json``, which the prepare step carries into the
prepared data for ``splits.category_split_of``. The output is a function of the seed and the
kinds and the world only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from prompt_ris.data.refer import CATEGORY_SPLIT_FILE, REFER_IMAGE_DIR
from prompt_ris.data.splits import SPLIT_BY_DEFAULTS

logger = logging.getLogger(__name__)

SYNTHETIC_DATASET = "synthetic"
SYNTHETIC_SPLIT_BY = SPLIT_BY_DEFAULTS[SYNTHETIC_DATASET]  # "unc"
SHAPES: dict[str, int] = {  # category name -> category id
    "circle": 1,
    "square": 2,
    "triangle": 3,
    "diamond": 4,
    "cross": 5,
    "star": 6,
    "hexagon": 7,
}
SYNTHETIC_SEEN: tuple[int, ...] = (1, 2, 3, 4, 5)  # circle, square, triangle, diamond, cross
SYNTHETIC_UNSEEN: tuple[int, ...] = (6, 7)  # star, hexagon: held out in *_seen training
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 40),
}
IMAGE_SIDES = (112, 128, 144, 160)  # image widths and heights are drawn from these
OBJECT_SIDE = (0.22, 0.38)  # object diameter as a share of the short image side
NUM_OBJECTS = (3, 5)
SPLIT_SHARES = (("train", 0.7), ("val", 0.1), ("testA", 0.1), ("testB", 0.1))
_MIN_GAP = 0.85  # centres at least this x (r1 + r2) apart: shapes overlap slightly at most
_MARGIN = 0.08  # position margin as a share of the long image side
_MAX_EXPRESSIONS = 3  # per object
WORLDS = ("flat", "ambiguous")
SITUATIONS = ("apart", "outer", "inner", "touching")  # an object's place in an ambiguous scene
SITUATIONS_FILE = "situations.json"
NEST_PROB = 0.5  # ambiguous world: share of scenes with a shape inside a larger shape
TOUCH_PROB = 0.5  # ambiguous world: share of scenes with two same-coloured shapes overlapping
NESTABLE = {"circle": 1.0, "hexagon": 0.866, "square": 0.72}  # shapes with room: inradius / r
NEST_HOST_SIDE = (0.42, 0.52)  # a shape with another inside: diameter / short image side
INNER_SIDE = (0.55, 0.75)  # an inner shape's radius as a share of its outer shape's inradius
TOUCH_GAP = (0.5, 0.7)  # a touching pair's centre distance as a share of the radii's sum
MIN_VISIBLE = 0.4  # ambiguous world: every object keeps this share of its pixels visible
EXPRESSION_KINDS = ("attribute", "position", "relation")
_DIRECTIONS = {  # superlative -> (axis, sign): the named object has the largest sign * coordinate
    "left": (0, -1),
    "right": (0, 1),
    "top": (1, -1),
    "bottom": (1, 1),
}
_SUPERLATIVES = {"left": "leftmost", "right": "rightmost"}  # "top"/"bottom" stay as they are
_RELATIONS = {  # relation -> (axis, sign): target is related when sign * (t - landmark) > margin
    "above": (1, -1),
    "below": (1, 1),
    "left of": (0, -1),
    "right of": (0, 1),
}


@dataclass
class SceneObject:
    """One rendered shape. ``centroid`` = (x, y) of its visible pixels."""

    shape: str
    colour: str
    center: tuple[float, float]
    radius: float
    polygon: list[float]  # flat x0, y0, x1, y1, ...
    mask: np.ndarray = field(repr=False)  # (H, W) bool, visible pixels
    occluded: bool = False
    centroid: tuple[float, float] = (0.0, 0.0)
    situation: str = "apart"  # one of SITUATIONS


@dataclass(frozen=True)
class Expression:
    """A referring expression as structure; ``text`` renders it.

    kind "attribute": ``colour``/``shape`` (either may be None, not both);
    kind "position": the ``direction``-most object among those matching colour/shape;
    kind "relation": objects matching colour/shape in ``relation`` to the landmark, which is
    described by ``landmark_colour``/``landmark_shape`` and must be unique.
    """

    kind: str
    colour: str | None = None
    shape: str | None = None
    direction: str | None = None
    form: int = 0  # 0: "the leftmost shape", 1: "the shape on the left"
    relation: str | None = None
    landmark_colour: str | None = None
    landmark_shape: str | None = None

    @property
    def text(self) -> str:
        noun = " ".join(w for w in (self.colour, self.shape or "shape") if w)
        if self.kind == "attribute":
            return f"the {noun}"
        if self.kind == "position":
            assert self.direction is not None
            if self.form == 0:
                word = _SUPERLATIVES.get(self.direction, self.direction)
                return f"the {word} {noun}"
            where = "on the" if self.direction in ("left", "right") else "at the"
            return f"the {noun} {where} {self.direction}"
        landmark = " ".join(w for w in (self.landmark_colour, self.landmark_shape or "shape") if w)
        return f"the {noun} {self.relation} the {landmark}"


EXPRESSION_FORMS = ("colour + shape", "colour", "shape", "position", "relation")


def expression_form(text: str) -> str:
    """Which of ``EXPRESSION_FORMS`` a generated expression has, from its words alone.

    An attribute expression names a colour and a shape ("the red circle"), only a colour ("the
    red shape") or only a shape ("the circle"); the other kinds are told by their words.
    """
    if any(f" {relation} the " in text for relation in _RELATIONS):
        return "relation"
    words = text.split()
    if any(w in words for w in (*_DIRECTIONS, *_SUPERLATIVES.values())):
        return "position"
    colour, shape = any(w in COLOURS for w in words), any(w in SHAPES for w in words)
    if colour and shape:
        return "colour + shape"
    if colour or shape:
        return "colour" if colour else "shape"
    raise ValueError(f"not an expression of the synthetic grammar: {text!r}")


def _matches(obj: SceneObject, colour: str | None, shape: str | None) -> bool:
    return (colour is None or obj.colour == colour) and (shape is None or obj.shape == shape)


def denotation(expr: Expression, objects: list[SceneObject], long_side: int) -> list[int]:
    """Indices of the objects an expression picks out in a scene (empty if it is unclear).

    Superlatives and relations are clear only when the named object passes by the margin and
    every other candidate fails outright (see the module docstring).
    """
    margin = _MARGIN * long_side
    cands = [i for i, o in enumerate(objects) if _matches(o, expr.colour, expr.shape)]
    if expr.kind == "attribute":
        return cands
    if expr.kind == "position":
        axis, sign = _DIRECTIONS[expr.direction or ""]
        if len(cands) < 2:
            return []  # "the leftmost circle" with one circle says nothing about position
        ranked = sorted(cands, key=lambda i: -sign * objects[i].centroid[axis])
        best, second = ranked[0], ranked[1]
        gap = sign * (objects[best].centroid[axis] - objects[second].centroid[axis])
        return [best] if gap > margin else []
    landmarks = [
        i for i, o in enumerate(objects) if _matches(o, expr.landmark_colour, expr.landmark_shape)
    ]
    if len(landmarks) != 1 or len(cands) < 2:
        return []
    axis, sign = _RELATIONS[expr.relation or ""]
    anchor = objects[landmarks[0]].centroid[axis]
    diffs = {i: sign * (objects[i].centroid[axis] - anchor) for i in cands if i != landmarks[0]}
    strong = [i for i, d in diffs.items() if d > margin]
    weak = [i for i, d in diffs.items() if d > 0]
    return strong if len(strong) == 1 and len(weak) == 1 else []


def _noun_phrases(obj: SceneObject) -> list[tuple[str | None, str | None]]:
    return [(obj.colour, obj.shape), (obj.colour, None), (None, obj.shape), (None, None)]


def describe(
    objects: list[SceneObject], long_side: int, kinds: Sequence[str] = EXPRESSION_KINDS
) -> list[list[Expression]]:
    """Every unambiguous expression of the given kinds for each object, grouped by kind order."""
    out: list[list[Expression]] = []
    for idx, obj in enumerate(objects):
        candidates: list[Expression] = []
        for colour, shape in _noun_phrases(obj):
            if (colour or shape) and "attribute" in kinds:
                candidates.append(Expression("attribute", colour=colour, shape=shape))
            for direction in _DIRECTIONS if "position" in kinds else ():
                for form in (0, 1):
                    candidates.append(
                        Expression("position", colour, shape, direction=direction, form=form)
                    )
            for relation in _RELATIONS if "relation" in kinds else ():
                for j, other in enumerate(objects):
                    if j == idx:
                        continue
                    for lm_colour, lm_shape in _noun_phrases(other):
                        if lm_colour or lm_shape:
                            candidates.append(
                                Expression(
                                    "relation",
                                    colour,
                                    shape,
                                    relation=relation,
                                    landmark_colour=lm_colour,
                                    landmark_shape=lm_shape,
                                )
                            )
        valid = {e.text: e for e in candidates if denotation(e, objects, long_side) == [idx]}
        out.append(list(valid.values()))
    return out


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[float]:
    """Flat polygon of a shape centred at (cx, cy) that fits in a circle of radius r."""

    def ring(n: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
        angles = [math.radians(start_deg + 360.0 * k / n) for k in range(n)]
        return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]

    if shape == "circle":
        pts = ring(32, r, 0.0)
    elif shape == "square":
        s = r * 0.72
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        pts = ring(3, r, -90.0)
    elif shape == "diamond":
        pts = [(0.0, -r), (0.7 * r, 0.0), (0.0, r), (-0.7 * r, 0.0)]
    elif shape == "cross":
        a, b = 0.33 * r, 0.9 * r
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a)]
        pts += [(a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    elif shape == "star":
        outer, inner = ring(5, r, -90.0), ring(5, 0.45 * r, -54.0)
        pts = [p for pair in zip(outer, inner) for p in pair]
    elif shape == "hexagon":
        pts = ring(6, r, 0.0)
    else:
        raise ValueError(f"unknown shape '{shape}'; use one of {sorted(SHAPES)}")
    return [v for x, y in pts for v in (cx + x, cy + y)]


def place_discs(
    rng: random.Random,
    width: int,
    height: int,
    count: int,
    side: tuple[float, float] = OBJECT_SIDE,
) -> list[tuple[float, float, float]] | None:
    """Centres and radii of ``count`` discs that overlap slightly at most (None if none fit).

    Args:
        rng: the random source.
        width: image width.
        height: image height.
        count: number of discs.
        side: range of the disc diameter as a share of the short image side.
    """
    short = min(width, height)
    placed: list[tuple[float, float, float]] = []
    for _ in range(count):
        for _attempt in range(200):
            r = rng.uniform(*side) * short / 2
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            if all(math.hypot(cx - x, cy - y) >= _MIN_GAP * (r + q) for x, y, q in placed):
                placed.append((cx, cy, r))
                break
        else:
            return None
    return placed


def _attributes(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """(shape, colour) per object; two objects always share a colour or a shape."""
    attrs = [(rng.choice(list(SHAPES)), rng.choice(list(COLOURS))) for _ in range(count)]
    shapes, colours = [a[0] for a in attrs], [a[1] for a in attrs]
    if len(set(shapes)) == count and len(set(colours)) == count:
        i, j = rng.sample(range(count), 2)
        if rng.random() < 0.5:
            attrs[j] = (attrs[i][0], attrs[j][1])
        else:
            attrs[j] = (attrs[j][0], attrs[i][1])
    return attrs


@dataclass(frozen=True)
class Placement:
    """One object of a layout before drawing: what it is, where, how big, and its situation."""

    shape: str
    colour: str
    cx: float
    cy: float
    r: float
    situation: str = "apart"


def _clear_of_others(layout: list[Placement], skip: int, cx: float, cy: float, r: float) -> bool:
    """Whether a disc (cx, cy, r) keeps the usual distance (``_MIN_GAP``) from every object of
    the layout but ``skip``."""
    return all(
        math.hypot(cx - o.cx, cy - o.cy) >= _MIN_GAP * (r + o.r)
        for k, o in enumerate(layout)
        if k != skip
    )


def _touching_partner(
    rng: random.Random,
    layout: list[Placement],
    width: int,
    height: int,
    side: tuple[float, float],
) -> list[Placement]:
    """The layout with a shape of another kind overlapping one of its shapes, in its colour.

    The partner is no larger than the shape it overlaps and is drawn on top of it; it keeps the
    usual distance from every other shape. Unchanged when no place is found.
    """
    i = rng.randrange(len(layout))
    base = layout[i]
    short = min(width, height)
    for _attempt in range(200):
        r = min(rng.uniform(*side) * short / 2, base.r)
        distance = rng.uniform(*TOUCH_GAP) * (base.r + r)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        cx, cy = base.cx + distance * math.cos(angle), base.cy + distance * math.sin(angle)
        inside = r <= cx <= width - r and r <= cy <= height - r
        if inside and _clear_of_others(layout, i, cx, cy, r):
            shape = rng.choice([s for s in SHAPES if s != base.shape])
            out = list(layout)
            out[i] = dataclasses.replace(base, situation="touching")
            return [*out, Placement(shape, base.colour, cx, cy, r, "touching")]
    return layout


def _nested_inner(
    rng: random.Random,
    layout: list[Placement],
    width: int,
    height: int,
    side: tuple[float, float],
) -> list[Placement]:
    """The layout with a smaller shape of another colour inside a large shape.

    A free shape whose kind leaves room inside (``NESTABLE``) becomes large (``NEST_HOST_SIDE``,
    moved where it fits, keeping the usual distance from the others), and the inner shape is no
    smaller than the smallest object of the flat world (``side[0]``), so both stay as visible to
    the miniature foundations' patch grids as any other object. Unchanged when none fits.
    """
    short = min(width, height)
    hosts = [j for j, o in enumerate(layout) if o.situation == "apart" and o.shape in NESTABLE]
    if not hosts:
        return layout
    j = rng.choice(hosts)
    outer = layout[j]
    for _attempt in range(200):
        big = rng.uniform(*NEST_HOST_SIDE) * short / 2
        ox, oy = rng.uniform(big, width - big), rng.uniform(big, height - big)
        if _clear_of_others(layout, j, ox, oy, big):
            break
    else:
        return layout
    inradius = NESTABLE[outer.shape] * big
    r = max(rng.uniform(*INNER_SIDE) * inradius, side[0] * short / 2)
    if r > INNER_SIDE[1] * inradius:
        return layout
    shift, angle = rng.uniform(0.0, 0.5) * (inradius - r), rng.uniform(0.0, 2.0 * math.pi)
    cx, cy = ox + shift * math.cos(angle), oy + shift * math.sin(angle)
    colour = rng.choice([c for c in COLOURS if c != outer.colour])
    out = list(layout)
    out[j] = dataclasses.replace(outer, cx=ox, cy=oy, r=big, situation="outer")
    return [*out, Placement(rng.choice(list(SHAPES)), colour, cx, cy, r, "inner")]


def add_ambiguity(
    rng: random.Random,
    layout: list[Placement],
    width: int,
    height: int,
    side: tuple[float, float] = OBJECT_SIDE,
) -> list[Placement]:
    """The ambiguous world's additions to a flat layout (drawn after it, on top of it).

    With ``TOUCH_PROB`` a same-coloured shape of another kind overlaps one shape (both become
    "touching"); with ``NEST_PROB`` a smaller shape of another colour goes inside the largest
    free shape with room inside ("inner" and "outer").
    """
    if rng.random() < TOUCH_PROB:
        layout = _touching_partner(rng, layout, width, height, side)
    if rng.random() < NEST_PROB:
        layout = _nested_inner(rng, layout, width, height, side)
    return layout


def layout_masks(
    layout: Sequence[Placement], width: int, height: int
) -> tuple[list[list[float]], list[np.ndarray], list[np.ndarray]]:
    """Each object's polygon, its whole (H, W) bool mask and its visible one (the objects after
    it are drawn on top)."""
    polygons, wholes, visible = [], [], []
    for obj in layout:
        poly = shape_polygon(obj.shape, obj.cx, obj.cy, obj.r)
        rle = mask_utils.frPyObjects([poly], height, width)
        mask = mask_utils.decode(rle)[..., 0] > 0  # pycocotools raster = the annotation's pixels
        visible = [m & ~mask for m in visible] + [mask]
        polygons.append(poly)
        wholes.append(mask)
    return polygons, wholes, visible


def visible_share(wholes: list[np.ndarray], visible: list[np.ndarray]) -> float:
    """The smallest share of an object's own pixels left visible."""
    return min(float(v.sum()) / max(int(w.sum()), 1) for w, v in zip(wholes, visible))


def ambiguous_layout(
    rng: random.Random,
    flat: list[Placement],
    width: int,
    height: int,
    side: tuple[float, float] = OBJECT_SIDE,
) -> list[Placement]:
    """A flat layout with the ambiguous world's additions (``add_ambiguity``), redrawn until every
    object keeps ``MIN_VISIBLE`` of its pixels (the flat layout itself after 20 tries)."""
    for _attempt in range(20):
        layout = add_ambiguity(rng, flat, width, height, side)
        if visible_share(*layout_masks(layout, width, height)[1:]) >= MIN_VISIBLE:
            return layout
    return list(flat)


GROUP_OF_SITUATION = {"touching": 0, "outer": 1, "inner": 1}  # at most one pair of each per scene


def situation_groups(layout: Sequence[Placement]) -> list[int]:
    """Each object's group in an ambiguous layout: the objects a click on it may also mean (the
    touching pair; the outer shape and its inner one). -1 for an object apart."""
    return [GROUP_OF_SITUATION.get(obj.situation, -1) for obj in layout]


def render_scene(
    rng: random.Random, width: int, height: int, world: str = "flat"
) -> tuple[np.ndarray, list[SceneObject]]:
    """Draw one image of ``world``: (H, W, 3) uint8 pixels and its objects, back to front."""
    while True:
        count = rng.randint(*NUM_OBJECTS)
        placed = place_discs(rng, width, height, count)
        if placed is not None:
            break
    np_rng = np.random.default_rng(rng.getrandbits(32))
    grey = rng.randint(95, 150)
    pixels = np.clip(np_rng.normal(grey, 6.0, (height, width, 3)), 0, 255)
    flat = [
        Placement(shape, colour, cx, cy, r)
        for (shape, colour), (cx, cy, r) in zip(_attributes(rng, count), placed)
    ]
    layout = flat
    if world == "ambiguous":
        layout = ambiguous_layout(rng, flat, width, height)
    elif world != "flat":
        raise ValueError(f"unknown world {world!r}; choose from {', '.join(WORLDS)}")
    polygons, wholes, visible = layout_masks(layout, width, height)
    objects = []
    for obj, poly, whole, mask in zip(layout, polygons, wholes, visible):
        tint = np.array(COLOURS[obj.colour], dtype=np.float64) + rng.uniform(-12, 12)
        pixels[whole] = np.clip(tint, 0, 255)
        objects.append(
            SceneObject(
                obj.shape, obj.colour, (obj.cx, obj.cy), obj.r, poly, mask,
                occluded=bool((whole & ~mask).any()), situation=obj.situation,
            )
        )  # fmt: skip
    for obj in objects:
        ys, xs = np.nonzero(obj.mask)
        obj.centroid = (float(xs.mean()), float(ys.mean()))
    return pixels.round().astype(np.uint8), objects


def synthetic_scene(
    seed: int, kinds: Sequence[str] = ("attribute",), world: str = "flat"
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One scene of ``world`` drawn in memory, as the dataset draws its images: (H, W, 3) uint8
    pixels and every unambiguous expression of ``kinds`` about it with the mask of its object
    ((H, W) bool), objects back to front."""
    rng = random.Random(seed)
    width, height = rng.choice(IMAGE_SIDES), rng.choice(IMAGE_SIDES)
    pixels, objects = render_scene(rng, width, height, world)
    truths = {}
    for obj, exprs in zip(objects, describe(objects, max(width, height), kinds)):
        for expr in exprs:
            truths[expr.text] = obj.mask
    return pixels, truths


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> COCO uncompressed RLE (column-major runs, starting with background)."""
    flat = mask.flatten(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


@dataclass
class SyntheticSummary:
    """What ``generate_synthetic`` wrote."""

    root: Path
    num_images: int
    num_refs: int
    num_sentences: int
    refs_per_split: dict[str, int]


def _split_of(index: int, num_images: int) -> str:
    start = 0.0
    for name, share in SPLIT_SHARES:
        start += share * num_images
        if index < round(start):
            return name
    return SPLIT_SHARES[-1][0]


def generate_synthetic(
    out_dir: str | Path,
    num_images: int = 300,
    seed: int = 0,
    kinds: Sequence[str] = EXPRESSION_KINDS,
    world: str = "flat",
) -> SyntheticSummary:
    """Write a synthetic referring dataset in the refer format under ``out_dir``.

    Args:
        out_dir: data root; gets ``synthetic/refs(unc).p``, ``synthetic/instances.json``,
            ``synthetic/category_split.json``, ``synthetic/situations.json`` and
            ``images/mscoco/images/train2014/*.png``.
        num_images: images to draw (split 70/10/10/10 into train/val/testA/testB in order).
        seed: the output is a function of the seed (and of ``kinds`` and ``world``).
        kinds: the expression kinds to write, a subset of ``EXPRESSION_KINDS``; an object with
            no unambiguous expression of these kinds stays in its image unreferred.
        world: ``flat`` or ``ambiguous`` (``WORLDS``; the module docstring).

    Returns:
        A summary with the counts written.
    """
    unknown = sorted(set(kinds) - set(EXPRESSION_KINDS))
    if unknown or not kinds:
        raise ValueError(
            f"unknown or no expression kinds {unknown or list(kinds)}; choose from "
            f"{', '.join(EXPRESSION_KINDS)}"
        )
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; choose from {', '.join(WORLDS)}")
    out_dir = Path(out_dir)
    ann_dir, image_dir = out_dir / SYNTHETIC_DATASET, out_dir / REFER_IMAGE_DIR
    ann_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images, annotations, refs, situations = [], [], [], {}
    ann_id = ref_id = sent_id = 0
    for image_id in range(1, num_images + 1):
        width, height = rng.choice(IMAGE_SIDES), rng.choice(IMAGE_SIDES)
        pixels, objects = render_scene(rng, width, height, world)
        file_name = f"synthetic_{image_id:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        split = _split_of(image_id - 1, num_images)
        expressions = describe(objects, max(width, height), kinds)
        for obj, exprs in zip(objects, expressions):
            ann_id += 1
            situations[str(ann_id)] = obj.situation
            segmentation: Any = uncompressed_rle(obj.mask) if obj.occluded else [obj.polygon]
            ys, xs = np.nonzero(obj.mask)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": SHAPES[obj.shape],
                    "segmentation": segmentation,
                    "area": int(obj.mask.sum()),
                    "bbox": [  # x, y, w, h
                        int(xs.min()),
                        int(ys.min()),
                        int(np.ptp(xs) + 1),
                        int(np.ptp(ys) + 1),
                    ],
                    "iscrowd": 0,
                }
            )
            if not exprs:
                continue
            chosen = _choose(rng, exprs)
            ref_id += 1
            sentences = []
            for expr in chosen:
                sent_id += 1
                text = expr.text
                sentences.append(
                    {"sent": text, "raw": text, "tokens": text.split(), "sent_id": sent_id}
                )
            refs.append(
                {
                    "ref_id": ref_id,
                    "ann_id": ann_id,
                    "image_id": image_id,
                    "category_id": SHAPES[obj.shape],
                    "split": split,
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "sentences": sentences,
                    "file_name": f"synthetic_{image_id:06d}_{ann_id}.png",
                }
            )
    categories = [{"id": i, "name": name, "supercategory": "shape"} for name, i in SHAPES.items()]
    with (ann_dir / "instances.json").open("w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    with (ann_dir / f"refs({SYNTHETIC_SPLIT_BY}).p").open("wb") as f:
        pickle.dump(refs, f, protocol=2)  # protocol 2: readable by the Python-2 refer API too
    category_split = {"seen": list(SYNTHETIC_SEEN), "unseen": list(SYNTHETIC_UNSEEN)}
    (ann_dir / CATEGORY_SPLIT_FILE).write_text(json.dumps(category_split) + "\n", encoding="utf-8")
    (ann_dir / SITUATIONS_FILE).write_text(json.dumps(situations) + "\n", encoding="utf-8")
    per_split: dict[str, int] = {}
    for ref in refs:
        per_split[ref["split"]] = per_split.get(ref["split"], 0) + 1
    summary = SyntheticSummary(out_dir, num_images, len(refs), sent_id, per_split)
    logger.info("synthetic data written to %s: %s", out_dir, summary)
    return summary


def _choose(rng: random.Random, exprs: list[Expression]) -> list[Expression]:
    """Up to ``_MAX_EXPRESSIONS``, one of each kind first, in a seeded random order."""
    by_kind: dict[str, list[Expression]] = {}
    for e in exprs:
        by_kind.setdefault(e.kind, []).append(e)
    chosen = [rng.choice(v) for _, v in sorted(by_kind.items())]
    rest = [e for e in exprs if e not in chosen]
    rng.shuffle(rest)
    return (chosen + rest)[:_MAX_EXPRESSIONS]
