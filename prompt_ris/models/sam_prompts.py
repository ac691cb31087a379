"""CLIP-based prompting of SAM (Sec. 3.1): mask, point (eq. 3) and text prompts.

All three read the coarse mask or the CLIP text tokens and produce embeddings in SAM's prompt
space (width C), using SAM's own prompt encoder where SAM has one (mask, point).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from segment_anything.modeling import PromptEncoder
from torch import nn

from prompt_ris.models.layers import MLP, CrossAttention

POSITIVE_POINT_LABEL = 1  # SAM's label of a foreground click (index into point_embeddings)


@dataclass
class SAMPrompts:
    """SAM-ready prompts for B expressions.

    Attributes:
        sparse: (B, k, C) sparse tokens: [P_point; pad; P_text] (those switched on).
        sparse_keep: (B, k) bool; False = that token is left out for that expression (prompt
            dropout); rows sharing a pattern are decoded together. None = every token kept.
        dense: (B, C, h_s, w_s) P_mask, or SAM's ``no_mask_embed`` where the mask is dropped.
    """

    sparse: torch.Tensor
    sparse_keep: torch.Tensor | None
    dense: torch.Tensor


def point_grid_coords(lowres_size: int, sam_size: int, device: torch.device) -> torch.Tensor:
    """Centres of the low-res grid cells as SAM point coordinates, (lowres_size**2, 2) as (x, y).

    Cell (r, c) of the low-res frame covers SAM-frame pixels [s*c, s*(c+1)) with s = sam_size /
    lowres_size; its centre is the continuous position s*(c + 0.5). SAM adds 0.5 to a click to
    reach the pixel centre, so the click coordinate is s*(c + 0.5) - 0.5. Row-major order, so
    index j = r * lowres_size + c matches ``flatten`` of a (lowres_size, lowres_size) map.
    """
    stride = sam_size / lowres_size
    centres = (torch.arange(lowres_size, device=device, dtype=torch.float32) + 0.5) * stride - 0.5
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # (N, 2)


def build_point_table(prompt_encoder: PromptEncoder, lowres_size: int) -> torch.Tensor:
    """The table E of eq. (3): SAM's embedding of a positive click at every low-res cell centre.

    Computed as ``PromptEncoder._embed_points`` computes a label-1 point: random-Fourier position
    encoding of (coords + 0.5) in the SAM frame plus the positive-point label embedding. A one-hot
    at cell j therefore gives exactly SAM's embedding of a positive click at that cell's centre.

    Args:
        prompt_encoder: SAM's prompt encoder.
        lowres_size: side of the low-res frame (SAM frame / 4, 256 for ViT-B).

    Returns:
        (lowres_size**2, C).
    """
    sam_h, sam_w = prompt_encoder.input_image_size
    if sam_h != sam_w:
        raise ValueError(f"the SAM frame must be square, got {prompt_encoder.input_image_size}")
    device = prompt_encoder.point_embeddings[POSITIVE_POINT_LABEL].weight.device
    coords = point_grid_coords(lowres_size, sam_h, device) + 0.5  # SAM's shift to pixel centre
    pos = prompt_encoder.pe_layer.forward_with_coords(coords.unsqueeze(0), (sam_h, sam_w))[0]
    return pos + prompt_encoder.point_embeddings[POSITIVE_POINT_LABEL].weight  # (N, C)


class MaskPrompt(nn.Module):
    """P_mask: the upsampled coarse mask S_C through SAM's ``mask_downscaling`` (Sec. 3.1).

    A dropped mask prompt becomes SAM's ``no_mask_embed``, as SAM does when no mask is given.
    """

    def forward(
        self,
        lowres_logits: torch.Tensor,
        keep: torch.Tensor | None,
        prompt_encoder: PromptEncoder,
    ) -> torch.Tensor:
        """Embed the coarse mask.

        Args:
            lowres_logits: S_C, (B, 1, H_lr, W_lr) logits in the low-res frame (256 x 256).
            keep: (B,) bool, False where the mask prompt is dropped; None = kept everywhere.
            prompt_encoder: SAM's prompt encoder.

        Returns:
            (B, C, H_lr/4, W_lr/4) dense prompt.
        """
        dense = prompt_encoder.mask_downscaling(lowres_logits)  # (B, C, h_s, w_s)
        if keep is None:
            return dense
        no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(dense.dtype)
        return torch.where(keep.view(-1, 1, 1, 1), dense, no_mask.expand_as(dense))


class GumbelPointPrompt(nn.Module):
    """P_point, eq. (3): e_p = sum_i M_i E_i with M = GumbelSoftmax(S_C) (straight-through hard).

    Training mode samples a hard one-hot M from the flattened S_C logits with the
    straight-through estimator (forward: one cell; backward: the soft gradient). Eval mode takes
    the argmax cell. Either way e_p is SAM's embedding of a positive click at that cell.

    Args:
        tau: Gumbel-softmax temperature.
    """

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, lowres_logits: torch.Tensor, point_table: torch.Tensor) -> torch.Tensor:
        """Select a point and embed it.

        Args:
            lowres_logits: S_C, (B, 1, H_lr, W_lr) logits in the low-res frame.
            point_table: E, (H_lr * W_lr, C) from ``build_point_table``.

        Returns:
            (B, C) point embedding e_p.
        """
        flat = lowres_logits.flatten(1).float()  # (B, H_lr * W_lr)
        if self.training:
            one_hot = F.gumbel_softmax(flat, tau=self.tau, hard=True)  # (B, H_lr * W_lr)
            return one_hot.to(point_table.dtype) @ point_table  # (B, C)
        return point_table[flat.argmax(dim=1)]  # (B, C)


class _TextPromptBlock(nn.Module):
    """Self-attention over the text tokens, cross-attention to the SAM image tokens, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
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
    ) -> torch.Tensor:
        x = x + self.self_attn(x, x, pad_mask)
        x = x + self.cross_attn(x, image_tokens, context_pos=image_pos)
        return x + self.mlp(self.norm(x))


class TextPrompter(nn.Module):
    """P_text (Sec. 3.1): CLIP text tokens F_T -> SAM sparse tokens conditioned on F_IS.

    F_T is projected to C and passed through ``num_blocks`` blocks of self-attention (padding
    after [EOS] masked), cross-attention to the SAM image embedding of the expression's image
    (keys carry SAM's dense position encoding) and an MLP. Padding positions are replaced by
    SAM's ``not_a_point_embed``, SAM's own token for an empty sparse slot.

    Args:
        text_dim: D_t of the CLIP text tokens.
        dim: C, SAM's prompt width.
        num_blocks: number of blocks (2 in the paper).
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
    """

    def __init__(
        self, *, text_dim: int, dim: int, num_blocks: int, num_heads: int, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        self.in_proj = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(
            _TextPromptBlock(dim, num_heads, mlp_ratio) for _ in range(num_blocks)
        )
        self.out_norm = nn.LayerNorm(dim)

    def forward(
        self,
        text_tokens: torch.Tensor,
        text_pad_mask: torch.Tensor,
        sam_img_embed: torch.Tensor,
        image_index: torch.Tensor,
        image_pe: torch.Tensor,
        pad_embed: torch.Tensor,
    ) -> torch.Tensor:
        """Make text prompts.

        Args:
            text_tokens: F_T, (B, L, D_t).
            text_pad_mask: (B, L) bool, True after [EOS].
            sam_img_embed: F_IS, (I, C, h_s, w_s).
            image_index: (B,) expression -> image row.
            image_pe: (1, C, h_s, w_s) SAM's dense position encoding.
            pad_embed: (C,) or (1, C) SAM's ``not_a_point_embed``.

        Returns:
            (B, L, C) sparse text tokens.
        """
        image_tokens = rearrange(sam_img_embed, "i c h w -> i (h w) c")[image_index]  # (B, hw, C)
        image_pos = rearrange(image_pe, "1 c h w -> 1 (h w) c")  # (1, hw, C)
        x = self.in_proj(text_tokens)  # (B, L, C)
        for block in self.blocks:
            x = block(x, text_pad_mask, image_tokens, image_pos)
        x = self.out_norm(x)
        pad = pad_embed.reshape(1, 1, -1).to(x.dtype)
        return torch.where(text_pad_mask.unsqueeze(-1), pad, x)  # (B, L, C)


def assemble_sam_prompts(
    *,
    dense: torch.Tensor,
    point_embed: torch.Tensor | None,
    text_prompts: torch.Tensor | None,
    pad_embed: torch.Tensor,
    keep_point: torch.Tensor | None = None,
    keep_text: torch.Tensor | None = None,
) -> SAMPrompts:
    """Concatenate the sparse prompts of eq. (4) as [P_point; pad; P_text].

    A point is followed by SAM's padding token (``not_a_point_embed``), as SAM's prompt encoder
    does for point prompts given without a box, so that a point-only prompt reproduces SAM.

    Args:
        dense: (B, C, h_s, w_s) mask prompt.
        point_embed: (B, C) point prompt, or None when switched off.
        text_prompts: (B, L, C) text prompts, or None when switched off.
        pad_embed: (1, C) SAM's ``not_a_point_embed``.
        keep_point: (B,) bool, False where the point prompt is dropped; None = kept everywhere.
        keep_text: (B,) bool, False where the text prompt is dropped; None = kept everywhere.
    """
    batch, dim = dense.shape[0], dense.shape[1]
    tokens = [dense.new_zeros(batch, 0, dim)]
    keep_parts: list[tuple[torch.Tensor | None, int]] = []
    if point_embed is not None:
        pad = pad_embed.reshape(1, 1, dim).expand(batch, 1, dim)
        tokens += [point_embed.unsqueeze(1).to(dense.dtype), pad.to(dense.dtype)]  # (B, 2, C)
        keep_parts.append((keep_point, 2))
    if text_prompts is not None:
        tokens.append(text_prompts.to(dense.dtype))  # (B, L, C)
        keep_parts.append((keep_text, text_prompts.shape[1]))
    sparse_keep = None
    if any(keep is not None for keep, _ in keep_parts):
        sparse_keep = torch.cat(
            [
                (keep if keep is not None else dense.new_ones(batch, dtype=torch.bool))
                .unsqueeze(1)
                .expand(batch, width)
                for keep, width in keep_parts
            ],
            dim=1,
        )  # (B, k)
    return SAMPrompts(sparse=torch.cat(tokens, 1), sparse_keep=sparse_keep, dense=dense)
