"""COCO run-length encoding (data/rle.py), the one codec of prepared data, records and masks."""

from __future__ import annotations

import json

import numpy as np
from pycocotools import mask as mask_utils
from refer_batches import two_objects

from prompt_ris.data.rle import coco_rle, decode_rle, encode_rle, rle_area


def test_rle_roundtrip() -> None:
    mask = two_objects(37, 90)[0]
    rle = encode_rle(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [37, 90]
    assert np.array_equal(decode_rle(json.loads(json.dumps(rle))), mask)


def test_rle_by_hand() -> None:
    # Column-major runs, starting with background: column 0 = (0, 1, 1), column 1 = (0, 0, 1).
    mask = np.array([[0, 0], [1, 0], [1, 1]], dtype=np.uint8)
    raw = mask_utils.frPyObjects({"size": [3, 2], "counts": [1, 2, 2, 1]}, 3, 2)  # 1 bg 2 fg ...
    assert encode_rle(mask) == {"size": [3, 2], "counts": raw["counts"].decode("ascii")}
    assert rle_area(encode_rle(mask)) == 3
    decoded = decode_rle(encode_rle(mask))
    assert decoded.dtype == bool and decoded.tolist() == [
        [False, False],
        [True, False],
        [True, True],
    ]
    # Any nonzero value is foreground; an empty mask has area 0.
    assert np.array_equal(decode_rle(encode_rle(mask * 7)), mask.astype(bool))
    assert rle_area(encode_rle(np.zeros((4, 5), bool))) == 0


def test_bytes_and_text_counts_are_both_read() -> None:
    mask = two_objects(20, 30)[1]
    upstream = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))  # counts: bytes
    ours = encode_rle(mask)
    assert ours["counts"].encode("ascii") == upstream["counts"]
    for rle in (upstream, ours, {"size": np.array([20, 30]), "counts": ours["counts"]}):
        np.testing.assert_array_equal(decode_rle(rle), mask)
        assert rle_area(rle) == int(mask.sum())
        coco = coco_rle(rle)
        assert coco["size"] == [20, 30] and all(type(v) is int for v in coco["size"])
        assert coco["counts"] == upstream["counts"]
