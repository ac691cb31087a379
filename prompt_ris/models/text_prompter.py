"""The learned text prompter: CLIP text tokens -> SAM sparse prompt tokens P_text (Sec. 3.1).

Two blocks of self-attention over the expression's tokens and cross-attention to the SAM image
embedding F_IS of its image turn F_T (width D_T) into tokens in SAM's prompt space (width D_S). It
is the only prompt maker with weights of its own: the mask and point prompts are made with SAM's
frozen prompt encoder (``frozen_sam.FrozenSAM``).

The prompter starts at SAM's padding token (``TextPrompter.start_from``): the frozen decoder first
sees text tokens it knows from its pretraining as "no prompt here", and learns from there what the
words add.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from prompt_ris.config import TEXT_KEYS, TEXT_POSITIONS
from prompt_ris.models.layers import MLP, CrossAttention


class _TextPromptBlock(nn.Module):
    """Self-attention over the text tokens, cross-attention to the SAM image tokens, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, position: str) -> None:
        super().__init__()
        self.pos_in_keys = "keys" in position
        self.pos_in_values = "values" in position
        self.self_attn = CrossAttention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(
        self,
        x: torch.Tensor,
        pad_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        image_pos: torch.Tensor,
        key_tokens: torch.Tensor | None = None,
        maps: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(x, x, pad_mask)
        key_pos = image_pos if self.pos_in_keys else None
        value_pos = image_pos if self.pos_in_values else None
        attend = dict(context_pos=key_pos, value_pos=value_pos, key_context=key_tokens)
        if maps is None:
            x = x + self.cross_attn(x, image_tokens, **attend)
        else:
            read, weights = self.cross_attn.forward_with_weights(x, image_tokens, **attend)
            maps.append(weights)  # (B, L, hw): where each text token reads the image
            x = x + read
        return x + self.mlp(self.norm(x))


class TextPrompter(nn.Module):
    """P_text (Sec. 3.1): CLIP text tokens F_T -> SAM sparse tokens conditioned on F_IS.

    F_T is projected to D_S and passed through ``num_blocks`` blocks of self-attention (padding
    after [EOS] masked), cross-attention to the SAM image embedding of the expression's image
    (SAM's dense position encoding added where ``position`` says: to the keys, the values or
    both) and an MLP, then a final LayerNorm. The positions after [EOS] are left as they come out:
    ``FrozenSAM.embed_prompts`` leaves them out.

    Args:
        text_dim: D_T of the CLIP text tokens.
        dim: D_S, SAM's prompt width.
        num_blocks: number of blocks (2 in the paper).
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        position: where SAM's dense position encoding enters the cross-attention to F_IS:
            ``"keys"`` (where a token looks), ``"values"`` (what it reads back, so that a token
            can say where the referent is, as a point prompt does) or ``"keys+values"``.
        keys: how the cross-attention keys are made from F_IS: ``"linear"`` (the paper: the
            attention's own projection of each cell) or ``"mlp"`` (each cell first through a
            residual MLP shared by the blocks, ``F_IS + MLP(LN(F_IS))``, so that what SAM's
            features hold non-linearly can be matched by the words; it starts as the identity).
            The values are F_IS either way.
    """

    def __init__(
        self,
        *,
        text_dim: int,
        dim: int,
        num_blocks: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        position: str = "keys",
        keys: str = "linear",
    ) -> None:
        super().__init__()
        if position not in TEXT_POSITIONS:
            raise ValueError(f"position must be one of {TEXT_POSITIONS}, got {position!r}")
        if keys not in TEXT_KEYS:
            raise ValueError(f"keys must be one of {TEXT_KEYS}, got {keys!r}")
        self.in_proj = nn.Linear(text_dim, dim)
        self.key_reader: nn.Sequential | None = None
        if keys == "mlp":
            self.key_reader = nn.Sequential(nn.LayerNorm(dim), MLP(dim, int(dim * mlp_ratio)))
            nn.init.zeros_(self.key_reader[1].fc2.weight)
            nn.init.zeros_(self.key_reader[1].fc2.bias)
        self.blocks = nn.ModuleList(
            _TextPromptBlock(dim, num_heads, mlp_ratio, position) for _ in range(num_blocks)
        )
        self.out_norm = nn.LayerNorm(dim)

    @torch.no_grad()
    def start_from(self, token: torch.Tensor) -> None:
        """Make every output token equal ``token`` (D_S,) until training moves it: the final
        LayerNorm's scale is set to 0 and its shift to ``token``.

        ``build_parts`` passes SAM's padding token ``not_a_point_embed``. Only the final
        LayerNorm receives a gradient in the first step; the layers below it do from the second.
        """
        self.out_norm.weight.zero_()
        self.out_norm.bias.copy_(token.reshape(-1))

    def forward(
        self,
        text_tokens: torch.Tensor,
        text_pad_mask: torch.Tensor,
        sam_img_embed: torch.Tensor,
        image_index: torch.Tensor,
        image_pe: torch.Tensor,
        maps: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Make text prompts.

        Args:
            text_tokens: F_T, (B, L, D_T).
            text_pad_mask: (B, L) bool, True after [EOS].
            sam_img_embed: F_IS, (I, D_S, h_s, w_s).
            image_index: (B,) expression -> image row.
            image_pe: (1, D_S, h_s, w_s) SAM's dense position encoding.
            maps: when given, each block's cross-attention weights (B, L, h_s w_s), averaged
                over heads, are appended to it.

        Returns:
            (B, L, D_S) sparse text tokens.
        """
        cells = rearrange(sam_img_embed, "i c h w -> i (h w) c")  # (I, hw, D_S)
        image_tokens = cells[image_index]  # (B, hw, D_S)
        key_tokens = None
        if self.key_reader is not None:  # once per image, then per expression
            key_tokens = (cells + self.key_reader(cells))[image_index]  # (B, hw, D_S)
        image_pos = rearrange(image_pe, "1 c h w -> 1 (h w) c")  # (1, hw, D_S)
        x = self.in_proj(text_tokens)  # (B, L, D_S)
        for block in self.blocks:
            x = block(x, text_pad_mask, image_tokens, image_pos, key_tokens, maps)
        return self.out_norm(x)  # (B, L, D_S)
