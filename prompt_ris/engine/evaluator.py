"""Evaluation loop: model predictions -> per-expression records -> metric tables.

Every expression (every sentence of every reference in the loader) becomes one record
(see :mod:`prompt_ris.metrics`) holding intersection / union counts of the coarse mask (S_C) and
of the final mask (S), both mapped back to the original image and thresholded at ``threshold``.
Records are gathered across processes with ``accelerate.utils.gather_object`` and deduplicated
by (split, ref_id, sent_id), so a sampler that pads shards with repeated samples does not count
them twice and the metrics are the same on 1 and N processes.

The random-object baseline scores, for each expression, the ground-truth mask of an object drawn
uniformly from the referred objects of the same image (the true one included), with a generator
seeded by (seed, image_id): a chance level for "which object of this image is meant". For a
category-filtered split (``test_unseen``) the objects to draw from are those of the unfiltered
split (``test``): the image still shows its other objects.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.utils import gather_object, send_to_device
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from prompt_ris.metrics import (
    deduplicate,
    intersection_union,
    mask_intersection_union,
    score_output,
    summarize,
    threshold_logit,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from prompt_ris.models.prompt_ris import PromptSwitches

logger = logging.getLogger(__name__)

OUTPUTS = ("coarse", "final")  # scored model outputs: S_C (CLIP) and S (SAM)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO run-length encoding of a (H, W) bool mask, JSON-ready (``counts`` as str)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (``counts`` as str or bytes, e.g. :func:`encode_rle`) -> (H, W) bool mask."""
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    coco = {"size": [int(s) for s in rle["size"]], "counts": counts}
    return mask_utils.decode(coco).astype(bool)


def _identity(batch: dict[str, Any], k: int, split: str) -> dict[str, Any]:
    """The identity fields of expression ``k`` of a batch."""
    return {
        "split": split,
        "ref_id": int(batch["ref_ids"][k]),
        "sent_id": int(batch["sent_ids"][k]),
        "image_id": int(batch["image_ids"][k]),
        "object_id": int(batch["object_ids"][k]),
        "category_id": int(batch["category_ids"][k]),
        "text": batch["texts"][k],
    }


def predict_original_logits(
    model: torch.nn.Module, batch: dict[str, Any], switches: PromptSwitches, with_sam: bool = True
) -> dict[str, list[torch.Tensor]]:
    """Run the model on a batch and map its masks back to the original images.

    Args:
        model: an unwrapped PromptRIS in eval mode.
        batch: collated batch (CONTRIBUTING.md) on the model's device.
        switches: PromptSwitches choosing the SAM prompts (Table 5).
        with_sam: also produce the final (SAM) mask; False scores only the coarse mask.

    Returns:
        ``{"coarse": [...], "final": [...]}``, each a list of B (H_b, W_b) float32 logits at the
        original size of expression b's image.
    """
    out = model(
        batch["clip_images"],
        batch["sam_images"],
        batch["text_tokens"],
        batch["image_index"],
        with_sam=with_sam,
        switches=switches,
    )
    frame = (batch["input_sizes"], batch["orig_sizes"], batch["image_index"])
    # S_C: CLIP grid -> low-res frame (the frame SAM's masks live in) -> original image.
    coarse = model.upsample_coarse(out.coarse_logits.float())  # (B, 1, S_s/4, S_s/4)
    logits = {"coarse": model.postprocess_masks(coarse, *frame)}
    if with_sam:
        logits["final"] = model.postprocess_masks(out.mask_logits.float(), *frame)
    return logits


def score_batch(
    logits: dict[str, list[torch.Tensor]],
    batch: dict[str, Any],
    split: str,
    threshold: float = 0.5,
    keep_masks: bool = False,
) -> list[dict[str, Any]]:
    """Per-expression records of one batch (I/U of each output against ``gt_masks_orig``).

    Args:
        logits: ``{output: list of B (H, W) logits at original size}``.
        batch: the batch the logits belong to (identities and ``gt_masks_orig``).
        split: split name stored in each record (e.g. ``refcoco:val``).
        threshold: probability threshold (foreground is strictly above it).
        keep_masks: store each thresholded mask as COCO RLE under ``<output>_rle``.

    Returns:
        B records.
    """
    records = []
    for k, gt in enumerate(batch["gt_masks_orig"]):
        record = _identity(batch, k, split)
        for output, masks in logits.items():
            inter, union = intersection_union(masks[k], gt, threshold)
            score_output(record, output, inter, union)
            if keep_masks:  # the same rule as the counts: logits > logit(threshold)
                fg = masks[k].detach().float().cpu().numpy() > threshold_logit(threshold)
                record[f"{output}_rle"] = encode_rle(fg)
        records.append(record)
    return records


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[dict[str, Any]],
    accelerator: Accelerator,
    switches: PromptSwitches,
    split: str,
    threshold: float = 0.5,
    with_sam: bool = True,
    keep_masks: bool = False,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Evaluate a model on one split: metrics of the coarse and final masks, and the records.

    Runs in eval mode (argmax point, no prompt dropout) under ``no_grad`` and the accelerator's
    autocast; the model's mode is restored afterwards. Records from all processes are gathered
    and deduplicated, so every process returns the same, complete result.

    Args:
        model: PromptRIS, possibly wrapped by ``accelerator.prepare``.
        loader: evaluation loader (``with_orig_masks=True``), sharded or not.
        accelerator: the run's Accelerator.
        switches: PromptSwitches (Table 5 prompt ablation).
        split: split name, e.g. ``refcoco:val``.
        threshold: probability threshold of a foreground pixel.
        with_sam: score the final SAM mask too (False in stage 1, which trains no SAM path).
        keep_masks: keep RLE masks in the records (``--save-masks``).

    Returns:
        ``({"coarse": metrics, "final": metrics}, records)``; metrics as in
        :func:`prompt_ris.metrics.summarize`; records sorted by (split, ref_id, sent_id).
    """
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    records: list[dict[str, Any]] = []
    progress = tqdm(loader, desc=f"eval {split}", disable=not accelerator.is_local_main_process)
    for batch in progress:
        batch = send_to_device(batch, accelerator.device)
        with accelerator.autocast():
            logits = predict_original_logits(unwrapped, batch, switches, with_sam)
        records.extend(score_batch(logits, batch, split, threshold, keep_masks))
    unwrapped.train(was_training)
    records = deduplicate(gather_object(records))
    outputs = OUTPUTS if with_sam else OUTPUTS[:1]
    metrics = {output: summarize(records, output) for output in outputs}
    logger.info("%s: %s", split, {o: round(m["mIoU"], 2) for o, m in metrics.items()})
    return metrics, records


def iter_expressions(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Expressions of an evaluation loader as dicts with identities and ``gt_mask`` (H, W) bool."""
    for batch in loader:
        for k, gt in enumerate(batch["gt_masks_orig"]):
            yield {**_identity(batch, k, ""), "gt_mask": np.asarray(gt) != 0}


def dataset_expressions(dataset: Any) -> Iterator[dict[str, Any]]:
    """Expressions of an evaluation ``ReferImageDataset`` read from its table, without images.

    Yields dicts with identities and ``gt_rle`` (the prepared COCO RLE of the referred object),
    for every sentence of every reference of the dataset's image groups.
    """
    for group in dataset.groups:
        records = {row: dataset.table[row] for row in group.rows}
        for row, sentence in group.expressions:
            r = records[row]
            yield {
                "split": "",
                "ref_id": int(r["ref_id"]),
                "sent_id": int(r["sent_ids"][sentence]),
                "image_id": int(r["image_id"]),
                "object_id": int(r["ann_id"]),
                "category_id": int(r["category_id"]),
                "text": r["sentences"][sentence],
                "gt_rle": {"size": list(r["mask_size"]), "counts": r["mask_counts"]},
            }


def referred_objects(table: Any) -> Iterator[dict[str, Any]]:
    """``image_id``, ``object_id`` and ``gt_rle`` of every reference of a prepared split table
    (the candidates of :func:`random_object_baseline`)."""
    for r in table.select_columns(["image_id", "ann_id", "mask_size", "mask_counts"]):
        yield {
            "image_id": int(r["image_id"]),
            "object_id": int(r["ann_id"]),
            "gt_rle": {"size": list(r["mask_size"]), "counts": r["mask_counts"]},
        }


def random_object_baseline(
    expressions: Iterable[dict[str, Any]],
    split: str,
    seed: int = 0,
    candidates: Iterable[dict[str, Any]] = (),
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Chance level: predict the ground truth of a random referred object of the same image.

    For each expression, an object is drawn uniformly from the distinct referred objects of its
    image (those of ``expressions`` and of ``candidates``; the true one included); its
    ground-truth mask is scored as the prediction. Draws come from a generator seeded by
    (seed, image_id), over the image's expressions sorted by (ref_id, sent_id), so they do not
    depend on batching or processes.

    Args:
        expressions: per-expression dicts with identities and the ground truth, as ``gt_rle``
            (COCO RLE, :func:`dataset_expressions`) or ``gt_mask`` ((H, W) bool,
            :func:`iter_expressions`).
        split: split name stored in the records.
        seed: base seed.
        candidates: more objects to draw from, dicts with ``image_id``, ``object_id`` and
            ``gt_rle`` (:func:`referred_objects`); for a category-filtered split, the objects
            of the unfiltered one.

    Returns:
        ``(metrics, records)``; the records score the output ``random``.
    """
    # Masks are kept as RLE until their image is scored: a whole split would not fit in memory.
    objects: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for expr in expressions:
        rle = expr.get("gt_rle") or encode_rle(np.asarray(expr["gt_mask"]) != 0)
        objects[expr["image_id"]].setdefault(expr["object_id"], rle)
        by_image[expr["image_id"]].append(
            {k: v for k, v in expr.items() if k not in ("gt_mask", "gt_rle")}
        )
    for obj in candidates:
        if obj["image_id"] in by_image:
            objects[obj["image_id"]].setdefault(obj["object_id"], obj["gt_rle"])
    records = []
    for image_id in sorted(by_image):
        masks = {obj: decode_rle(rle) for obj, rle in objects[image_id].items()}
        candidates = sorted(masks)
        counts: dict[tuple[int, int], tuple[int, int]] = {}  # (drawn, true) -> (I, U)
        rng = np.random.default_rng([seed, image_id])
        for expr in sorted(by_image[image_id], key=lambda e: (e["ref_id"], e["sent_id"])):
            drawn, true = candidates[int(rng.integers(len(candidates)))], expr["object_id"]
            if (drawn, true) not in counts:
                counts[drawn, true] = mask_intersection_union(masks[drawn], masks[true])
            record = {**expr, "split": split, "random_object_id": drawn}
            score_output(record, "random", *counts[drawn, true])
            records.append(record)
    records = deduplicate(records)
    return summarize(records, "random"), records
