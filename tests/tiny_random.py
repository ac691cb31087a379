"""The ``tiny`` preset on random base weights: what most tests build. The committed miniature
foundations the preset names are tested by test_foundations.py and test_demo.py."""

from __future__ import annotations

import copy
from typing import Any

TINY_RANDOM: dict[str, Any] = {
    "preset": "tiny",
    "clip": {"pretrained": None},
    "sam": {"checkpoint": None},
}
TINY_RANDOM_ARGS = ["model.preset=tiny", "model.clip.pretrained=null", "model.sam.checkpoint=null"]


def tiny_random(**sections: dict[str, Any]) -> dict[str, Any]:
    """A ``model`` section: the tiny preset on random base weights, with ``sections`` merged in
    (e.g. ``tiny_random(clip={"image_size": 64})``)."""
    model = copy.deepcopy(TINY_RANDOM)
    for name, values in sections.items():
        model.setdefault(name, {}).update(values)
    return model
