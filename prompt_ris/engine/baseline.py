"""The random-object baseline: chance level for "which object of this image is meant".

For each expression it scores the ground-truth mask of an object drawn uniformly from the
referred objects of the same image (the true one included), with a generator seeded by
(seed, image_id). For a category-filtered split (``test_unseen``) the objects to draw from are
those of the unfiltered split (``test``): the image still shows its other objects.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from prompt_ris.data.batch import Batch
from prompt_ris.data.rle import decode_rle, encode_rle
from prompt_ris.metrics import deduplicate, mask_intersection_union, score_output, summarize


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


def iter_expressions(loader: Iterable[Batch]) -> Iterator[dict[str, Any]]:
    """Expressions of an evaluation loader as dicts with identities and ``gt_mask`` (H, W) bool."""
    for batch in loader:
        for k, gt in enumerate(batch.gt_masks_orig or ()):
            yield {**expression_identity(batch, k, ""), "gt_mask": np.asarray(gt) != 0}


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
