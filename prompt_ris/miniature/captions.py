"""Synthetic image-caption pairs for pretraining the tiny CLIP (the demo's "web data").

The scenes are drawn like ``synthetic.render_scene`` draws them (the same shapes, ``shape_polygon``
geometry, ``COLOURS`` palette, noisy grey background, a tint offset per object, pycocotools
rasterisation), but from an explicit :class:`SceneSpec`, so that a scene can be redrawn with one
thing changed: one object's shape or colour (hard negatives that differ in one word), or mirrored
left-right (a hard negative for position words).

Captions name every colour, every shape -- the held-out star and hexagon included, as CLIP's
web pretraining saw cats although the RIS training split has none -- and the position words of
the referring grammar. Caption kinds (``CAPTION_KINDS``):

- ``single``: one object, "a red star", or with where it is, "a red star on the left";
- ``pair``: two objects and their relation, "a red star left of a blue circle", "... above ...";
- ``listing``: 3-5 objects from left to right, "a red star, a blue circle and a green square";
- ``extremes``: 3-5 objects, "the leftmost shape is a red star and the rightmost shape is a ...".

Everything is a function of the ``random.Random`` passed in.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from prompt_ris.miniature.synthetic import (
    COLOURS,
    IMAGE_SIDES,
    OBJECT_SIDE,
    SHAPES,
    WORLDS,
    Placement,
    ambiguous_layout,
    place_discs,
    shape_polygon,
    situation_groups,
)

CAPTION_KINDS = ("single", "pair", "listing", "extremes")
OBJECTS_PER_KIND = {"single": (1, 1), "pair": (2, 2), "listing": (3, 5), "extremes": (3, 5)}
POSITION_WORDS = ("left", "right", "top", "bottom", "leftmost", "rightmost", "above", "below")
NOISE_STD = 6.0  # background noise (grey levels), as in synthetic.py
TINT_JITTER = 12.0  # per-object tint offset (grey levels), as in synthetic.py
OFF_CENTRE = 0.3  # "on the left" when the centre is in the outer 30% of the width
RELATION_MARGIN = 0.12  # pair relation named along an axis with at least this share of the side


@dataclass(frozen=True)
class ShapeSpec:
    """One object: its category, colour, centre (x, y), radius and tint offset; in the ambiguous
    world also its situation (``synthetic.SITUATIONS``) and its group (the objects a click on it
    may also mean, ``synthetic.situation_groups``; -1 for an object apart)."""

    shape: str
    colour: str
    cx: float
    cy: float
    r: float
    tint: float = 0.0
    situation: str = "apart"
    group: int = -1


@dataclass(frozen=True)
class SceneSpec:
    """A scene before drawing; objects are drawn in order (later ones on top)."""

    width: int
    height: int
    grey: int
    noise_seed: int
    objects: tuple[ShapeSpec, ...]


@dataclass
class CaptionedScene:
    """A drawn scene with its caption.

    Attributes:
        spec: what was drawn.
        pixels: (H, W, 3) uint8.
        masks: one (H, W) bool mask of visible pixels per object, in ``spec.objects`` order.
        caption: the text.
    """

    spec: SceneSpec
    pixels: np.ndarray
    masks: list[np.ndarray]
    caption: str


def sample_scene(
    rng: random.Random,
    num_objects: tuple[int, int] = (3, 5),
    shapes: Sequence[str] = tuple(SHAPES),
    colours: Sequence[str] = tuple(COLOURS),
    side: tuple[float, float] = OBJECT_SIDE,
    image_sides: Sequence[int] = IMAGE_SIDES,
    world: str = "flat",
) -> SceneSpec:
    """Draw a scene layout: image size, background and objects (shape, colour, place, size).

    ``side`` is the object diameter as a share of the short image side, ``image_sides`` the
    widths and heights drawn (the referring data's by default). ``world="ambiguous"`` adds the
    referring data's ambiguous world to the layout (``synthetic.ambiguous_layout``: a shape inside
    a larger one, two same-coloured shapes overlapping), the added shapes drawn from every shape
    and colour; each object then carries its situation and group.
    """
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; choose from {', '.join(WORLDS)}")
    while True:
        width, height = rng.choice(image_sides), rng.choice(image_sides)
        count = rng.randint(*num_objects)
        placed = place_discs(rng, width, height, count, side)
        if placed is not None:
            break
    objects = tuple(
        ShapeSpec(
            rng.choice(list(shapes)),
            rng.choice(list(colours)),
            cx,
            cy,
            r,
            rng.uniform(-TINT_JITTER, TINT_JITTER),
        )
        for cx, cy, r in placed
    )
    if world == "ambiguous":
        objects = _with_ambiguity(rng, objects, width, height, side)
    return SceneSpec(width, height, rng.randint(95, 150), rng.getrandbits(32), objects)


def _with_ambiguity(
    rng: random.Random,
    flat: tuple[ShapeSpec, ...],
    width: int,
    height: int,
    side: tuple[float, float],
) -> tuple[ShapeSpec, ...]:
    """A flat scene's objects with the ambiguous world's additions (a tint drawn for each added
    object), every object with its situation and group."""
    placements = [Placement(o.shape, o.colour, o.cx, o.cy, o.r) for o in flat]
    layout = ambiguous_layout(rng, placements, width, height, side)
    tints = [o.tint for o in flat]
    tints += [rng.uniform(-TINT_JITTER, TINT_JITTER) for _ in layout[len(flat) :]]
    return tuple(
        ShapeSpec(p.shape, p.colour, p.cx, p.cy, p.r, tint, p.situation, group)
        for p, tint, group in zip(layout, tints, situation_groups(layout))
    )


def paint_scene(spec: SceneSpec) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw a scene as ``synthetic.render_scene`` does.

    Returns:
        (H, W, 3) uint8 pixels and the visible (H, W) bool mask of each object.
    """
    h, w = spec.height, spec.width
    noise = np.random.default_rng(spec.noise_seed).normal(spec.grey, NOISE_STD, (h, w, 3))
    pixels = np.clip(noise, 0, 255)
    masks: list[np.ndarray] = []
    for obj in spec.objects:
        poly = shape_polygon(obj.shape, obj.cx, obj.cy, obj.r)
        mask = mask_utils.decode(mask_utils.frPyObjects([poly], h, w))[..., 0] > 0  # (H, W)
        pixels[mask] = np.clip(np.array(COLOURS[obj.colour], dtype=np.float64) + obj.tint, 0, 255)
        masks = [m & ~mask for m in masks] + [mask]
    return pixels.round().astype(np.uint8), masks


def with_object(spec: SceneSpec, index: int, **changes: str) -> SceneSpec:
    """The same scene with object ``index`` changed (e.g. ``shape="star"``)."""
    objects = list(spec.objects)
    objects[index] = dataclasses.replace(objects[index], **changes)
    return dataclasses.replace(spec, objects=tuple(objects))


def mirrored(spec: SceneSpec, axis: str = "x") -> SceneSpec:
    """The layout mirrored left-right (``axis="x"``) or top-bottom (``"y"``): the centres move,
    every shape stays upright, so "left of" becomes "right of" (or "above" "below")."""
    if axis == "x":
        objects = tuple(dataclasses.replace(o, cx=spec.width - o.cx) for o in spec.objects)
    elif axis == "y":
        objects = tuple(dataclasses.replace(o, cy=spec.height - o.cy) for o in spec.objects)
    else:
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    return dataclasses.replace(spec, objects=objects)


def noun(obj: ShapeSpec) -> str:
    """ "a red star"."""
    return f"a {obj.colour} {obj.shape}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def single_caption(spec: SceneSpec, rng: random.Random) -> str:
    """ "a red star", or "a red star on the left" / "... at the top" when it is off centre."""
    (obj,) = spec.objects
    where = []
    if obj.cx < OFF_CENTRE * spec.width:
        where.append("on the left")
    elif obj.cx > (1 - OFF_CENTRE) * spec.width:
        where.append("on the right")
    if obj.cy < OFF_CENTRE * spec.height:
        where.append("at the top")
    elif obj.cy > (1 - OFF_CENTRE) * spec.height:
        where.append("at the bottom")
    if where and rng.random() < 0.75:
        return f"{noun(obj)} {rng.choice(where)}"
    return noun(obj)


def pair_caption(spec: SceneSpec, rng: random.Random) -> str | None:
    """ "a red star left of a blue circle" along the axis of larger separation (None if the
    separation is below ``RELATION_MARGIN`` on both axes)."""
    a, b = spec.objects
    dx, dy = (b.cx - a.cx) / spec.width, (b.cy - a.cy) / spec.height
    if max(abs(dx), abs(dy)) < RELATION_MARGIN:
        return None
    if rng.random() < 0.5:
        a, b, dx, dy = b, a, -dx, -dy
    if abs(dx) >= abs(dy):
        relation = "left of" if dx > 0 else "right of"
    else:
        relation = "above" if dy > 0 else "below"
    return f"{noun(a)} {relation} {noun(b)}"


def listing_caption(spec: SceneSpec) -> str:
    """ "a red star, a blue circle and a green square", from left to right."""
    return _join([noun(o) for o in sorted(spec.objects, key=lambda o: o.cx)])


def extremes_caption(spec: SceneSpec, rng: random.Random) -> str:
    """ "the leftmost shape is a red star and the rightmost shape is a blue circle" (or top and
    bottom)."""
    if rng.random() < 0.5:
        ordered, words = sorted(spec.objects, key=lambda o: o.cx), ("leftmost", "rightmost")
    else:
        ordered, words = sorted(spec.objects, key=lambda o: o.cy), ("top", "bottom")
    first = f"the {words[0]} shape is {noun(ordered[0])}"
    last = f"the {words[1]} shape is {noun(ordered[-1])}"
    return f"{first} and {last}" if rng.random() < 0.5 else f"{last} and {first}"


def caption_scene(spec: SceneSpec, kind: str, rng: random.Random) -> str | None:
    """The caption of ``kind`` for a scene (None when the scene cannot have one)."""
    if kind == "single":
        return single_caption(spec, rng)
    if kind == "pair":
        return pair_caption(spec, rng)
    if kind == "listing":
        return listing_caption(spec)
    if kind == "extremes":
        return extremes_caption(spec, rng)
    raise ValueError(f"unknown caption kind '{kind}'; choose from {CAPTION_KINDS}")


def sample_captioned_spec(
    rng: random.Random,
    kind: str,
    side: tuple[float, float] = OBJECT_SIDE,
    image_sides: Sequence[int] = IMAGE_SIDES,
) -> tuple[SceneSpec, str, int]:
    """A scene with the object count of ``kind``, its caption and the caption's seed.

    ``caption_scene(variant, kind, random.Random(seed))`` captions a variant of the scene (same
    geometry) with the same template choices, so its caption differs only in the changed words.
    """
    while True:
        spec = sample_scene(rng, OBJECTS_PER_KIND[kind], side=side, image_sides=image_sides)
        seed = rng.getrandbits(32)
        caption = caption_scene(spec, kind, random.Random(seed))
        if caption is not None:
            return spec, caption, seed


def hard_variants(
    spec: SceneSpec, count: int, rng: random.Random, attribute: str = "shape"
) -> list[SceneSpec]:
    """Up to ``count`` variants of a scene that differ from it in one thing.

    ``attribute``: "shape" or "colour" (one object's shape or colour changed; distinct changes),
    or "position" (the layout mirrored left-right, top-bottom, and both).
    """
    if attribute == "position":
        both = mirrored(mirrored(spec, "x"), "y")
        return [mirrored(spec, "x"), mirrored(spec, "y"), both][:count]
    values = tuple(SHAPES) if attribute == "shape" else tuple(COLOURS)
    options = [
        (i, v) for i, obj in enumerate(spec.objects) for v in values if v != getattr(obj, attribute)
    ]
    rng.shuffle(options)
    return [with_object(spec, i, **{attribute: v}) for i, v in options[:count]]


def vocabulary() -> list[str]:
    """Every word the captions can use."""
    words = {"a", "and", "the", "shape", "is", "of", "on", "at", *SHAPES, *COLOURS}
    return sorted(words | set(POSITION_WORDS))
