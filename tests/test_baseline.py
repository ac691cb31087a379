"""The random-object baseline (engine/baseline.py): hits and misses by hand, seeding per image,
the unfiltered split's objects, and the expression sources it reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from refer_batches import refer_batch, two_objects

from prompt_ris.config import Config, ModelConfig, load_config
from prompt_ris.data.loader import build_eval_loader
from prompt_ris.data.prepare import prepare_refer
from prompt_ris.data.rle import decode_rle, encode_rle
from prompt_ris.data.splits import load_split
from prompt_ris.engine.baseline import (
    dataset_expressions,
    iter_expressions,
    random_object_baseline,
    referred_objects,
)
from prompt_ris.miniature.synthetic import SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY, generate_synthetic
from tiny_random import TINY_RANDOM_ARGS


@pytest.fixture(scope="module")
def model_cfg() -> ModelConfig:
    return load_config(overrides=TINY_RANDOM_ARGS).model


def test_random_object_baseline(model_cfg: ModelConfig) -> None:
    batches = [refer_batch(model_cfg, [0, 1, 2]), refer_batch(model_cfg, [3])]
    metrics, records = random_object_baseline(iter_expressions(batches), "s", seed=3)
    assert len(records) == 12
    for r in records:
        # Two disjoint objects per image: a hit scores exactly 1, a miss exactly 0.
        assert r["random_iou"] == float(r["random_object_id"] == r["object_id"])
    hits = sum(r["random_object_id"] == r["object_id"] for r in records)
    assert metrics["mIoU"] == pytest.approx(100 * hits / 12)
    # Draws are seeded per image: another batching gives the same records.
    again = random_object_baseline(iter_expressions([refer_batch(model_cfg, [3, 2, 1, 0])]), "s", 3)
    assert again[1] == records


def test_iter_expressions_yields_identities_and_masks(model_cfg: ModelConfig) -> None:
    exprs = list(iter_expressions([refer_batch(model_cfg, [1]), refer_batch(model_cfg, [2])]))
    assert [(e["image_id"], e["object_id"], e["sent_id"]) for e in exprs] == [
        (1, 100, 100), (1, 100, 101), (1, 101, 112), (2, 200, 200), (2, 200, 201), (2, 201, 212),
    ]  # fmt: skip
    assert all(e["split"] == "" for e in exprs) and exprs[2]["text"] == "box"
    np.testing.assert_array_equal(exprs[2]["gt_mask"], two_objects(120, 64)[1])
    assert exprs[2]["gt_mask"].dtype == bool


def test_random_baseline_single_object_is_perfect() -> None:
    gt = two_objects(20, 30)[1]
    exprs = [
        {
            "split": "",
            "ref_id": 1,
            "sent_id": s,
            "image_id": 5,
            "object_id": 9,
            "category_id": 1,
            "text": "t",
            "gt_mask": gt,
        }
        for s in range(3)
    ]
    metrics, _ = random_object_baseline(exprs, "s")
    assert metrics["mIoU"] == 100.0 and metrics["oIoU"] == 100.0


def test_random_baseline_draws_from_the_unfiltered_split() -> None:
    """For test_unseen the image's seen objects are still there to be picked by chance."""
    target, other = two_objects(20, 30)
    expr = {
        "split": "", "ref_id": 1, "sent_id": 0, "image_id": 5, "object_id": 9, "category_id": 1,
        "text": "t", "gt_mask": target,
    }  # fmt: skip
    alone, _ = random_object_baseline([expr], "s_unseen")
    assert alone["mIoU"] == 100.0  # only the filtered split's object: chance looks perfect
    pool = [
        {"image_id": 5, "object_id": 9, "gt_rle": encode_rle(target)},
        {"image_id": 5, "object_id": 10, "gt_rle": encode_rle(other)},
        {"image_id": 6, "object_id": 11, "gt_rle": encode_rle(other)},  # another image: unused
    ]
    drawn = set()
    for seed in range(20):
        _, records = random_object_baseline([expr], "s_unseen", seed, candidates=pool)
        drawn.add(records[0]["random_object_id"])
    assert drawn == {9, 10}


def test_dataset_expressions_match_the_loader_without_images(tmp_path: Path) -> None:
    """The table-only expressions (used by evaluate.py) are the loader's, with the same masks;
    ``referred_objects`` lists every reference of a split table."""
    root = tmp_path / "synthetic"
    generate_synthetic(root, num_images=6, seed=2)
    prepared = root / "prepared"
    prepare_refer(root, prepared, [(SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY)], check_images="none")
    cfg: Config = load_config(
        {"model": {"preset": "tiny", "clip": {"image_size": 32}, "sam": {"image_size": 64}},
         "data": {"prepared": str(prepared), "num_workers": 0}},
    )  # fmt: skip
    split = f"{SYNTHETIC_DATASET}:train"
    loader = build_eval_loader(cfg, split)
    from_table = list(dataset_expressions(loader.dataset))
    from_loader = list(iter_expressions(loader))
    assert len(from_table) == len(from_loader) > 0
    for a, b in zip(from_table, from_loader, strict=True):
        assert {k: v for k, v in a.items() if k != "gt_rle"} == {
            k: v for k, v in b.items() if k != "gt_mask"
        }
        np.testing.assert_array_equal(decode_rle(a["gt_rle"]), b["gt_mask"])
    table = load_split(prepared, split)
    objects = list(referred_objects(table))
    assert [o["object_id"] for o in objects] == [int(a) for a in table["ann_id"][:]]
    assert {(o["image_id"], o["object_id"]) for o in objects} == {
        (e["image_id"], e["object_id"]) for e in from_table
    }
    # The baseline gives the same records from either source.
    assert random_object_baseline(from_table, "s", 1) == random_object_baseline(from_loader, "s", 1)
