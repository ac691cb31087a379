"""Tiny models on random weights: the ``tiny`` preset as most tests build it (the committed
miniature foundations the preset names are tested by test_miniature_foundations.py and
test_demo.py), and a small SAM image encoder."""

from __future__ import annotations

import copy
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT

TINY_RANDOM: dict[str, Any] = {
    "preset": "tiny",
    "clip": {"pretrained": None},
    "sam": {"checkpoint": None},
}
TINY_RANDOM_ARGS = ["model.preset=tiny", "model.clip.pretrained=null", "model.sam.checkpoint=null"]


def tiny_random(**sections: dict[str, Any]) -> dict[str, Any]:
    """A ``model`` section: the tiny preset on random base weights, with ``sections`` merged in
    (e.g. ``tiny_random(clip={"image_size": 64})``)."""
    model = copy.deepcopy(TINY_RANDOM)
    for name, values in sections.items():
        model.setdefault(name, {}).update(values)
    return model


def tiny_sam_encoder(seed: int = 0) -> ImageEncoderViT:
    """Real SAM encoder, 8x8 tokens: block 0 windowed (3x3 windows, padded to 9x9), block 1 global.

    Every parameter is random, the relative-position tables included (upstream zero-inits them,
    which would make the bias path untested).
    """
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        img_size=64,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        out_chans=16,
        use_rel_pos=True,
        window_size=3,
        global_attn_indexes=(1,),
    )
    with torch.no_grad():
        for param in encoder.parameters():
            param.normal_(0.0, 0.5 if param.dim() < 2 else 0.2)
    return encoder.eval()
