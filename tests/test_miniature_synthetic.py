"""Synthetic referring data: scene invariants, unambiguous expressions, determinism."""

from __future__ import annotations

import filecmp
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from prompt_ris.data.prepare import open_prepared
from prompt_ris.data.refer import Refer
from prompt_ris.miniature.synthetic import (
    COLOURS,
    MIN_VISIBLE,
    SHAPES,
    SITUATIONS,
    generate_synthetic,
    render_scene,
)
from repo_scripts import load_script

NUM_IMAGES = 24
_NP = r"(?:(red|green|blue|yellow) )?(\w+)"
PATTERNS = {  # expression grammar, written independently of the generator
    "attribute": re.compile(rf"^the {_NP}$"),
    "superlative": re.compile(rf"^the (leftmost|rightmost|top|bottom) {_NP}$"),
    "where": re.compile(rf"^the {_NP} (?:on|at) the (left|right|top|bottom)$"),
    "relation": re.compile(rf"^the {_NP} (above|below|left of|right of) the {_NP}$"),
}
AXIS_SIGN = {  # word -> (axis, sign): the object named has the largest sign * coordinate
    "leftmost": (0, -1), "left": (0, -1), "rightmost": (0, 1), "right": (0, 1),
    "top": (1, -1), "bottom": (1, 1), "above": (1, -1), "below": (1, 1),
    "left of": (0, -1), "right of": (0, 1),
}  # fmt: skip


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, num_images=NUM_IMAGES, seed=3)
    return root


def _scene_objects(root: Path) -> dict[int, dict[int, dict]]:
    """image_id -> ann_id -> shape, colour (measured from pixels), centroid, mask."""
    coco = json.loads((root / "synthetic" / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = {img["id"]: img for img in coco["images"]}
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    scenes: dict[int, dict[int, dict]] = {i: {} for i in images}
    for ann in coco["annotations"]:
        img = images[ann["image_id"]]
        h, w = img["height"], img["width"]
        rle = mask_utils.frPyObjects(ann["segmentation"], h, w)
        mask = mask_utils.decode(rle)
        mask = (mask.sum(axis=2) if mask.ndim == 3 else mask) > 0
        pixels = np.asarray(Image.open(root / "images/mscoco/images/train2014" / img["file_name"]))
        mean = pixels[mask].astype(np.float64).mean(axis=0)
        colour = list(COLOURS)[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))]
        ys, xs = np.nonzero(mask)
        scenes[img["id"]][ann["id"]] = {
            "shape": names[ann["category_id"]],
            "colour": colour,
            "centroid": (xs.mean(), ys.mean()),
            "mask": mask,
            "bbox": ann["bbox"],
            "image_hw": (h, w),
        }
    return scenes


def _matching(objects: dict[int, dict], colour: str | None, noun: str) -> list[int]:
    return [
        a
        for a, o in objects.items()
        if (colour is None or o["colour"] == colour) and (noun == "shape" or o["shape"] == noun)
    ]


def _denotes(text: str, objects: dict[int, dict]) -> list[int]:
    """Objects the expression picks out, by the test's own reading of it."""
    for kind, pattern in PATTERNS.items():
        m = pattern.match(text)
        if not m:
            continue
        if kind == "attribute":
            return _matching(objects, m[1], m[2])
        if kind in ("superlative", "where"):
            word, colour, noun = (m[1], m[2], m[3]) if kind == "superlative" else (m[3], m[1], m[2])
            axis, sign = AXIS_SIGN[word]
            cands = _matching(objects, colour, noun)
            scores = sorted((sign * objects[a]["centroid"][axis], a) for a in cands)
            return [scores[-1][1]] if len(scores) == 1 or scores[-1][0] > scores[-2][0] else []
        landmarks = _matching(objects, m[4], m[5])
        if len(landmarks) != 1:
            return []
        axis, sign = AXIS_SIGN[m[3]]
        anchor = objects[landmarks[0]]["centroid"][axis]
        cands = [a for a in _matching(objects, m[1], m[2]) if a != landmarks[0]]
        return [a for a in cands if sign * (objects[a]["centroid"][axis] - anchor) > 0]
    raise AssertionError(f"expression outside the grammar: {text!r}")


def test_scenes_have_three_objects_and_a_shared_attribute(synth_root: Path) -> None:
    scenes = _scene_objects(synth_root)
    assert len(scenes) == NUM_IMAGES
    for image_id, objects in scenes.items():
        assert len(objects) >= 3, image_id
        shapes = [o["shape"] for o in objects.values()]
        colours = [o["colour"] for o in objects.values()]
        assert len(set(shapes)) < len(shapes) or len(set(colours)) < len(colours), image_id
        for o in objects.values():
            side = max(o["bbox"][2], o["bbox"][3]) / min(o["image_hw"])
            assert 0.15 <= side <= 0.40, (image_id, side)


def test_objects_overlap_slightly_at_most() -> None:
    rng = random.Random(0)
    for _ in range(20):
        _, objects = render_scene(rng, 128, 112)
        for o in objects:
            full = mask_utils.decode(mask_utils.frPyObjects([o.polygon], 112, 128))[..., 0] > 0
            assert o.mask.sum() >= 0.9 * full.sum()
            assert not (o.mask & ~full).any()


def test_every_expression_denotes_exactly_its_object(synth_root: Path) -> None:
    scenes = _scene_objects(synth_root)
    refer = Refer(synth_root, "synthetic", "unc")
    words = set()
    for ref in refer.refs:
        texts = [t for _, t in refer.sentences(ref)]
        assert len(texts) >= 2 and len(set(texts)) == len(texts), texts
        for text in texts:
            assert _denotes(text, scenes[ref["image_id"]]) == [ref["ann_id"]], text
            assert len(text.split()) <= 8
            words.update(text.split())
    assert words <= {"the", "shape", "on", "at", "of", *COLOURS, *SHAPES} | set(AXIS_SIGN)
    texts = [t for ref in refer.refs for _, t in refer.sentences(ref)]
    kinds = {kind for t in texts for kind, p in PATTERNS.items() if p.match(t)}
    assert kinds == set(PATTERNS)  # all expression kinds occur


def test_refer_format_splits_and_categories(synth_root: Path) -> None:
    refer = Refer(synth_root, "synthetic", "unc")
    assert {r["split"] for r in refer.refs} == {"train", "val", "testA", "testB"}
    image_split: dict[int, str] = {}
    for ref in refer.refs:  # splits partition images
        assert image_split.setdefault(ref["image_id"], ref["split"]) == ref["split"]
        ann = refer.annotations[ref["ann_id"]]
        assert ann["category_id"] == ref["category_id"] and ann["image_id"] == ref["image_id"]
        assert refer.categories[ref["category_id"]] in SHAPES
    kinds = {type(a["segmentation"]).__name__ for a in refer.annotations.values()}
    assert kinds == {"list", "dict"}  # polygons and (for occluded objects) RLE


def test_generation_is_deterministic(tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "a", num_images=6, seed=11)
    generate_synthetic(tmp_path / "b", num_images=6, seed=11)
    generate_synthetic(tmp_path / "c", num_images=6, seed=12)
    files = ["synthetic/refs(unc).p", "synthetic/instances.json"]
    files += [f"images/mscoco/images/train2014/synthetic_{i:06d}.png" for i in range(1, 7)]
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert mismatch == [] and errors == []
    assert not filecmp.cmp(
        tmp_path / "a/synthetic/instances.json", tmp_path / "c/synthetic/instances.json", False
    )


def test_make_synthetic_script_writes_prepared_data(tmp_path: Path) -> None:
    module = load_script("scripts/make_synthetic.py")
    summary = module.main(["--out", str(tmp_path), "--num-images", "10", "--seed", "5"])
    table = open_prepared(tmp_path / "prepared", "synthetic", "unc")
    assert len(table) == summary.num_refs
    assert sum(len(s) for s in table["sentences"][:]) == summary.num_sentences
    refer = Refer(tmp_path, "synthetic", "unc")
    assert table["ref_id"][:] == [r["ref_id"] for r in refer.refs]


def test_kinds_restrict_the_expressions(tmp_path: Path) -> None:
    generate_synthetic(tmp_path, num_images=12, seed=3, kinds=["attribute"])
    scenes = _scene_objects(tmp_path)
    refer = Refer(tmp_path, "synthetic", "unc")
    texts = [(ref, t) for ref in refer.refs for _, t in refer.sentences(ref)]
    assert texts
    for ref, text in texts:
        assert PATTERNS["attribute"].match(text), text
        assert _denotes(text, scenes[ref["image_id"]]) == [ref["ann_id"]], text
    # Unreferred objects stay in the scene: every image still has 3+ objects.
    assert all(len(objects) >= 3 for objects in scenes.values())
    with pytest.raises(ValueError, match="choose from attribute, position, relation"):
        generate_synthetic(tmp_path / "x", num_images=1, kinds=["colour"])


def _situations(root: Path) -> dict[int, str]:
    raw = json.loads((root / "synthetic" / "situations.json").read_text())
    return {int(ann_id): situation for ann_id, situation in raw.items()}


def _whole(ann: dict, h: int, w: int) -> np.ndarray:
    """The visible mask with its holes filled row by row: the whole of a convex shape (every
    shape with room inside is convex)."""
    mask = _decode(ann, h, w)
    filled = mask.copy()
    for y in np.flatnonzero(mask.any(axis=1)):
        xs = np.flatnonzero(mask[y])
        filled[y, xs.min() : xs.max() + 1] = True
    return filled


def _decode(ann: dict, h: int, w: int) -> np.ndarray:
    rle = mask_utils.frPyObjects(ann["segmentation"], h, w)
    mask = mask_utils.decode(rle)
    return (mask.sum(axis=2) if mask.ndim == 3 else mask) > 0


def test_ambiguous_world_nests_and_touches(tmp_path: Path) -> None:
    generate_synthetic(tmp_path, num_images=24, seed=3, world="ambiguous")
    situations = _situations(tmp_path)
    scenes = _scene_objects(tmp_path)
    coco = json.loads((tmp_path / "synthetic" / "instances.json").read_text())
    anns = {a["id"]: a for a in coco["annotations"]}
    images = {img["id"]: img for img in coco["images"]}
    assert set(situations) == set(anns) and set(situations.values()) == set(SITUATIONS)
    for image_id, objects in scenes.items():
        h, w = images[image_id]["height"], images[image_id]["width"]
        by = {s: [a for a in objects if situations[a] == s] for s in SITUATIONS}
        assert len(by["inner"]) == len(by["outer"]) <= 1, image_id
        if by["inner"]:  # the inner shape lies in the outer's hole, in another colour
            inner, outer = objects[by["inner"][0]], objects[by["outer"][0]]
            hole = _whole(anns[by["outer"][0]], h, w) & ~outer["mask"]
            assert (inner["mask"] & ~hole).sum() == 0, image_id
            assert inner["colour"] != outer["colour"], image_id
        assert len(by["touching"]) in (0, 2), image_id
        if by["touching"]:  # one colour, two shapes, their visible pixels touch
            a, b = (objects[k] for k in by["touching"])
            assert a["colour"] == b["colour"] and a["shape"] != b["shape"], image_id
            grown = np.zeros_like(a["mask"])
            grown[1:] |= a["mask"][:-1]
            grown[:-1] |= a["mask"][1:]
            grown[:, 1:] |= a["mask"][:, :-1]
            grown[:, :-1] |= a["mask"][:, 1:]
            assert (grown & b["mask"]).any(), image_id
    # Every expression still denotes exactly its object, by the test's own reading.
    refer = Refer(tmp_path, "synthetic", "unc")
    referred = {s: 0 for s in SITUATIONS}
    for ref in refer.refs:
        referred[situations[ref["ann_id"]]] += 1
        for _, text in refer.sentences(ref):
            assert _denotes(text, scenes[ref["image_id"]]) == [ref["ann_id"]], text
    assert all(referred.values()), referred


def test_ambiguous_objects_stay_visible() -> None:
    rng = random.Random(1)
    for _ in range(30):
        _, objects = render_scene(rng, 144, 128, "ambiguous")
        for o in objects:
            full = mask_utils.decode(mask_utils.frPyObjects([o.polygon], 128, 144))[..., 0] > 0
            assert o.mask.sum() >= MIN_VISIBLE * full.sum() - 1
            assert not (o.mask & ~full).any()
            assert o.occluded == bool((full & ~o.mask).any())


def test_flat_world_is_the_default_and_unknown_worlds_are_refused(tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "flat", num_images=6, seed=11)
    generate_synthetic(tmp_path / "named", num_images=6, seed=11, world="flat")
    assert set(_situations(tmp_path / "flat").values()) == {"apart"}
    assert filecmp.cmp(
        tmp_path / "flat/synthetic/instances.json",
        tmp_path / "named/synthetic/instances.json",
        shallow=False,
    )
    with pytest.raises(ValueError, match="unknown world 'nested'; choose from flat, ambiguous"):
        generate_synthetic(tmp_path / "x", num_images=1, world="nested")
