"""The typed batch: what ``collate`` builds and the model, the losses and the engine read,
and a random one for tests and benchmarks.

:class:`ModelInputs` is what ``PromptRIS.forward`` needs (images of I images, tokens of B
expressions, and which image each expression is about); :class:`Batch` adds the targets and the
identities that training and evaluation read. Shape letters: I images, b expressions per image
(it may vary per image in evaluation), B expressions, L tokens, S_c / S_s the CLIP / SAM frame
sides (see :mod:`prompt_ris.frames`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prompt_ris.config import Config
from prompt_ris.data.text import EOT_TOKEN, SOT_TOKEN
from prompt_ris.frames import LOWRES_FACTOR, resized_shape


@dataclass
class ModelInputs:
    """Inputs of one forward pass over B expressions about I images.

    Attributes:
        clip_images: (I, 3, S_c, S_c) CLIP-normalised letterboxed images.
        sam_images: (I, 3, S_s, S_s) SAM-normalised letterboxed images.
        text_tokens: (B, L) long, ``tokenize(texts, L)``.
        image_index: (B,) long, expression -> image row (sorted; b per image in training).
    """

    clip_images: torch.Tensor
    sam_images: torch.Tensor
    text_tokens: torch.Tensor
    image_index: torch.Tensor

    @property
    def num_images(self) -> int:
        """I."""
        return int(self.clip_images.shape[0])

    @property
    def num_expressions(self) -> int:
        """B."""
        return int(self.text_tokens.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Any:
        """A copy with every tensor on ``device`` (other fields shared); accelerate's
        ``send_to_device`` calls this."""
        return dataclasses.replace(
            self,
            **{
                f.name: value.to(device, non_blocking=non_blocking)
                for f in dataclasses.fields(self)
                if isinstance(value := getattr(self, f.name), torch.Tensor)
            },
        )


@dataclass
class Batch(ModelInputs):
    """A collated batch of I images x their expressions (``data.loader.collate``).

    Attributes:
        object_ids: (B,) long, annotated object (ann_id) of each expression: ICL's Y (eq. 8).
        gt_masks: (B, 1, S_s/4, S_s/4) float in [0, 1], ground truth in the low-res frame
            (area-averaged, so border pixels are fractional).
        input_sizes: (I, 2) long, (h', w') of each resized image in the SAM frame.
        orig_sizes: (I, 2) long, (H, W) of each original image.
        texts: the B expressions.
        ref_ids: (B,) long, reference of each expression.
        sent_ids: (B,) long, sentence of each expression.
        image_ids: (B,) long, image of each expression.
        category_ids: (B,) long, category of the referred object.
        word_masked: (B,) bool, True for filler expressions with words masked out (training).
        gt_masks_orig: B (H, W) bool arrays in the original frame (evaluation only, else None).
    """

    object_ids: torch.Tensor
    gt_masks: torch.Tensor
    input_sizes: torch.Tensor
    orig_sizes: torch.Tensor
    texts: list[str]
    ref_ids: torch.Tensor
    sent_ids: torch.Tensor
    image_ids: torch.Tensor
    category_ids: torch.Tensor
    word_masked: torch.Tensor
    gt_masks_orig: list[np.ndarray] | None = None


RANDOM_ORIG_SIZE = (480, 640)  # (H, W) of random_batch's originals, a typical COCO image


def random_batch(
    cfg: Config,
    num_images: int,
    expressions_per_image: int,
    *,
    seed: int = 0,
) -> Batch:
    """A seeded batch of random images and tokens with box-shaped ground truths (CPU), every
    original image of size ``RANDOM_ORIG_SIZE``.

    For tests and ``scripts/benchmark.py``: speed and shapes do not depend on what the pixels
    show. Every expression has a random number of random BPE words (``[SOS] words [EOS] 0 ...``
    at ``model.clip.text_length``); the expressions of an image refer to two objects in turn
    (object ids ``10 * image + {0, 1}``), so ICL sees both same-object and other-object pairs.

    Args:
        cfg: the config (frame sizes and text length of its model).
        num_images: I.
        expressions_per_image: b.
        seed: the generator seed.
    """
    gen = torch.Generator().manual_seed(seed)
    num, length = num_images * expressions_per_image, cfg.model.clip.text_length
    s_c, s_s = cfg.model.clip.image_size, cfg.model.sam.image_size
    tokens = torch.zeros(num, length, dtype=torch.long)  # [SOS] words [EOS] 0 ...
    for row in range(num):
        words = int(torch.randint(1, length - 1, (1,), generator=gen))
        tokens[row, 0], tokens[row, words + 1] = SOT_TOKEN, EOT_TOKEN
        tokens[row, 1 : words + 1] = torch.randint(1, SOT_TOKEN, (words,), generator=gen)
    image_index = torch.arange(num_images).repeat_interleave(expressions_per_image)  # (B,)
    lowres = s_s // LOWRES_FACTOR
    gt = torch.zeros(num, 1, lowres, lowres)  # one random box per expression, low-res frame
    for row in range(num):
        y0, x0 = torch.randint(0, lowres // 2, (2,), generator=gen).tolist()
        gt[row, 0, y0 : y0 + lowres // 3, x0 : x0 + lowres // 2] = 1.0
    input_size = resized_shape(*RANDOM_ORIG_SIZE, s_s)
    ids = torch.arange(num)
    return Batch(
        clip_images=torch.randn(num_images, 3, s_c, s_c, generator=gen),
        sam_images=torch.randn(num_images, 3, s_s, s_s, generator=gen),
        text_tokens=tokens,
        image_index=image_index,
        object_ids=image_index * 10 + ids % 2,
        gt_masks=gt,
        input_sizes=torch.tensor([list(input_size)] * num_images),
        orig_sizes=torch.tensor([list(RANDOM_ORIG_SIZE)] * num_images),
        texts=[f"random expression {k}" for k in range(num)],
        ref_ids=ids.clone(),
        sent_ids=ids + 100,
        image_ids=image_index + 1000,
        category_ids=torch.ones(num, dtype=torch.long),
        word_masked=torch.zeros(num, dtype=torch.bool),
    )
