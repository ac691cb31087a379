"""Cross-modal decoder: t_g, F'_IC and the coarse mask S'_C (Sec. 3.1, eqs. 1-2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from prompt_ris.models.layers import MLP, CrossAttention


@dataclass
class CoarseOutput:
    """Outputs of the cross-modal decoder (CLIP frame).

    Attributes:
        coarse_logits: S'_C, (B, 1, h, w) pre-sigmoid logits on the CLIP token grid.
        text_global: t_g, (B, D_C) decoded text feature at [EOS].
    """

    coarse_logits: torch.Tensor
    text_global: torch.Tensor


class _CrossBlock(nn.Module):
    """Residual cross-attention + residual FFN (pre-norm)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.cross_attn = CrossAttention(dim, num_heads, dropout=dropout)
        self.norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_pad_mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.drop(self.cross_attn(x, context, context_pad_mask))
        return x + self.drop(self.mlp(self.norm(x)))


class CoarseDecoder(nn.Module):
    """Eqs. (1)-(2): F'_IC = CrossAttn(F_IC, F_T), F'_T = CrossAttn(F_T, F_IC), S'_C = F'_IC t_g.

    Both modalities are projected to D_C; each attends to the other's projected tokens (the two
    cross-attentions read the same inputs); t_g is F'_T at [EOS]. The response map is scaled by
    a learnable factor (initialised to 1/sqrt(D_C)) plus a learnable bias so that the initial
    logits are of order one.

    Args:
        vision_dim: D_IC of the CLIP image tokens.
        text_dim: D_T of the CLIP text tokens.
        dim: D_C, decoder width.
        num_heads: attention heads.
        mlp_ratio: FFN hidden width / dim.
        dropout: dropout in attention and FFN.
    """

    def __init__(
        self,
        *,
        vision_dim: int,
        text_dim: int,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.img_proj = nn.Linear(vision_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.img_block = _CrossBlock(dim, num_heads, mlp_ratio, dropout)
        self.text_block = _CrossBlock(dim, num_heads, mlp_ratio, dropout)
        self.img_norm = nn.LayerNorm(dim)
        self.text_norm = nn.LayerNorm(dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / math.sqrt(dim))))
        self.logit_bias = nn.Parameter(torch.zeros(()))

    def forward(
        self,
        img_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_pad_mask: torch.Tensor,
        eos_index: torch.Tensor,
        grid_size: tuple[int, int],
    ) -> CoarseOutput:
        """Decode the coarse mask.

        Args:
            img_tokens: F_IC, (B, h*w, D_IC).
            text_tokens: F_T, (B, L, D_T).
            text_pad_mask: (B, L) bool, True after [EOS].
            eos_index: (B,) position of [EOS].
            grid_size: (h, w) of the image token grid.

        Returns:
            CoarseOutput with coarse_logits (B, 1, h, w).
        """
        img = self.img_proj(img_tokens)  # (B, h*w, D_C)
        txt = self.text_proj(text_tokens)  # (B, L, D_C)
        img, txt = (
            self.img_norm(self.img_block(img, txt, text_pad_mask)),  # eq. (1) F'_IC
            self.text_norm(self.text_block(txt, img, None)),  # eq. (1) F'_T
        )
        text_global = txt[torch.arange(txt.shape[0], device=txt.device), eos_index]  # (B, D_C)
        response = torch.einsum("bnd,bd->bn", img, text_global)  # eq. (2): (B, h*w)
        logits = response * self.logit_scale.exp() + self.logit_bias
        h, w = grid_size
        coarse_logits = rearrange(logits, "b (h w) -> b 1 h w", h=h, w=w)  # (B, 1, h, w)
        return CoarseOutput(coarse_logits=coarse_logits, text_global=text_global)
