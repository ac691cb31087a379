"""Attention blocks shared by the prompting, decoding and prompt-making modules."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Two-layer feed-forward block ``Linear -> GELU -> Linear``."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttention(nn.Module):
    """Pre-norm multi-head attention of ``query`` tokens over ``context`` tokens (no residual).

    Used for CrossAttn(., .) of eqs. (1), (5) and (6) and for the text prompter. With
    ``context = query`` it is plain self-attention.

    Args:
        dim: width of the query and context tokens (and of the output).
        num_heads: attention heads; must divide ``dim``.
        dropout: attention dropout.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)

    def forward(
        self,
        query: torch.Tensor,
        context: torch.Tensor,
        context_pad_mask: torch.Tensor | None = None,
        context_pos: torch.Tensor | None = None,
        value_pos: torch.Tensor | None = None,
        key_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``query`` to ``context``.

        Args:
            query: (B, Q, dim).
            context: (B, K, dim).
            context_pad_mask: (B, K) bool, True where a context token is padding (ignored).
            context_pos: optional (B or 1, K, dim) position embedding added to the keys.
            value_pos: optional (B or 1, K, dim) position embedding added to the values, so
                that what a query reads carries where it was read.
            key_context: optional (B, K, dim) tokens the keys are made from instead of
                ``context`` (the values are always made from ``context``).

        Returns:
            (B, Q, dim).
        """
        q, k, v = self._qkv(query, context, context_pos, value_pos, key_context)
        return self.attn(q, k, v, key_padding_mask=context_pad_mask, need_weights=False)[0]

    def forward_with_weights(
        self,
        query: torch.Tensor,
        context: torch.Tensor,
        context_pad_mask: torch.Tensor | None = None,
        context_pos: torch.Tensor | None = None,
        value_pos: torch.Tensor | None = None,
        key_context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s output (B, Q, dim) and where each query token looks: the (B, Q, K)
        attention weights, averaged over heads."""
        q, k, v = self._qkv(query, context, context_pos, value_pos, key_context)
        return self.attn(q, k, v, key_padding_mask=context_pad_mask, need_weights=True)

    def _qkv(
        self,
        query: torch.Tensor,
        context: torch.Tensor,
        context_pos: torch.Tensor | None,
        value_pos: torch.Tensor | None,
        key_context: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised queries, keys (with ``context_pos``) and values (with ``value_pos``)."""
        kv = self.norm_kv(context)
        k = kv if key_context is None else self.norm_kv(key_context)
        k = k if context_pos is None else k + context_pos
        v = kv if value_pos is None else kv + value_pos
        return self.norm_q(query), k, v
