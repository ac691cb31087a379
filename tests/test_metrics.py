"""Metrics on hand-made masks and records, with answers worked out by hand."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from prompt_ris.metrics import (
    deduplicate,
    intersection_union,
    iou_from_counts,
    score_output,
    summarize,
    summarize_splits,
    threshold_logit,
)


def test_intersection_union_on_handmade_masks() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [1e-3, 5.0, -5.0]])  # fg: (0,0), (1,0), (1,1)
    gt = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)  # (0,0), (0,1), (1,1)
    assert intersection_union(logits, gt) == (2, 4)


def test_threshold_is_strict_and_in_probability() -> None:
    # Probability exactly 0.5 (logit 0) is background; threshold 0.75 is logit ln 3.
    gt = np.ones((1, 3), dtype=bool)
    assert intersection_union(torch.zeros(1, 3), gt) == (0, 3)
    logits = torch.tensor([[math.log(3.0) - 1e-3, math.log(3.0) + 1e-3, 9.0]])
    assert intersection_union(logits, gt, threshold=0.75) == (2, 3)
    assert threshold_logit(0.5) == 0.0
    with pytest.raises(ValueError, match="probability"):
        threshold_logit(1.0)


def test_empty_cases() -> None:
    empty = np.zeros((2, 2), dtype=bool)
    assert intersection_union(torch.full((2, 2), -3.0), empty) == (0, 0)
    assert iou_from_counts(0, 0) == 1.0  # empty prediction of empty ground truth
    gt = np.array([[1, 0], [0, 0]], dtype=bool)
    assert intersection_union(torch.full((2, 2), -3.0), gt) == (0, 1)  # empty prediction: IoU 0
    assert iou_from_counts(0, 1) == 0.0


def test_size_mismatch_says_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"frames\.lowres_to_original"):
        intersection_union(torch.zeros(2, 2), np.zeros((3, 2), dtype=bool))


def _record(
    ref: int, sent: int, image: int, obj: int, inter: int, union: int, split: str = "s"
) -> dict:
    record = {
        "split": split,
        "ref_id": ref,
        "sent_id": sent,
        "image_id": image,
        "object_id": obj,
        "category_id": 1,
    }
    score_output(record, "final", inter, union)
    return record


# Image 1: object 10 (two sentences: IoU .5, 1.0), object 11 (IoU .6). Image 2: object 20 (IoU 0).
# Image 3: empty vs empty (IoU 1, U = 0).
RECORDS = [
    _record(1, 1, 1, 10, 2, 4),
    _record(1, 2, 1, 10, 3, 3),
    _record(2, 3, 1, 11, 6, 10),
    _record(3, 4, 2, 20, 0, 5),
    _record(4, 5, 3, 30, 0, 0),
]


def test_metrics_on_handmade_records() -> None:
    m = summarize(RECORDS)
    ious = [0.5, 1.0, 0.6, 0.0, 1.0]
    assert m["oIoU"] == pytest.approx(100 * 11 / 22)
    assert m["mIoU"] == pytest.approx(100 * sum(ious) / 5)
    # IoU > X strictly: 0.5 is not above 0.5; 0.6 is not above 0.6.
    assert m["P@0.5"] == pytest.approx(100 * 3 / 5)
    assert m["P@0.6"] == pytest.approx(100 * 2 / 5)
    assert m["P@0.7"] == m["P@0.8"] == m["P@0.9"] == pytest.approx(100 * 2 / 5)
    # ImgAcc: image 1 mean (.5+1+.6)/3 = .7, image 2 = 0, image 3 = 1 -> 1.7 / 3
    assert m["ImgAcc"] == pytest.approx(100 * 1.7 / 3)
    # InstAcc: object 10 mean .75, 11 .6, 20 0, 30 1 -> 2.35 / 4
    assert m["InstAcc"] == pytest.approx(100 * 2.35 / 4)
    assert (m["num_expressions"], m["num_images"], m["num_objects"]) == (5, 3, 4)


def test_instances_are_grouped_within_their_image() -> None:
    # Object id 7 in two different images (synthetic data reuses ids) is two instances.
    records = [_record(1, 1, 1, 7, 1, 1), _record(2, 2, 2, 7, 0, 1)]
    assert summarize(records)["InstAcc"] == pytest.approx(50.0)
    assert summarize(records)["num_objects"] == 2


def test_missing_output_and_empty_split_raise() -> None:
    with pytest.raises(KeyError, match="coarse"):
        summarize(RECORDS, "coarse")
    with pytest.raises(ValueError, match="empty"):
        summarize([])


def test_deduplicate_is_order_independent() -> None:
    padded = RECORDS + RECORDS[:2]  # a distributed sampler repeats samples to even out shards
    shuffled = padded[:]
    random.Random(0).shuffle(shuffled)
    assert deduplicate(shuffled) == deduplicate(RECORDS)
    assert len(deduplicate(shuffled)) == len(RECORDS)
    assert summarize(deduplicate(shuffled)) == summarize(RECORDS)


def test_summarize_splits_separates_splits() -> None:
    records = RECORDS + [_record(1, 1, 1, 10, 1, 4, split="t")]  # same ids, other split
    out = summarize_splits(deduplicate(records), outputs=("final",))
    assert set(out) == {"s", "t"}
    assert out["t"]["final"]["mIoU"] == pytest.approx(25.0)
    assert out["s"]["final"] == summarize(RECORDS)
