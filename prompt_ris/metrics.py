"""Referring-segmentation metrics from per-expression intersection / union counts.

Conventions (also in evaluation/README.md):

- A pixel is foreground when its probability is strictly greater than the threshold (0.5), i.e.
  ``logits > logit(threshold)`` (``logits > 0`` at 0.5). Masks are compared at the original image
  resolution against the ground truth ``mask > 0``.
- Per expression: ``I = |pred & gt|``, ``U = |pred | gt|``, ``IoU = I / U``; ``IoU = 1`` when
  ``U = 0`` (empty prediction of an empty ground truth; RefCOCO ground truths are never empty).
- oIoU = sum I / sum U over the split; mIoU = mean IoU over expressions (every sentence of every
  reference is one expression); P@X = share of expressions with IoU strictly greater than X
  ("higher than thresholds X", Sec. 4.1; the same ``>`` as CGFormer); ImgAcc / InstAcc = mean IoU
  per image / per object first, then the mean over images / objects (Sec. 4.4).
- All metric values are percentages (0-100), like the paper's tables.

A record is a plain dict, one per expression, so that lists of records can be gathered across
processes (``accelerate.utils.gather_object``) and deduplicated by (split, ref_id, sent_id):
``{"split", "ref_id", "sent_id", "image_id", "object_id", "category_id",
"<output>_intersection", "<output>_union", "<output>_iou"}`` for each scored output
(e.g. ``coarse``, ``final``, ``random``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

DEFAULT_THRESHOLD = 0.5  # probability above which a pixel is foreground (metrics and inference)
P_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # P@X columns
IDENTITY_KEYS = ("split", "ref_id", "sent_id", "image_id", "object_id", "category_id")


def threshold_logit(threshold: float) -> float:
    """The logit of a probability threshold: ``sigmoid(x) > t`` iff ``x > log(t / (1 - t))``."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
    return math.log(threshold / (1.0 - threshold))


def intersection_union(
    pred_logits: torch.Tensor | np.ndarray,
    gt_mask: np.ndarray | torch.Tensor,
    threshold: float = 0.5,
) -> tuple[int, int]:
    """Intersection and union pixel counts of one thresholded prediction with its ground truth.

    Args:
        pred_logits: (H, W) mask logits at the original resolution.
        gt_mask: (H, W) ground truth; nonzero is foreground.
        threshold: probability threshold; foreground is ``logits > logit(threshold)``.

    Returns:
        ``(intersection, union)`` as Python ints.
    """
    pred = torch.as_tensor(pred_logits).detach().float().cpu() > threshold_logit(threshold)
    return mask_intersection_union(pred, gt_mask)


def mask_intersection_union(
    pred_mask: torch.Tensor | np.ndarray, gt_mask: torch.Tensor | np.ndarray
) -> tuple[int, int]:
    """Intersection and union pixel counts of two (H, W) masks (nonzero is foreground)."""
    pred = torch.as_tensor(np.asarray(pred_mask) if not torch.is_tensor(pred_mask) else pred_mask)
    gt = torch.as_tensor(np.asarray(gt_mask) if not torch.is_tensor(gt_mask) else gt_mask)
    pred, gt = pred.cpu() != 0, gt.cpu() != 0
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in size; "
            "map the prediction back to the original image size first (frames.lowres_to_original)"
        )
    return int((pred & gt).sum()), int((pred | gt).sum())


def iou_from_counts(intersection: int, union: int) -> float:
    """``I / U``, and 1.0 for ``U = 0`` (an empty prediction of an empty ground truth)."""
    return intersection / union if union > 0 else 1.0


def score_output(record: dict[str, Any], output: str, intersection: int, union: int) -> None:
    """Store ``<output>_intersection``, ``<output>_union`` and ``<output>_iou`` in ``record``."""
    record[f"{output}_intersection"] = int(intersection)
    record[f"{output}_union"] = int(union)
    record[f"{output}_iou"] = iou_from_counts(intersection, union)


def record_key(record: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The identity of an expression: (split, ref_id, sent_id)."""
    return record["split"], record["ref_id"], record["sent_id"]


def deduplicate(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop repeated expressions (padding of distributed samplers), keep the first, sort.

    The result is sorted by (split, ref_id, sent_id), so it does not depend on how the
    expressions were spread over processes.
    """
    unique: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
    for record in records:
        unique.setdefault(record_key(record), record)
    return [unique[key] for key in sorted(unique, key=lambda k: (str(k[0]), k[1], k[2]))]


def _group_mean(ious: np.ndarray, groups: Sequence[Any]) -> float:
    """Mean over groups of the mean IoU within each group."""
    members: dict[Any, list[float]] = defaultdict(list)
    for group, value in zip(groups, ious):
        members[group].append(float(value))
    return float(np.mean([np.mean(values) for values in members.values()]))


def summarize(records: Sequence[dict[str, Any]], output: str = "final") -> dict[str, float]:
    """Metrics of one output over a set of expression records (percentages).

    Args:
        records: per-expression records (module docstring), already deduplicated.
        output: which scored output to summarize (``coarse``, ``final``, ``random``, ...).

    Returns:
        ``oIoU``, ``mIoU``, ``P@0.5`` ... ``P@0.9``, ``ImgAcc``, ``InstAcc`` (percent) and the
        counts ``num_expressions``, ``num_images``, ``num_objects``.
    """
    if not records:
        raise ValueError("no expressions to summarize; check that the split is not empty")
    missing = [k for k in (f"{output}_intersection", f"{output}_union") if k not in records[0]]
    if missing:
        raise KeyError(f"records have no '{output}' scores (missing {missing})")
    inter = np.array([r[f"{output}_intersection"] for r in records], dtype=np.float64)
    union = np.array([r[f"{output}_union"] for r in records], dtype=np.float64)
    ious = np.array([iou_from_counts(i, u) for i, u in zip(inter, union)])
    images = [(r["split"], r["image_id"]) for r in records]
    objects = [(r["split"], r["image_id"], r["object_id"]) for r in records]
    metrics = {
        "oIoU": 100.0 * inter.sum() / union.sum() if union.sum() > 0 else 100.0,
        "mIoU": 100.0 * ious.mean(),
    }
    for x in P_THRESHOLDS:
        metrics[f"P@{x}"] = 100.0 * float((ious > x).mean())
    metrics["ImgAcc"] = 100.0 * _group_mean(ious, images)
    metrics["InstAcc"] = 100.0 * _group_mean(ious, objects)
    metrics = {name: float(value) for name, value in metrics.items()}
    metrics["num_expressions"] = len(records)
    metrics["num_images"] = len(set(images))
    metrics["num_objects"] = len(set(objects))
    return metrics


def summarize_splits(
    records: Sequence[dict[str, Any]], outputs: Sequence[str] = ("coarse", "final")
) -> dict[str, dict[str, dict[str, float]]]:
    """``{split: {output: summarize(...)}}`` for every split present in ``records``."""
    by_split: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_split[record["split"]].append(record)
    return {
        split: {output: summarize(rows, output) for output in outputs}
        for split, rows in by_split.items()
    }
