"""Evaluation of batches (engine/evaluation.py): oracle masks through the real frame maps,
shard/merge equality, mode handling, the per-expression records, and one encoding shared by
several prompt switch sets."""

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
from prompt_ris.engine.baseline import expression_identity
from prompt_ris.engine.evaluation import ModelPasses, score_batch, score_loader, summarize_outputs
from prompt_ris.frames import lowres_to_original, resized_shape
from prompt_ris.metrics import IDENTITY_KEYS, deduplicate, summarize
from prompt_ris.models import PromptRIS
from prompt_ris.prompt_switches import PromptSwitches
from tiny_random import TINY_RANDOM_ARGS


@pytest.fixture(scope="module")
def eval_model() -> PromptRIS:
    torch.manual_seed(0)
    cfg = load_config(overrides=TINY_RANDOM_ARGS)
    return PromptRIS.from_config(cfg.model).eval()


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
    records = score_batch(logits["coarse"], logits["final"], batch, "synthetic:val")
    final_ious = [r["final_iou"] for r in records]
    coarse_ious = [r["coarse_iou"] for r in records]
    assert min(final_ious) > 0.93, final_ious
    assert min(coarse_ious) > 0.8, coarse_ious
    # The wrong object scores 0: the masks are aligned, not merely blurred everywhere.
    swapped = list(logits["final"])
    swapped[0], swapped[2] = swapped[2], swapped[0]  # image 0: object 1's mask for object 0
    assert score_batch(None, swapped, batch, "x")[0]["final_iou"] == 0.0


def test_score_batch_records_by_hand(eval_model: PromptRIS) -> None:
    batch = _batch(eval_model, [1])  # 120 x 64: ellipse (obj 0, twice), rectangle (obj 1)
    objects = two_objects(120, 64)
    rect = torch.from_numpy(objects[1]).float()
    # Predict the rectangle everywhere (logit +1 inside, -1 outside).
    logits = [rect * 2 - 1] * 3
    records = score_batch(None, logits, batch, "s", threshold=0.5, keep_masks=True)
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
    high = score_batch(None, logits, batch, "s", threshold=0.8)
    assert [r["final_iou"] for r in high] == [0.0, 0.0, 0.0] and "final_rle" not in high[0]
    assert expression_identity(batch, 2, "t") == {
        "split": "t", "ref_id": 11, "sent_id": 112, "image_id": 1, "object_id": 101,
        "category_id": 2, "text": "box",
    }  # fmt: skip
    with pytest.raises(ValueError, match="with_orig_masks"):
        score_batch(None, logits, dataclasses.replace(batch, gt_masks_orig=None), "s")


def test_segment_batch_maps_the_forward(eval_model: PromptRIS) -> None:
    batch = _batch(eval_model, [0, 2])
    switches = PromptSwitches.parse("mask + text")
    sizes = (batch.input_sizes, batch.orig_sizes)
    got = eval_model.segment_batch(batch, *sizes, [switches])
    coarse_only = eval_model.segment_batch(batch, *sizes, [])
    with torch.no_grad():
        out = eval_model(batch, switches=switches)
    want = eval_model.original_logits(out, *sizes, batch.image_index)
    assert list(got.final) == [switches] and coarse_only.final == {}
    assert [tuple(m.shape) for m in got.final[switches]] == [(37, 90)] * 3 + [(96, 96)] * 3
    for a, b in zip(got.final[switches], want["final"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for maps in (got.coarse, coarse_only.coarse):
        for a, b in zip(maps, want["coarse"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_encoding_serves_every_switch_set(eval_model: PromptRIS) -> None:
    """Decoding several switch sets from one encoding gives each set's own forward, bit for
    bit, and differs between sets (the switches reach SAM)."""
    batch = _batch(eval_model, [0, 1])
    sets = PromptSwitches().ablation()
    sizes = (batch.input_sizes, batch.orig_sizes)
    together = eval_model.segment_batch(batch, *sizes, sets)
    assert list(together.final) == sets
    for switches in sets:
        alone = eval_model.segment_batch(batch, *sizes, [switches], with_coarse=False)
        assert alone.coarse is None
        for a, b in zip(together.final[switches], alone.final[switches], strict=True):
            assert torch.equal(a, b)
    full, no_mask = (together.final[s][0] for s in sets[:2])
    assert not torch.equal(full, no_mask)


def test_shards_merge_to_single_process_result(eval_model: PromptRIS) -> None:
    """Two processes each seeing half the images (plus a padded repeat) give, after the gather
    and deduplication, exactly the single-process records and metrics. (Each image is in a
    batch of its own everywhere: a batch of other images may change a logit in its last bits.)"""
    model, accelerator = eval_model, Accelerator(cpu=True)
    sets = [PromptSwitches(), PromptSwitches.parse("point + text")]
    full_loader = [_batch(model, [0]), _batch(model, [1])]
    passes = ModelPasses()
    records = score_loader(model, full_loader, accelerator, "synthetic:val", sets, passes=passes)
    assert (passes.encoded, passes.decoded) == (6, 12)
    shard_a = score_loader(model, [_batch(model, [1])], accelerator, "synthetic:val", sets)
    shard_b = score_loader(
        model, [_batch(model, [0]), _batch(model, [1])], accelerator, "synthetic:val", sets
    )
    for k in range(len(sets)):
        merged = deduplicate(shard_a[k] + shard_b[k])
        assert merged == records[k]
        metrics = summarize_outputs(records[k])
        assert {o: summarize(merged, o) for o in ("coarse", "final")} == metrics
        assert metrics["final"]["num_expressions"] == 6 and metrics["final"]["num_images"] == 2
    assert [r["coarse_iou"] for r in records[0]] == [r["coarse_iou"] for r in records[1]]
    assert not model.training


def test_score_loader_restores_mode_and_scores_coarse_only(eval_model: PromptRIS) -> None:
    model = eval_model.train()
    (records,) = score_loader(model, [_batch(model, [1])], Accelerator(cpu=True), "s", [])
    assert model.training
    model.eval()
    metrics = summarize_outputs(records)
    assert set(metrics) == {"coarse"} and "final_iou" not in records[0]
    assert 0.0 <= metrics["coarse"]["mIoU"] <= 100.0
