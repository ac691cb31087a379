"""Evaluation batches of generated images with known objects, built through the real
letterbox and ``collate`` (shared by test_evaluation.py and test_baseline.py)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from prompt_ris.config import ModelConfig
from prompt_ris.data.batch import Batch
from prompt_ris.data.loader import collate
from prompt_ris.data.text import tokenize
from prompt_ris.data.transforms import letterbox_image, lowres_mask

SIZES = [(37, 90), (120, 64), (96, 96), (333, 500)]  # (H, W): wide, tall, square, large
EXPRESSIONS = ((0, 0, "the left blob"), (0, 1, "round thing"), (1, 2, "box"))  # (obj, sent, text)


def ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy + 0.5 - cy * h) / (ry * h)) ** 2 + ((xx + 0.5 - cx * w) / (rx * w)) ** 2 <= 1


def two_objects(h: int, w: int) -> list[np.ndarray]:
    """Two disjoint objects: an ellipse left, a rectangle right."""
    rect = np.zeros((h, w), dtype=bool)
    rect[h // 4 : 3 * h // 4, int(0.6 * w) : int(0.95 * w)] = True
    return [ellipse(h, w, 0.5, 0.28, 0.35, 0.22), rect]


def refer_batch(cfg: ModelConfig, image_ids: list[int]) -> Batch:
    """A collated evaluation batch of generated images, one item per image id.

    Image ``i`` has size SIZES[i % 4] and two objects; object 0 has two sentences, object 1 one.
    Object ids are ``100 i + obj``, ref ids ``10 i + obj``, sentence ids ``10 ref + sent``.
    """
    items = []
    for image_id in image_ids:
        h, w = SIZES[image_id % len(SIZES)]
        pixels = np.random.default_rng(image_id).integers(0, 256, (h, w, 3), dtype=np.uint8)
        frames = letterbox_image(Image.fromarray(pixels), cfg.clip.image_size, cfg.sam.image_size)
        objects = two_objects(h, w)
        texts = [text for _, _, text in EXPRESSIONS]
        refs = [10 * image_id + obj for obj, _, _ in EXPRESSIONS]
        masks = [objects[obj] for obj, _, _ in EXPRESSIONS]

        def long(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long)

        items.append(
            {
                "clip_image": frames.clip_image,
                "sam_image": frames.sam_image,
                "input_size": long(list(frames.input_size)),
                "orig_size": long(list(frames.orig_size)),
                "texts": texts,
                "text_tokens": tokenize(texts, cfg.clip.text_length),
                "object_ids": long([100 * image_id + obj for obj, _, _ in EXPRESSIONS]),
                "ref_ids": long(refs),
                "image_ids": long([image_id] * len(EXPRESSIONS)),
                "category_ids": long([1 + obj for obj, _, _ in EXPRESSIONS]),
                "sent_ids": long([10 * ref + s for ref, (_, s, _) in zip(refs, EXPRESSIONS)]),
                "word_masked": torch.zeros(len(EXPRESSIONS), dtype=torch.bool),
                "gt_masks": torch.stack([lowres_mask(m, cfg.sam.image_size) for m in masks])[
                    :, None
                ],
                "gt_masks_orig": masks,
            }
        )
    return collate(items)
