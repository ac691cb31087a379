"""COCO run-length encoding of masks: the one codec for prepared data, records and saved masks.

Compressed RLE is ``{"size": [H, W], "counts": str}`` with ``counts`` as ASCII text, so it is
JSON-ready (prepared Arrow tables, ``records.jsonl``, ``masks.jsonl``); pycocotools' own bytes
``counts`` are accepted wherever an RLE is read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) mask (nonzero is foreground) -> compressed RLE with ``counts`` as text."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask) != 0, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Compressed RLE (``counts`` as text or bytes) -> (H, W) bool mask."""
    return mask_utils.decode(coco_rle(rle)) > 0


def rle_area(rle: dict[str, Any]) -> int:
    """Foreground pixels of a compressed RLE, without decoding it."""
    return int(mask_utils.area(coco_rle(rle)))


def coco_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """The RLE as pycocotools takes it: integer size, ``counts`` as bytes."""
    counts = rle["counts"]
    return {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }
