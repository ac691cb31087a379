"""Convolutional stem beside CLIP's patch embedding, for a CLIP image tower trained from scratch.

A ViT trained from scratch on a few thousand images learns shape slowly: its patch embedding is
one linear map per patch, and the inside of a flat object looks the same in every shape.
Early convolutions fix this (Xiao et al., "Early Convolutions Help Transformers See Better",
NeurIPS 2021). The stem keeps the patch embedding (colour and texture, learnt in a few steps)
and adds a small CNN branch whose 1x1 output projection starts at zero, so the tower starts as
the plain ViT. Its interface is the patch embedding's, (I, 3, S, S) -> (I, D, S / p, S / p), so
the rest of open_clip's ``VisionTransformer`` runs unchanged.

Measured on the synthetic shapes (colour and shape expressions; coarse mIoU on 600 expressions
of ``synthetic:val`` after 800 stage-1 steps of 8 images x 4 expressions): 48.8 with the patch
embedding alone (lr 2e-3; shape-only expressions such as "the cross" 17.5), 58.3 with this stem
(lr 1e-3; shape-only 49.7). BatchNorm in place of GroupNorm reached 67.8 (shape-only 51.0), but
its batch statistics differ between DDP processes (and SyncBatchNorm needs a GPU), so the stem
uses GroupNorm. The demo used it while it trained CLIP from random weights; it now builds on a
pretrained miniature CLIP (docs/design.md, "The embedded default") and no shipped config uses
the stem. Pretrained CLIP weights carry the patch embedding they were trained with, so
``build_clip`` refuses the combination.
"""

from __future__ import annotations

import math

import torch
from torch import nn


GROUPS = 8  # GroupNorm groups: per-image statistics, so no running buffers and the same
# result in training and evaluation, on one process or many, for any batch size


def _conv_block(in_ch: int, out_ch: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(GROUPS, out_ch),
        nn.GELU(),
    ]


class ConvStem(nn.Module):
    """CLIP's patch embedding plus a CNN branch on the same patch grid.

    The branch: ``log2(patch_size)`` stride-2 3x3 blocks (conv, GroupNorm, GELU; channels
    ``channels // 2**k`` up to ``channels``), ``extra_layers`` stride-1 blocks at the patch grid,
    and a zero-initialised 1x1 convolution to ``out_dim``.

    Args:
        out_dim: ViT width D_IC.
        patch_size: total stride; a power of two.
        channels: width of the last blocks.
        extra_layers: stride-1 blocks at the patch grid.
    """

    def __init__(
        self, *, out_dim: int, patch_size: int, channels: int = 64, extra_layers: int = 3
    ) -> None:
        super().__init__()
        downsamples = int(round(math.log2(patch_size))) if patch_size > 0 else 0
        if patch_size < 2 or 2**downsamples != patch_size:
            raise ValueError(
                f"model.clip.stem=conv needs a power-of-two patch_size (>= 2), got {patch_size}; "
                f"change model.clip.patch_size or set model.clip.stem=patch"
            )
        if channels % (GROUPS * 2 ** (downsamples - 1)):
            raise ValueError(
                f"model.clip.stem_channels={channels} must be a multiple of "
                f"{GROUPS * 2 ** (downsamples - 1)} for patch_size {patch_size}"
            )
        self.patch = nn.Conv2d(3, out_dim, kernel_size=patch_size, stride=patch_size, bias=False)
        layers: list[nn.Module] = []
        in_ch = 3
        for k in reversed(range(downsamples)):
            out_ch = channels // 2**k
            layers += _conv_block(in_ch, out_ch, stride=2)
            in_ch = out_ch
        for _ in range(extra_layers):
            layers += _conv_block(channels, channels, stride=1)
        project = nn.Conv2d(channels, out_dim, kernel_size=1)
        nn.init.zeros_(project.weight)  # the tower starts as the plain ViT
        nn.init.zeros_(project.bias)
        self.branch = nn.Sequential(*layers, project)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(I, 3, S, S) -> (I, D_IC, S / p, S / p)."""
        return self.patch(images) + self.branch(images)
