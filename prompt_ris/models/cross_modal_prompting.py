"""Cross-Modal Prompting (CMP, Sec. 3.2): V2L and L2V prompt tokens, eqs. (5)-(6).

At every CLIP layer a small set of ``n`` learnable queries cross-attends to the other modality's
tokens of the previous layer; the result, projected to this modality's width, is prepended to the
next layer's input (deep prompting; the prompt outputs are dropped after the layer).
"""

from __future__ import annotations

import torch
from torch import nn

from prompt_ris.models.layers import CrossAttention

QUERY_INIT_STD = 0.02  # ViT-style init of the learnable query tokens T_V / T_L


class _CrossModalPrompter(nn.Module):
    """``n`` learnable queries -> cross-attention to context tokens -> linear projection."""

    def __init__(self, *, num_prompts: int, query_dim: int, out_dim: int, num_heads: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_prompts, query_dim) * QUERY_INIT_STD)
        self.cross_attn = CrossAttention(query_dim, num_heads)
        self.proj = nn.Linear(query_dim, out_dim)

    def forward(
        self, context: torch.Tensor, context_pad_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Make prompt tokens from ``context`` (B, N, query_dim) -> (B, n, out_dim)."""
        queries = self.queries.unsqueeze(0).expand(context.shape[0], -1, -1)  # (B, n, D_q)
        queries = queries + self.cross_attn(queries, context, context_pad_mask)
        return self.proj(queries)  # (B, n, D_out)


class V2LPrompter(_CrossModalPrompter):
    """Vision-to-Language prompts, eq. (5): T^i_V2L = CrossAttn(T^i_V, F^i_IC), projected to D_t.

    Args:
        num_prompts: n, the number of learnable queries T^i_V.
        vision_dim: D_v, width of the queries and of the image tokens.
        text_dim: D_t, width of the produced prompt tokens.
        num_heads: heads of the cross-attention.
    """

    def __init__(self, *, num_prompts: int, vision_dim: int, text_dim: int, num_heads: int) -> None:
        super().__init__(
            num_prompts=num_prompts, query_dim=vision_dim, out_dim=text_dim, num_heads=num_heads
        )

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens [CLS; patches] (B, 1+h*w, D_v) -> V2L prompts (B, n, D_t)."""
        return super().forward(image_tokens)


class L2VPrompter(_CrossModalPrompter):
    """Language-to-Vision prompts, eq. (6): T^i_L2V = CrossAttn(T^i_L, F^i_T), projected to D_v.

    Args:
        num_prompts: n, the number of learnable queries T^i_L.
        text_dim: D_t, width of the queries and of the text tokens.
        vision_dim: D_v, width of the produced prompt tokens.
        num_heads: heads of the cross-attention.
    """

    def __init__(self, *, num_prompts: int, text_dim: int, vision_dim: int, num_heads: int) -> None:
        super().__init__(
            num_prompts=num_prompts, query_dim=text_dim, out_dim=vision_dim, num_heads=num_heads
        )

    def forward(self, text_tokens: torch.Tensor, text_pad_mask: torch.Tensor) -> torch.Tensor:
        """Text tokens (B, L, D_t), padding after [EOS] (B, L) True -> L2V prompts (B, n, D_v)."""
        return super().forward(text_tokens, text_pad_mask)
