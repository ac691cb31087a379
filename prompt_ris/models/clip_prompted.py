"""PromptedCLIP: open_clip's image and text towers run layer by layer with Cross-Modal Prompting.

The open_clip ``CLIP`` module is held unchanged as ``self.clip`` so that open_clip state dicts
load into it as they are; only the loop over ``transformer.resblocks`` is new (eqs. 5-6). Written
against open_clip 3.3.0 (batch-first blocks, ``VisionTransformer._embeds``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.model import CLIP
from torch import nn

from prompt_ris.models.cross_modal_prompting import L2VPrompter, V2LPrompter


@dataclass
class CLIPFeatures:
    """Outputs of the prompted CLIP towers for B expressions (CLIP frame).

    Attributes:
        img_tokens: F_IC, ``ln_post`` output of the patch tokens, (B, h*w, D_v), row-major grid.
        img_cls: ``ln_post`` output of [CLS], (B, D_v).
        text_tokens: F_T, ``ln_final`` output, (B, L, D_t).
        text_pad_mask: (B, L) bool, True after [EOS].
        eos_index: (B,) long, position of [EOS] (argmax of the token ids).
        grid_size: (h, w) of the patch grid.
    """

    img_tokens: torch.Tensor
    img_cls: torch.Tensor
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

    @property
    def vision_dim(self) -> int:
        return self.clip.visual.transformer.width

    @property
    def text_dim(self) -> int:
        return self.clip.transformer.width

    def embed_text(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """F^0_T, token + position embeddings as ``encode_text``: (B, L) -> (B, L, D_t)."""
        length = text_tokens.shape[1]
        if length > self.clip.positional_embedding.shape[0]:
            raise ValueError(
                f"text of {length} tokens exceeds CLIP's context length "
                f"{self.clip.positional_embedding.shape[0]}; lower model.clip.text_length"
            )
        cast_dtype = self.clip.transformer.get_cast_dtype()
        x = self.clip.token_embedding(text_tokens).to(cast_dtype)  # (B, L, D_t)
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
            CLIPFeatures with F_IC (B, h*w, D_v) and F_T (B, L, D_t).
        """
        n, length = self.num_prompts, text_tokens.shape[1]
        eos_index = text_tokens.argmax(dim=-1)  # (B,)
        positions = torch.arange(length, device=text_tokens.device)
        text_pad_mask = positions.unsqueeze(0) > eos_index.unsqueeze(1)  # (B, L)
        attn_mask = causal_mask(n + length, text_tokens.device)  # (n+L, n+L)

        x_img = self.clip.visual._embeds(images)  # (I, 1+h*w, D_v), ln_pre applied
        if image_index is not None:
            x_img = x_img[image_index]  # embedded once per image: (B, 1+h*w, D_v)
        x_txt = self.embed_text(text_tokens)  # (B, L, D_t)
        vision_blocks = self.clip.visual.transformer.resblocks
        text_blocks = self.clip.transformer.resblocks
        for i, (vision_block, text_block) in enumerate(zip(vision_blocks, text_blocks)):
            if n > 0:
                # Prompts for layer i+1 from the outputs of layer i, both from the same level.
                l2v = self.l2v[i](x_txt, text_pad_mask)  # (B, n, D_v)
                v2l = self.v2l[i](x_img)  # (B, n, D_t)
                x_img = torch.cat([l2v.to(x_img.dtype), x_img], dim=1)  # (B, n+1+h*w, D_v)
                x_txt = torch.cat([v2l.to(x_txt.dtype), x_txt], dim=1)  # (B, n+L, D_t)
            x_img = vision_block(x_img)[:, n:]  # prompt outputs dropped: (B, 1+h*w, D_v)
            x_txt = text_block(x_txt, attn_mask=attn_mask)[:, n:]  # (B, L, D_t)

        x_img = self.clip.visual.ln_post(x_img)  # (B, 1+h*w, D_v)
        return CLIPFeatures(
            img_tokens=x_img[:, 1:],
            img_cls=x_img[:, 0],
            text_tokens=self.clip.ln_final(x_txt),
            text_pad_mask=text_pad_mask,
            eos_index=eos_index,
            grid_size=self.grid_size,
        )
