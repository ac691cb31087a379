"""FrozenSAM: SAM's side of the prompts and the decoding, eqs. (3) and (4).

SAM's three upstream modules keep their segment_anything attribute names (``image_encoder``,
``prompt_encoder``, ``mask_decoder``), so SAM checkpoints map onto them key for key. Everything
that turns CLIP's outputs into SAM prompts with SAM's own (frozen) weights lives here:

- the mask prompt P_mask: the upsampled coarse mask S_C through SAM's ``mask_downscaling``
  (``no_mask_embed`` where the mask is dropped);
- the point prompt, eq. (3): ``e_p = sum_i M_i E_i`` with ``M = GumbelSoftmax(S_C)``, where E is
  SAM's embedding of a positive click at every cell of the low-res grid;
- the sparse token list ``[P_point; pad; P_text]`` with SAM's ``not_a_point_embed`` as padding;
- the decoding, eq. (4): ``S' = D_sam([T_iou; T_out; P_point; P_text], P_mask + F_IS)``.

The text prompts P_text are *learned* (``text_prompter.TextPrompter``) and come in from outside.
SAM's own ``Sam.forward`` / ``SamPredictor`` run under ``torch.no_grad``; here the decoder's steps
are called directly so that gradients reach CLIP through the prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder
from torch import nn

from prompt_ris.frames import LOWRES_FACTOR

POSITIVE_POINT_LABEL = 1  # SAM's label of a foreground click (index into point_embeddings)


@dataclass
class PromptKeep:
    """Per-expression (B,) bool flags: which prompt each expression keeps after prompt dropout
    (Sec. 4.2) and the switches. None means kept by every expression."""

    mask: torch.Tensor | None = None
    point: torch.Tensor | None = None
    text: torch.Tensor | None = None


@dataclass
class SAMPrompts:
    """SAM-ready prompts for B expressions.

    Attributes:
        sparse: (B, k, D_S) sparse tokens: [P_point; pad; P_text] (those switched on).
        sparse_keep: (B, k) bool; False = that token is left out for that expression (prompt
            dropout); rows sharing a pattern are decoded together. None = every token kept.
        dense: (B, D_S, h_s, w_s) P_mask, or SAM's ``no_mask_embed`` where the mask is dropped.
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


class FrozenSAM(nn.Module):
    """SAM (ViT image encoder, prompt encoder, mask decoder) driven by CLIP's prompts.

    Args:
        image_encoder: segment_anything ``ImageEncoderViT``.
        prompt_encoder: segment_anything ``PromptEncoder``.
        mask_decoder: segment_anything ``MaskDecoder``.
        freeze_image_encoder: run the image encoder without gradient (once per image).
        freeze_prompt_encoder: the prompt encoder is frozen, so the point table E is cached.
        gumbel_tau: temperature of the straight-through Gumbel-softmax of eq. (3).
    """

    def __init__(
        self,
        *,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        freeze_image_encoder: bool,
        freeze_prompt_encoder: bool,
        gumbel_tau: float = 1.0,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.freeze_image_encoder = freeze_image_encoder
        self.freeze_prompt_encoder = freeze_prompt_encoder
        self.gumbel_tau = gumbel_tau
        self._point_table: torch.Tensor | None = None

    @property
    def image_size(self) -> int:
        """S_s, side of the SAM frame (1024 for ViT-B)."""
        return self.image_encoder.img_size

    @property
    def lowres_size(self) -> int:
        """Side of the low-res frame, S_s / 4 (256 for ViT-B)."""
        return LOWRES_FACTOR * self.prompt_encoder.image_embedding_size[0]

    @property
    def dtype(self) -> torch.dtype:
        """dtype of SAM's prompt and decoder weights (an F_IS read from a cache is cast to it)."""
        return self.prompt_encoder.not_a_point_embed.weight.dtype

    @property
    def pad_embed(self) -> torch.Tensor:
        """SAM's ``not_a_point_embed`` (1, D_S): the token of an empty sparse slot."""
        return self.prompt_encoder.not_a_point_embed.weight

    def dense_pe(self) -> torch.Tensor:
        """SAM's dense position encoding of the image embedding grid, (1, D_S, h_s, w_s).

        ``PromptEncoder.get_dense_pe``: the encoding of every cell centre of the grid, computed
        here so that it goes through :meth:`_position_encoding`'s float32 arithmetic.
        """
        h, w = self.prompt_encoder.image_embedding_size
        device = self.pad_embed.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self._position_encoding(grid).permute(2, 0, 1)[None]  # (1, D_S, h, w)

    def _position_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """SAM's random-Fourier encoding of points in [0, 1]^2: (..., 2) -> (..., D_S).

        SAM's private ``PositionEmbeddingRandom._pe_encoding``, computed in float32 whatever the
        weights' dtype or the autocast state (sines of arguments of a few tens lose their
        precision in half precision), then cast to the weights' dtype.
        """
        matrix = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix  # (2, D_S/2)
        device_type = "cpu" if coords.device.type == "meta" else coords.device.type
        with torch.autocast(device_type, enabled=False):
            angles = 2 * math.pi * ((2 * coords.float() - 1) @ matrix.float())  # (..., D_S/2)
            encoding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (..., D_S)
        return encoding.to(self.dtype)

    # ----------------------------------------------------------------------------------------
    # F_IS
    # ----------------------------------------------------------------------------------------
    def encode_images(self, sam_images: torch.Tensor) -> torch.Tensor:
        """F_IS: SAM image embeddings, once per image.

        Args:
            sam_images: (I, 3, S_s, S_s) SAM-normalised letterboxed images.

        Returns:
            (I, D_S, S_s/16, S_s/16).
        """
        if self.freeze_image_encoder:
            with torch.no_grad():
                return self.image_encoder(sam_images)
        return self.image_encoder(sam_images)

    # ----------------------------------------------------------------------------------------
    # Prompts: mask, point (eq. 3), assembly
    # ----------------------------------------------------------------------------------------
    def embed_mask(self, coarse_lowres: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """P_mask: S_C (B, 1, H_lr, W_lr) through ``mask_downscaling`` -> (B, D_S, h_s, w_s).

        Where ``keep`` (B,) is False, SAM's ``no_mask_embed`` replaces it, as SAM does when no
        mask is given.
        """
        dense = self.prompt_encoder.mask_downscaling(coarse_lowres.to(self.dtype))  # (B, D_S, ., .)
        if keep is None:
            return dense
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(dense.dtype)
        return torch.where(keep.view(-1, 1, 1, 1), dense, no_mask.expand_as(dense))

    def point_table(self) -> torch.Tensor:
        """E of eq. (3): SAM's embedding of a positive click at every low-res cell centre.

        Computed as SAM's private ``PromptEncoder._embed_points`` computes a label-1 point:
        random-Fourier position encoding of (coords + 0.5) in the SAM frame plus the
        positive-point label embedding, so a one-hot at cell j gives exactly SAM's embedding of a
        positive click at that cell's centre (``tests/test_frozen_sam.py`` holds it to SAM's
        ``PromptEncoder``). ``_embed_points`` itself is not called, so that the position encoding
        goes through :meth:`_position_encoding`'s float32 arithmetic. Cached while the prompt
        encoder is frozen; a trainable prompt encoder gets a fresh table each call so that
        gradients reach it.

        Returns:
            (H_lr * W_lr, D_S).
        """
        if not self.freeze_prompt_encoder:
            return self._build_point_table()
        weight = self.prompt_encoder.no_mask_embed.weight
        table = self._point_table
        if table is None or table.device != weight.device or table.dtype != weight.dtype:
            with torch.no_grad():
                self._point_table = self._build_point_table()
        return self._point_table

    def _build_point_table(self) -> torch.Tensor:
        encoder = self.prompt_encoder
        sam_h, sam_w = encoder.input_image_size
        if sam_h != sam_w:
            raise ValueError(f"the SAM frame must be square, got {encoder.input_image_size}")
        label = encoder.point_embeddings[POSITIVE_POINT_LABEL].weight
        coords = point_grid_coords(self.lowres_size, sam_h, label.device) + 0.5  # pixel centres
        # As PositionEmbeddingRandom.forward_with_coords: (x, y) / (W, H) of the SAM frame.
        coords = coords / torch.tensor([sam_w, sam_h], device=label.device)  # (N, 2)
        return self._position_encoding(coords) + label  # (N, D_S)

    def embed_point(self, coarse_lowres: torch.Tensor) -> torch.Tensor:
        """Eq. (3): e_p = sum_i M_i E_i with M = GumbelSoftmax(S_C), straight-through hard.

        Training mode samples a hard one-hot M from the flattened S_C logits (forward: one cell;
        backward: the soft gradient); eval mode takes the argmax cell. Either way e_p is SAM's
        embedding of a positive click at that cell.

        Args:
            coarse_lowres: S_C, (B, 1, H_lr, W_lr) logits in the low-res frame.

        Returns:
            (B, D_S) point embedding e_p.
        """
        table = self.point_table()  # E: (H_lr * W_lr, D_S)
        flat = coarse_lowres.flatten(1).float()  # (B, H_lr * W_lr)
        if self.training:
            one_hot = F.gumbel_softmax(flat, tau=self.gumbel_tau, hard=True)  # (B, H_lr * W_lr)
            return one_hot.to(table.dtype) @ table  # (B, D_S)
        return table[flat.argmax(dim=1)]  # (B, D_S)

    def embed_prompts(
        self,
        coarse_lowres: torch.Tensor,
        *,
        use_point: bool,
        text_prompts: torch.Tensor | None,
        text_pad_mask: torch.Tensor,
        keep: PromptKeep,
    ) -> SAMPrompts:
        """The prompts of eq. (4): P_mask and the sparse tokens [P_point; pad; P_text].

        A point is followed by SAM's padding token (``not_a_point_embed``), as SAM's prompt
        encoder does for point prompts given without a box, so that a point-only prompt
        reproduces SAM. P_text has the expression's own L + 2 tokens ([SOS], words, [EOS]): the
        positions after [EOS] are left out of the token list (``sparse_keep`` False), so an
        expression's prompts do not depend on the fixed tokenised length.

        Args:
            coarse_lowres: S_C, (B, 1, H_lr, W_lr) logits in the low-res frame.
            use_point: compute the point prompt (eq. 3).
            text_prompts: P_text (B, L, D_S) from the text prompter, or None when switched off.
            text_pad_mask: (B, L) bool, True after [EOS].
            keep: per-expression keep flags (prompt dropout and switches).
        """
        dense = self.embed_mask(coarse_lowres, keep.mask)  # P_mask: (B, D_S, h_s, w_s)
        batch, dim = dense.shape[0], dense.shape[1]
        pad = self.pad_embed.reshape(1, 1, dim).to(dense.dtype)  # (1, 1, D_S)
        tokens = [dense.new_zeros(batch, 0, dim)]
        keep_parts: list[torch.Tensor | None] = []  # (B, width) flags per part; None = all kept
        if use_point:
            point = self.embed_point(coarse_lowres).unsqueeze(1).to(dense.dtype)  # (B, 1, D_S)
            tokens += [point, pad.expand(batch, 1, dim)]  # (B, 2, D_S)
            keep_parts.append(None if keep.point is None else keep.point[:, None].expand(-1, 2))
        if text_prompts is not None:
            tokens.append(text_prompts.to(dense.dtype))  # (B, L, D_S)
            words = ~text_pad_mask  # (B, L): [SOS], words, [EOS]
            keep_parts.append(words if keep.text is None else words & keep.text[:, None])
        sparse_keep = None
        if any(flags is not None for flags in keep_parts):
            sparse_keep = torch.cat(
                [
                    flags if flags is not None else dense.new_ones(batch, 2, dtype=torch.bool)
                    for flags in keep_parts  # only the point part (width 2) can be None
                ],
                dim=1,
            )  # (B, k)
        return SAMPrompts(sparse=torch.cat(tokens, 1), sparse_keep=sparse_keep, dense=dense)

    # ----------------------------------------------------------------------------------------
    # Eq. (4)
    # ----------------------------------------------------------------------------------------
    def decode(
        self, sam_img_embed: torch.Tensor, image_index: torch.Tensor, prompts: SAMPrompts
    ) -> torch.Tensor:
        """Eq. (4): S' = D_sam([T_iou; T_out; P_point; P_text], P_mask + F_IS), first mask.

        Expressions whose prompts were dropped differently, or whose expressions differ in
        length, have different token counts; each pattern of kept tokens is decoded as one batch.

        Args:
            sam_img_embed: F_IS, (I, D_S, h_s, w_s).
            image_index: (B,) expression -> image row.
            prompts: sparse (B, k, D_S), sparse_keep (B, k) or None, dense (B, D_S, h_s, w_s).

        Returns:
            (B, 1, 4 h_s, 4 w_s) mask logits in the low-res frame.
        """
        keep = prompts.sparse_keep
        # Every token in one batch when nothing is left out, and on the meta device, which has
        # no values to group by (shapes and costs only: every token counts, an upper bound).
        if keep is None or keep.device.type == "meta":
            src = sam_img_embed[image_index]  # (B, D_S, h_s, w_s)
            return predict_first_mask(
                self.mask_decoder, src, self.dense_pe(), prompts.sparse, prompts.dense
            )[0]
        patterns, group = torch.unique(keep.long(), dim=0, return_inverse=True)
        rows_per_group, masks = [], []
        for g, pattern in enumerate(patterns.bool()):
            rows = (group == g).nonzero().squeeze(1)  # (b_g,)
            tokens = prompts.sparse[rows][:, pattern]  # (b_g, k_g, D_S)
            src = sam_img_embed[image_index[rows]]  # (b_g, D_S, h_s, w_s)
            dense = prompts.dense[rows]  # (b_g, D_S, h_s, w_s)
            masks.append(
                predict_first_mask(self.mask_decoder, src, self.dense_pe(), tokens, dense)[0]
            )
            rows_per_group.append(rows)
        order = torch.cat(rows_per_group)
        return torch.cat(masks)[torch.argsort(order)]  # (B, 1, 4h_s, 4w_s)


MULTIMASK_TOKENS = (1, 2, 3)  # SAM's mask tokens for an ambiguous prompt (multimask_output=True)


def predict_first_mask(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder for N prompt sets, each with its own image embedding: the first mask.

    segment_anything's ``MaskDecoder.predict_masks`` step by step, with two differences, which
    are why it is written out here: upstream takes one image's embedding and repeats it for
    every prompt set (``repeat_interleave``), so prompts on several images cannot run as one
    batch; and it upscales all four mask tokens. Here the embedding comes one per prompt set, and
    only the first mask (``multimask_output=False``, the one Prompt-RIS reads) is made. For one
    image it equals upstream's first mask (tests/test_frozen_sam.py holds it to
    ``MaskDecoder.predict_masks``).

    Args:
        decoder: SAM's mask decoder.
        image_embeddings: (N, C, h, w) the image embedding of each prompt set.
        image_pe: (1, C, h, w) SAM's dense position encoding (``PromptEncoder.get_dense_pe``).
        sparse: (N, k, C) sparse prompt embeddings.
        dense: (N, C, h, w) dense prompt embeddings.

    Returns:
        The mask logits (N, 1, 4h, 4w) and the IoU token's output (N, C), from which
        ``decoder.iou_prediction_head`` predicts the IoUs.
    """
    return predict_token_masks(decoder, image_embeddings, image_pe, sparse, dense, (0,))


def predict_token_masks(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    token_ids: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`predict_first_mask` for the mask tokens ``token_ids``: ``(0,)`` is the single-mask
    output, ``MULTIMASK_TOKENS`` the three masks of ``multimask_output=True``.

    Returns:
        The mask logits (N, T, 4h, 4w) of the T tokens, in ``token_ids`` order, and the IoU
        token's output (N, C) (``decoder.iou_prediction_head`` gives one IoU per mask token).
    """
    # Concatenate output tokens
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
    tokens = torch.cat([output_tokens, sparse.to(output_tokens.dtype)], dim=1)  # (N, 5+k, C)

    # Image embedding of each prompt set plus its dense prompt
    src = image_embeddings + dense  # (N, C, h, w)
    pos_src = image_pe.expand_as(src)  # (N, C, h, w)
    n, c, h, w = src.shape

    # Run the transformer
    hs, src = decoder.transformer(src, pos_src, tokens)  # (N, 5+k, C), (N, h*w, C)
    iou_token_out = hs[:, 0]  # (N, C)

    # Upscale the embedding; each chosen mask token's hypernetwork MLP makes its mask
    src = src.transpose(1, 2).reshape(n, c, h, w)
    upscaled = decoder.output_upscaling(src)  # (N, C/8, 4h, 4w)
    hyper_in = torch.stack(
        [decoder.output_hypernetworks_mlps[t](hs[:, 1 + t]) for t in token_ids], dim=1
    )  # (N, T, C/8)
    n, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(n, c, h * w)).reshape(n, len(token_ids), h, w)
    return masks, iou_token_out  # (N, T, 4h, 4w), (N, C)
