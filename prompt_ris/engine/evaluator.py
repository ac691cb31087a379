"""Evaluation loop: model predictions -> per-expression records -> metric tables.

Every expression (every sentence of every reference in the loader) becomes one record
(see :mod:`prompt_ris.metrics`) holding intersection / union counts of the coarse mask (S_C) and
of the final mask (S), both mapped back to the original image and thresholded at ``threshold``.
Records are gathered across processes with ``accelerate.utils.gather_object`` and deduplicated
by (split, ref_id, sent_id), so a sampler that pads shards with repeated samples does not count
them twice and the metrics are the same on 1 and N processes. The chance level beside these
figures comes from :mod:`prompt_ris.engine.baseline`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, send_to_device
from tqdm.auto import tqdm

from prompt_ris.data.batch import Batch
from prompt_ris.data.rle import encode_rle
from prompt_ris.metrics import (
    DEFAULT_THRESHOLD,
    deduplicate,
    intersection_union,
    score_output,
    summarize,
    threshold_logit,
)
from prompt_ris.models import PromptRIS, PromptSwitches

logger = logging.getLogger(__name__)

OUTPUTS = ("coarse", "final")  # scored model outputs: S_C (CLIP) and S (SAM)


def expression_identity(batch: Batch, k: int, split: str) -> dict[str, Any]:
    """The identity fields of expression ``k`` of a batch (the keys of a metrics record)."""
    return {
        "split": split,
        "ref_id": int(batch.ref_ids[k]),
        "sent_id": int(batch.sent_ids[k]),
        "image_id": int(batch.image_ids[k]),
        "object_id": int(batch.object_ids[k]),
        "category_id": int(batch.category_ids[k]),
        "text": batch.texts[k],
    }


def predict_original_logits(
    model: PromptRIS, batch: Batch, switches: PromptSwitches, with_sam: bool = True
) -> dict[str, list[torch.Tensor]]:
    """Run the model on a batch and map its masks back to the original images.

    Args:
        model: an unwrapped PromptRIS in eval mode.
        batch: a collated batch on the model's device.
        switches: PromptSwitches choosing the SAM prompts (Table 5).
        with_sam: also produce the final (SAM) mask; False scores only the coarse mask.

    Returns:
        ``{"coarse": [...], "final": [...]}``, each a list of B (H_b, W_b) float32 logits at the
        original size of expression b's image.
    """
    out = model(batch, with_sam=with_sam, switches=switches)
    return model.original_logits(out, batch.input_sizes, batch.orig_sizes, batch.image_index)


def score_batch(
    logits: dict[str, list[torch.Tensor]],
    batch: Batch,
    split: str,
    threshold: float = DEFAULT_THRESHOLD,
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
    if batch.gt_masks_orig is None:
        raise ValueError("the batch has no original-size masks; build the loader with_orig_masks")
    records = []
    for k, gt in enumerate(batch.gt_masks_orig):
        record = expression_identity(batch, k, split)
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
    loader: Iterable[Batch],
    accelerator: Accelerator,
    switches: PromptSwitches,
    split: str,
    threshold: float = DEFAULT_THRESHOLD,
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
