"""Evaluator (engine/evaluator.py): oracle masks through the real frame maps, shard/merge
equality, mode handling, and the per-expression records."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from refer_batches import refer_batch, two_objects

from prompt_ris.config import load_config
from prompt_ris.data.batch import Batch
from prompt_ris.data.rle import decode_rle
from prompt_ris.engine.evaluator import (
    evaluate,
    expression_identity,
    predict_original_logits,
    score_batch,
)
from prompt_ris.frames import lowres_to_original, resized_shape
from prompt_ris.metrics import IDENTITY_KEYS, deduplicate, summarize
from prompt_ris.models import PromptRIS, PromptSwitches, build_prompt_ris
from tiny_random import TINY_RANDOM_ARGS


@pytest.fixture(scope="module")
def eval_model() -> PromptRIS:
    torch.manual_seed(0)
    cfg = load_config(overrides=TINY_RANDOM_ARGS)
    return build_prompt_ris(cfg.model).eval()


def _batch(model: PromptRIS, image_ids: list[int]) -> Batch:
    return refer_batch(model.config.model, image_ids)


def _letterbox_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """A mask letterboxed into a ``size`` square by hand: box-filter shrink (bilinear when
    enlarging), zero pad."""
    h, w = resized_shape(*mask.shape, size)
    shrink = h <= mask.shape[0] and w <= mask.shape[1]
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    resized = Image.fromarray(mask.astype(np.float32)).resize((w, h), resample)
    out = torch.zeros(size, size)
    out[:h, :w] = torch.tensor(np.asarray(resized)).clamp(0, 1)
    return out


def test_oracle_prediction_scores_iou_near_one(eval_model: PromptRIS) -> None:
    """Ground truth letterboxed to the low-res frame (final) or to the CLIP grid (coarse), mapped
    back by the model's real upsample and frame map, matches the original-size ground truth."""
    model = eval_model
    batch = _batch(model, [0, 1, 2, 3])
    # Logits p - 0.5: a linear map, so bilinear resampling then "> 0" equals resampling p, "> .5".
    final = batch.gt_masks - 0.5  # (B, 1, S_s/4, S_s/4)
    clip_cfg = model.config.model.clip
    grid = clip_cfg.image_size // clip_cfg.patch_size
    clip_frame = torch.stack(
        [_letterbox_mask(m, clip_cfg.image_size) for m in batch.gt_masks_orig]
    )[:, None]
    coarse = F.adaptive_avg_pool2d(clip_frame, grid) - 0.5  # (B, 1, h_c, w_c)
    frame = (batch.input_sizes, batch.orig_sizes, batch.image_index, model.sam.image_size)
    logits = {
        "final": lowres_to_original(final, *frame),
        "coarse": lowres_to_original(model.upsample_coarse(coarse), *frame),
    }
    records = score_batch(logits, batch, "synthetic:val")
    final_ious = [r["final_iou"] for r in records]
    coarse_ious = [r["coarse_iou"] for r in records]
    assert min(final_ious) > 0.93, final_ious
    assert min(coarse_ious) > 0.8, coarse_ious
    # The wrong object scores 0: the masks are aligned, not merely blurred everywhere.
    swapped = list(logits["final"])
    swapped[0], swapped[2] = swapped[2], swapped[0]  # image 0: object 1's mask for object 0
    assert score_batch({"final": swapped}, batch, "x")[0]["final_iou"] == 0.0


def test_score_batch_records_by_hand(eval_model: PromptRIS) -> None:
    batch = _batch(eval_model, [1])  # 120 x 64: ellipse (obj 0, twice), rectangle (obj 1)
    objects = two_objects(120, 64)
    rect = torch.from_numpy(objects[1]).float()
    # Predict the rectangle everywhere (logit +1 inside, -1 outside).
    logits = {"final": [rect * 2 - 1] * 3}
    records = score_batch(logits, batch, "s", threshold=0.5, keep_masks=True)
    area = int(objects[1].sum())
    assert [r["final_iou"] for r in records] == [0.0, 0.0, 1.0]
    assert records[2]["final_intersection"] == records[2]["final_union"] == area
    assert records[0]["final_intersection"] == 0
    assert records[0]["final_union"] == area + int(objects[0].sum())
    assert {k: records[1][k] for k in IDENTITY_KEYS} == {
        "split": "s", "ref_id": 10, "sent_id": 101, "image_id": 1, "object_id": 100,
        "category_id": 1,
    }  # fmt: skip
    assert records[1]["text"] == "round thing"
    np.testing.assert_array_equal(decode_rle(records[2]["final_rle"]), objects[1])
    # A higher threshold: logit 1 is probability 0.73, below 0.8: nothing is predicted.
    high = score_batch(logits, batch, "s", threshold=0.8)
    assert [r["final_iou"] for r in high] == [0.0, 0.0, 0.0] and "final_rle" not in high[0]
    assert expression_identity(batch, 2, "t") == {
        "split": "t", "ref_id": 11, "sent_id": 112, "image_id": 1, "object_id": 101,
        "category_id": 2, "text": "box",
    }  # fmt: skip
    with pytest.raises(ValueError, match="with_orig_masks"):
        score_batch(logits, dataclasses.replace(batch, gt_masks_orig=None), "s")


def test_predict_original_logits_maps_the_forward(eval_model: PromptRIS) -> None:
    batch = _batch(eval_model, [0, 2])
    switches = PromptSwitches(point=False)
    with torch.no_grad():
        got = predict_original_logits(eval_model, batch, switches)
        out = eval_model(batch, switches=switches)
        coarse_only = predict_original_logits(eval_model, batch, switches, with_sam=False)
    want = eval_model.original_logits(out, batch.input_sizes, batch.orig_sizes, batch.image_index)
    assert list(got) == ["coarse", "final"] and list(coarse_only) == ["coarse"]
    assert [tuple(m.shape) for m in got["final"]] == [(37, 90)] * 3 + [(96, 96)] * 3
    for name in ("coarse", "final"):
        for a, b in zip(got[name], want[name], strict=True):
            torch.testing.assert_close(a, b)
    for a, b in zip(coarse_only["coarse"], want["coarse"], strict=True):
        torch.testing.assert_close(a, b)


def test_shards_merge_to_single_process_result(eval_model: PromptRIS) -> None:
    """Two processes each seeing half the images (plus a padded repeat) give, after the gather
    and deduplication, exactly the single-process records and metrics. (Each image is in a
    batch of its own everywhere: a batch of other images may change a logit in its last bits.)"""
    model, accelerator = eval_model, Accelerator(cpu=True)
    switches = PromptSwitches()
    full_loader = [_batch(model, [0]), _batch(model, [1])]
    metrics, records = evaluate(model, full_loader, accelerator, switches, "synthetic:val")
    shard_a = evaluate(model, [_batch(model, [1])], accelerator, switches, "synthetic:val")
    shard_b = evaluate(
        model, [_batch(model, [0]), _batch(model, [1])], accelerator, switches, "synthetic:val"
    )
    merged = deduplicate(shard_a[1] + shard_b[1])
    assert merged == records
    assert {o: summarize(merged, o) for o in ("coarse", "final")} == metrics
    assert metrics["final"]["num_expressions"] == 6 and metrics["final"]["num_images"] == 2
    assert not model.training


def test_evaluate_restores_mode_and_scores_coarse_only(eval_model: PromptRIS) -> None:
    model = eval_model.train()
    metrics, records = evaluate(
        model, [_batch(model, [1])], Accelerator(cpu=True), PromptSwitches(), "s", with_sam=False
    )
    assert model.training
    model.eval()
    assert set(metrics) == {"coarse"} and "final_iou" not in records[0]
    assert 0.0 <= metrics["coarse"]["mIoU"] <= 100.0
