"""Cross-Modal Prompting (CMP, Sec. 3.2, eqs. 5-6): CLIP's two towers prompting each other.

At every CLIP layer a small set of ``n`` learnable queries cross-attends to the other modality's
tokens of the previous layer; the result, projected to this modality's width, is prepended to the
next layer's input and its outputs are dropped after the layer (deep prompting):

- eq. (5), Vision-to-Language: ``T_V2L = CrossAttn(T_V, F_IC)`` (:class:`V2LPrompter`), placed
  before the text tokens;
- eq. (6), Language-to-Vision: ``T_L2V = CrossAttn(T_L, F_T)`` (:class:`L2VPrompter`), placed
  before [CLS].

:class:`PromptedCLIP` runs open_clip's towers layer by layer with these prompts. The open_clip
``CLIP`` module is held unchanged as ``PromptedCLIP.clip`` so that open_clip state dicts load into
it as they are; only the loop over ``transformer.resblocks`` is new.

The image tower's input comes from open_clip's private ``VisionTransformer._embeds`` (patch
embedding, [CLS], position embedding, patch dropout, ``ln_pre``; open_clip 2.32.0 and later):
open_clip has no public call that stops before the blocks, and calling it keeps open_clip's own
handling of those steps instead of a copy. ``tests/test_cross_modal_prompting.py`` holds both
towers with ``num_prompts = 0`` to open_clip's ``forward_intermediates`` and ``encode_text``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.model import CLIP
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
    """Vision-to-Language prompts, eq. (5): T^i_V2L = CrossAttn(T^i_V, F^i_IC), projected to D_T.

    Args:
        num_prompts: n, the number of learnable queries T^i_V.
        vision_dim: D_IC, width of the queries and of the image tokens.
        text_dim: D_T, width of the produced prompt tokens.
        num_heads: heads of the cross-attention.
    """

    def __init__(self, *, num_prompts: int, vision_dim: int, text_dim: int, num_heads: int) -> None:
        super().__init__(
            num_prompts=num_prompts, query_dim=vision_dim, out_dim=text_dim, num_heads=num_heads
        )

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens [CLS; patches] (B, 1+h*w, D_IC) -> V2L prompts (B, n, D_T)."""
        return super().forward(image_tokens)


class L2VPrompter(_CrossModalPrompter):
    """Language-to-Vision prompts, eq. (6): T^i_L2V = CrossAttn(T^i_L, F^i_T), projected to D_IC.

    Args:
        num_prompts: n, the number of learnable queries T^i_L.
        text_dim: D_T, width of the queries and of the text tokens.
        vision_dim: D_IC, width of the produced prompt tokens.
        num_heads: heads of the cross-attention.
    """

    def __init__(self, *, num_prompts: int, text_dim: int, vision_dim: int, num_heads: int) -> None:
        super().__init__(
            num_prompts=num_prompts, query_dim=text_dim, out_dim=vision_dim, num_heads=num_heads
        )

    def forward(self, text_tokens: torch.Tensor, text_pad_mask: torch.Tensor) -> torch.Tensor:
        """Text tokens (B, L, D_T), padding after [EOS] (B, L) True -> L2V prompts (B, n, D_IC)."""
        return super().forward(text_tokens, text_pad_mask)


@dataclass
class CLIPFeatures:
    """Outputs of the prompted CLIP towers for B expressions (CLIP frame).

    Attributes:
        img_tokens: F_IC, ``ln_post`` output of the patch tokens, (B, h*w, D_IC), row-major grid.
        text_tokens: F_T, ``ln_final`` output, (B, L, D_T).
        text_pad_mask: (B, L) bool, True after [EOS].
        eos_index: (B,) long, position of [EOS] (argmax of the token ids).
        grid_size: (h, w) of the patch grid.
    """

    img_tokens: torch.Tensor
    text_tokens: torch.Tensor
    text_pad_mask: torch.Tensor
    eos_index: torch.Tensor
    grid_size: tuple[int, int]


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """Additive causal mask (length, length): 0 on and below the diagonal, -inf above.

    With n prompt tokens prepended to L text tokens, the causal mask of length n + L lets every
    text token see all prompts and the text before it, exactly as CLIP's own mask does for text.
    """
    return torch.full((length, length), float("-inf"), device=device).triu_(1)


class PromptedCLIP(nn.Module):
    """CLIP image and text encoders with V2L/L2V prompts at every layer (Sec. 3.2).

    The prompts made from the outputs of layer i (layer 0 = the embeddings) are prepended to the
    input of layer i+1 and their outputs dropped: V2L prompts go before the text tokens, L2V
    prompts before [CLS]. With ``num_prompts = 0`` both towers compute exactly open_clip's.

    Args:
        clip: an open_clip ``CLIP`` (ViT image tower, default text tower), weights already loaded
            and position embeddings already sized to the CLIP frame grid.
        num_prompts: n prompts per direction and layer; 0 switches CMP off.
        num_heads: heads of the prompt cross-attention.
    """

    def __init__(self, *, clip: CLIP, num_prompts: int, num_heads: int) -> None:
        super().__init__()
        self.clip = clip
        self.num_prompts = num_prompts
        vision_blocks = clip.visual.transformer.resblocks
        text_blocks = clip.transformer.resblocks
        if len(vision_blocks) != len(text_blocks):
            raise ValueError(
                f"Cross-Modal Prompting pairs the layers of both towers, but the image tower has "
                f"{len(vision_blocks)} and the text tower {len(text_blocks)}; set "
                f"model.clip.vision_layers == model.clip.text_layers"
            )
        vision_dim, text_dim = clip.visual.transformer.width, clip.transformer.width
        num_layers = len(vision_blocks) if num_prompts > 0 else 0
        self.v2l = nn.ModuleList(
            V2LPrompter(
                num_prompts=num_prompts,
                vision_dim=vision_dim,
                text_dim=text_dim,
                num_heads=num_heads,
            )
            for _ in range(num_layers)
        )
        self.l2v = nn.ModuleList(
            L2VPrompter(
                num_prompts=num_prompts,
                text_dim=text_dim,
                vision_dim=vision_dim,
                num_heads=num_heads,
            )
            for _ in range(num_layers)
        )

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the image token grid (30 x 30 for ViT-B/16 at 480)."""
        return tuple(self.clip.visual.grid_size)

    def embed_text(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """F^0_T, token + position embeddings as ``encode_text``: (B, L) -> (B, L, D_T)."""
        length = text_tokens.shape[1]
        if length > self.clip.positional_embedding.shape[0]:
            raise ValueError(
                f"text of {length} tokens exceeds CLIP's context length "
                f"{self.clip.positional_embedding.shape[0]}; lower model.clip.text_length"
            )
        cast_dtype = self.clip.transformer.get_cast_dtype()
        x = self.clip.token_embedding(text_tokens).to(cast_dtype)  # (B, L, D_T)
        return x + self.clip.positional_embedding[:length].to(cast_dtype)

    def forward(
        self,
        images: torch.Tensor,
        text_tokens: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> CLIPFeatures:
        """Encode B image-expression pairs jointly (eqs. 5-6).

        Args:
            images: (I, 3, S_c, S_c) CLIP-normalised letterboxed images.
            text_tokens: (B, L) CLIP BPE ids, [EOS] = highest id, zero padding after it.
            image_index: (B,) image row of each expression; None when I = B, one row each.

        Returns:
            CLIPFeatures with F_IC (B, h*w, D_IC) and F_T (B, L, D_T).
        """
        n, length = self.num_prompts, text_tokens.shape[1]
        eos_index = text_tokens.argmax(dim=-1)  # (B,)
        positions = torch.arange(length, device=text_tokens.device)
        text_pad_mask = positions.unsqueeze(0) > eos_index.unsqueeze(1)  # (B, L)
        attn_mask = causal_mask(n + length, text_tokens.device)  # (n+L, n+L)

        x_img = self.clip.visual._embeds(images)  # (I, 1+h*w, D_IC), ln_pre applied
        if image_index is not None:
            x_img = x_img[image_index]  # embedded once per image: (B, 1+h*w, D_IC)
        x_txt = self.embed_text(text_tokens)  # (B, L, D_T)
        vision_blocks = self.clip.visual.transformer.resblocks
        text_blocks = self.clip.transformer.resblocks
        for i, (vision_block, text_block) in enumerate(zip(vision_blocks, text_blocks)):
            if n > 0:
                # Prompts for layer i+1 from the outputs of layer i, both from the same level.
                l2v = self.l2v[i](x_txt, text_pad_mask)  # (B, n, D_IC)
                v2l = self.v2l[i](x_img)  # (B, n, D_T)
                x_img = torch.cat([l2v.to(x_img.dtype), x_img], dim=1)  # (B, n+1+h*w, D_IC)
                x_txt = torch.cat([v2l.to(x_txt.dtype), x_txt], dim=1)  # (B, n+L, D_T)
            x_img = vision_block(x_img)[:, n:]  # prompt outputs dropped: (B, 1+h*w, D_IC)
            x_txt = text_block(x_txt, attn_mask=attn_mask)[:, n:]  # (B, L, D_T)

        x_img = self.clip.visual.ln_post(x_img)  # (B, 1+h*w, D_IC)
        return CLIPFeatures(
            img_tokens=x_img[:, 1:],  # [CLS] dropped: (B, h*w, D_IC)
            text_tokens=self.clip.ln_final(x_txt),
            text_pad_mask=text_pad_mask,
            eos_index=eos_index,
            grid_size=self.grid_size,
        )
