"""Scenes to try the model on: the committed examples, and new synthetic scenes on demand.

A scene is an image with the expressions the app offers for it and, for every expression it
knows, the ground-truth mask (so that the app can give each answer's IoU). The examples live in
``examples/scenes/`` of the source tree: ``scenes.json`` lists each scene's image file, its
suggested expressions and its ground truth as COCO RLE (``scripts/make_examples.py`` writes them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from prompt_ris.data.rle import decode_rle, encode_rle
from prompt_ris.miniature.synthetic import synthetic_scene
from prompt_ris.weights import SOURCE_TREE

EXAMPLES_DIR = SOURCE_TREE / "examples" / "scenes"
SCENES_FILE = "scenes.json"
SUGGESTED = 3  # expressions a scene offers (one per line in the text box)


@dataclass
class Scene:
    """An image, the expressions offered for it, and the ground truth of those it knows.

    Attributes:
        name: shown in the page.
        image: (H, W, 3) uint8.
        expressions: offered in the text box, one per line.
        truths: expression -> (H, W) bool mask of its object.
        path: the image file, for examples.
    """

    name: str
    image: np.ndarray
    expressions: list[str]
    truths: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None


def example_scenes(folder: str | Path = EXAMPLES_DIR) -> list[Scene]:
    """The scenes listed in ``folder/scenes.json`` (an empty list when there is none)."""
    index = Path(folder) / SCENES_FILE
    if not index.is_file():
        return []
    scenes = []
    for entry in json.loads(index.read_text(encoding="utf-8")):
        path = Path(folder) / entry["image"]
        truths = {text: decode_rle(rle) for text, rle in entry["truths"].items()}
        image = np.asarray(Image.open(path).convert("RGB"))
        scenes.append(Scene(entry["name"], image, list(entry["expressions"]), truths, path))
    return scenes


def new_scene(seed: int) -> Scene:
    """A synthetic scene drawn for ``seed`` (as the demo's data draws them), ground truth known."""
    image, truths = synthetic_scene(seed)
    texts = list(truths)
    step = max(1, len(texts) // SUGGESTED)
    return Scene(f"synthetic scene {seed}", image, texts[::step][:SUGGESTED], truths)


def write_examples(scenes: list[Scene], folder: str | Path) -> Path:
    """Write ``scenes`` as PNG files and ``scenes.json`` into ``folder``; returns the index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, scene in enumerate(scenes):
        name = f"scene_{k}.png"
        Image.fromarray(scene.image).save(folder / name)
        truths = {text: encode_rle(mask) for text, mask in scene.truths.items()}
        entries.append(
            {"name": scene.name, "image": name, "expressions": scene.expressions, "truths": truths}
        )
    index = folder / SCENES_FILE
    index.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    return index
