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

``point`` is the single-mask output (mask token 0, what Prompt-RIS reads); for the same click
``point_best_of_3`` is the best of SAM's three multimask outputs (tokens 1-3) against the object,
and ``point_whole_best_of_3`` the best of them against the click's group (the touching pair, the
outer shape with its inner one; objects in a group only). In the ambiguous world every figure is
also given per situation (``name/situation``: apart, outer, inner, touching).
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from prompt_ris.miniature.captions import sample_scene
from prompt_ris.miniature.synthetic import SITUATIONS
from prompt_ris.miniature.sam_pretrain import (
    SamPretrainConfig,
    SamSample,
    coarse_mask_logits,
    decode,
    decode_tokens,
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


def _ious(
    logits: torch.Tensor,
    sample: SamSample,
    sam_size: int,
    truths: list[np.ndarray] | None = None,
) -> list[float]:
    """IoU of each of N low-res logits (N, 1, s, s) with its (H, W) truth (the objects' masks by
    default), in the original frame."""
    pred = (to_original(logits, sample, sam_size) > 0).numpy()  # (N, H, W)
    out = []
    for p, gt in zip(pred, sample.masks if truths is None else truths):
        union = (p | gt).sum()
        out.append(float((p & gt).sum() / union) if union else 1.0)
    return out


def _best_of(logits: torch.Tensor, sample: SamSample, sam_size: int, truths=None) -> list[float]:
    """The best IoU among M outputs (N, M, s, s) per object."""
    per_output = [
        _ious(logits[:, j : j + 1], sample, sam_size, truths) for j in range(len(logits[0]))
    ]
    return [max(v) for v in zip(*per_output)]


@torch.no_grad()
def prompt_miou(
    sam: Sam, rng: random.Random, scenes: int = 150, world: str = "flat"
) -> dict[str, float]:
    """mIoU (%) over every visible object of ``scenes`` held-out scenes of ``world``, per prompt
    (and per situation, ``name/situation``, in the ambiguous world)."""
    sam.eval()
    sam_size = sam.image_encoder.img_size
    generator = torch.Generator().manual_seed(rng.getrandbits(32))
    ious: dict[str, list[tuple[str, float]]] = {}  # name -> (situation, IoU) per object

    def add(name: str, values: list[float], situations: list[str]) -> None:
        ious.setdefault(name, []).extend(zip(situations, values))

    for _ in range(scenes):
        sample = make_sample(sample_scene(rng, world=world), sam_size)
        embedding = sam.image_encoder(sample.image[None])  # (1, C, h, w)
        n = len(sample.masks)
        situations = sample.situations
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
        embeddings = embedding.expand(n, -1, -1, -1)  # (N, C, h, w)
        for name, (kind, masks) in runs.items():
            sparse, dense = encode_prompts(sam, kind, points, boxes, masks, clicks)
            logits, _ = decode(sam, embeddings, sparse, dense)
            add(name, _ious(logits, sample, sam_size), situations)
            if name == "point":
                three, _ = decode_tokens(sam, embeddings, sparse, dense)  # (N, 3, s, s)
                add("point_best_of_3", _best_of(three, sample, sam_size), situations)
                grouped = [k for k in range(n) if sample.groups[k] >= 0]
                if grouped:
                    wholes = [sample.group_masks[sample.groups[k]] for k in grouped]
                    best = _best_of(three[grouped], sample, sam_size, wholes)
                    add("point_whole_best_of_3", best, [situations[k] for k in grouped])
        add("coarse_prompt_only", _ious(clean, sample, sam_size), situations)
        add("coarse_degraded_prompt_only", _ious(degraded, sample, sam_size), situations)
    out = {name: 100.0 * float(np.mean([v for _, v in pairs])) for name, pairs in ious.items()}
    out["objects"] = len(ious["point"])
    if world != "flat":
        for situation in SITUATIONS:
            for name, pairs in ious.items():
                values = [v for s, v in pairs if s == situation]
                if values:
                    out[f"{name}/{situation}"] = 100.0 * float(np.mean(values))
            out[f"objects/{situation}"] = sum(s == situation for s, _ in ious["point"])
    return out
