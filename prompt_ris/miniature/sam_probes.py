"""What the tiny SAM learnt: mask IoU per prompt kind on held-out synthetic scenes.

Every visible object of every scene is segmented from each prompt; masks are compared in the
original image frame (SAM's ``postprocess_masks`` steps: low-res -> SAM frame -> crop -> original
size, threshold at logit 0). Prompts:

- ``point``: one random pixel of the object; ``box``: its exact box;
- ``coarse``: the ground truth pooled to the coarse grid (16 x 16, the tiny CLIP's patch grid) as
  clean logits, the best coarse mask Prompt-RIS could hand over; ``coarse_degraded``: a coarse
  mask degraded at random as in training (blur, shift, leak onto another object, noise);
- ``point+coarse``, ``point+coarse_degraded``: a click and that coarse mask together;
- ``clicks+coarse_degraded``: clicks on and off the object, drawn as in pretraining, with a degraded
  coarse mask.

``*_prompt_only`` rows score the coarse mask itself (its logits thresholded at 0), so the
difference is what SAM adds.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from prompt_ris.miniature.captions import sample_scene
from prompt_ris.miniature.sam_pretrain import (
    SamPretrainConfig,
    SamSample,
    coarse_mask_logits,
    decode,
    encode_prompts,
    make_sample,
    object_box,
    pad_clicks,
    random_clicks,
    random_coarse_mask,
    random_point,
)

EVAL_GRID = 16  # coarse grid of the clean coarse mask (tiny CLIP: 128 / 8)
EVAL_CONFIDENCE = 8.0
TRAINING = SamPretrainConfig()  # degraded masks and clicks are drawn as in pretraining


def to_original(logits: torch.Tensor, sample: SamSample, sam_size: int) -> torch.Tensor:
    """Low-res logits (N, 1, s, s) -> original-frame logits (N, H, W)."""
    h, w = sample.input_size
    orig = sample.masks[0].shape
    x = F.interpolate(logits, (sam_size, sam_size), mode="bilinear", align_corners=False)
    x = F.interpolate(x[..., :h, :w], orig, mode="bilinear", align_corners=False)
    return x[:, 0]


def _ious(logits: torch.Tensor, sample: SamSample, sam_size: int) -> list[float]:
    pred = (to_original(logits, sample, sam_size) > 0).numpy()  # (N, H, W)
    out = []
    for p, gt in zip(pred, sample.masks):
        union = (p | gt).sum()
        out.append(float((p & gt).sum() / union) if union else 1.0)
    return out


@torch.no_grad()
def prompt_miou(sam: Sam, rng: random.Random, scenes: int = 150) -> dict[str, float]:
    """mIoU (%) over every visible object of ``scenes`` held-out scenes, per prompt."""
    sam.eval()
    sam_size = sam.image_encoder.img_size
    generator = torch.Generator().manual_seed(rng.getrandbits(32))
    ious: dict[str, list[float]] = {}
    for _ in range(scenes):
        sample = make_sample(sample_scene(rng), sam_size)
        embedding = sam.image_encoder(sample.image[None])  # (1, C, h, w)
        n = len(sample.masks)
        points = torch.tensor([random_point(m, sample.scale, rng) for m in sample.masks]).float()
        boxes = torch.tensor([object_box(m, sample.scale) for m in sample.masks]).float()
        clean = torch.stack(
            [coarse_mask_logits(g, EVAL_GRID, EVAL_CONFIDENCE) for g in sample.gt_lowres]
        )  # (N, 1, s, s)
        degraded = torch.stack(
            [random_coarse_mask(sample, k, rng, generator, TRAINING.leak_prob) for k in range(n)]
        )
        most = (TRAINING.max_positive_clicks, TRAINING.max_negative_clicks)
        clicks = pad_clicks([random_clicks(sample, k, rng, *most) for k in range(n)])
        runs = {
            "point": ("point", None),
            "box": ("box", None),
            "coarse": ("mask", clean),
            "coarse_degraded": ("mask", degraded),
            "point+coarse": ("point+mask", clean),
            "point+coarse_degraded": ("point+mask", degraded),
            "clicks+coarse_degraded": ("clicks+mask", degraded),
        }
        for name, (kind, masks) in runs.items():
            sparse, dense = encode_prompts(sam, kind, points, boxes, masks, clicks)
            logits, _ = decode(sam, embedding.expand(n, -1, -1, -1), sparse, dense)
            ious.setdefault(name, []).extend(_ious(logits, sample, sam_size))
        ious.setdefault("coarse_prompt_only", []).extend(_ious(clean, sample, sam_size))
        ious.setdefault("coarse_degraded_prompt_only", []).extend(_ious(degraded, sample, sam_size))
    out = {name: 100.0 * float(np.mean(v)) for name, v in ious.items()}
    out["objects"] = len(ious["point"])
    return out
