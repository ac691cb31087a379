"""FrozenSAM: SAM's image encoder, prompt encoder and mask decoder driven by CLIP's prompts (eq. 4).

The three upstream modules keep their segment_anything attribute names (``image_encoder``,
``prompt_encoder``, ``mask_decoder``), so SAM checkpoints map onto them key for key. SAM's own
``Sam.forward`` / ``SamPredictor`` run under ``torch.no_grad``; here the decoder's steps are called
directly so that gradients reach the prompts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder
from torch import nn

from prompt_ris.models.sam_prompts import SAMPrompts, build_point_table

LOWRES_FACTOR = 4  # SAM's mask decoder upsamples the 16x-downsampled embedding by 4


class FrozenSAM(nn.Module):
    """SAM (ViT image encoder, prompt encoder, mask decoder) for batched referring prompts.

    Args:
        image_encoder: segment_anything ``ImageEncoderViT``.
        prompt_encoder: segment_anything ``PromptEncoder``.
        mask_decoder: segment_anything ``MaskDecoder``.
        freeze_image_encoder: run the image encoder without gradient (once per image).
        freeze_prompt_encoder: the prompt encoder is frozen, so the point table E is cached.
    """

    def __init__(
        self,
        *,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        freeze_image_encoder: bool,
        freeze_prompt_encoder: bool,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.freeze_image_encoder = freeze_image_encoder
        self.freeze_prompt_encoder = freeze_prompt_encoder
        self._point_table: torch.Tensor | None = None

    @property
    def image_size(self) -> int:
        """S_s, side of the SAM frame (1024 for ViT-B)."""
        return self.image_encoder.img_size

    @property
    def lowres_size(self) -> int:
        """Side of the low-res frame, S_s / 4 (256 for ViT-B)."""
        return LOWRES_FACTOR * self.prompt_encoder.image_embedding_size[0]

    def encode_images(self, sam_images: torch.Tensor) -> torch.Tensor:
        """F_IS: SAM image embeddings, once per image.

        Args:
            sam_images: (I, 3, S_s, S_s) SAM-normalised letterboxed images.

        Returns:
            (I, C, S_s/16, S_s/16).
        """
        if self.freeze_image_encoder:
            with torch.no_grad():
                return self.image_encoder(sam_images)
        return self.image_encoder(sam_images)

    def point_table(self) -> torch.Tensor:
        """E of eq. (3), (lowres_size**2, C); cached when the prompt encoder is frozen.

        A trainable prompt encoder gets a fresh table each call so that gradients reach it.
        """
        if not self.freeze_prompt_encoder:
            return build_point_table(self.prompt_encoder, self.lowres_size)
        weight = self.prompt_encoder.no_mask_embed.weight
        table = self._point_table
        if table is None or table.device != weight.device or table.dtype != weight.dtype:
            with torch.no_grad():
                self._point_table = build_point_table(self.prompt_encoder, self.lowres_size)
        return self._point_table

    @property
    def pad_embed(self) -> torch.Tensor:
        """SAM's ``not_a_point_embed`` (1, C): the token of an empty sparse slot."""
        return self.prompt_encoder.not_a_point_embed.weight

    def decode(
        self, sam_img_embed: torch.Tensor, image_index: torch.Tensor, prompts: SAMPrompts
    ) -> torch.Tensor:
        """Eq. (4): S' = D_sam([T_iou; T_out; P_point; P_text], P_mask + F_IS), first mask.

        Expressions whose prompts were dropped differently have different token counts; each
        pattern of kept tokens is decoded as one batch (at most a few per step).

        Args:
            sam_img_embed: F_IS, (I, C, h_s, w_s).
            image_index: (B,) expression -> image row.
            prompts: sparse (B, k, C), sparse_keep (B, k) or None, dense (B, C, h_s, w_s).

        Returns:
            (B, 1, 4 h_s, 4 w_s) mask logits in the low-res frame.
        """
        keep = prompts.sparse_keep
        if keep is None:  # no dropout: one batch, no data-dependent grouping
            src = sam_img_embed[image_index]  # (B, C, h_s, w_s)
            return self._predict_first_mask(src, prompts.dense, prompts.sparse)
        patterns, group = torch.unique(keep.long(), dim=0, return_inverse=True)
        rows_per_group, masks = [], []
        for g, pattern in enumerate(patterns.bool()):
            rows = (group == g).nonzero().squeeze(1)  # (b_g,)
            tokens = prompts.sparse[rows][:, pattern]  # (b_g, k_g, C)
            src = sam_img_embed[image_index[rows]]  # (b_g, C, h_s, w_s)
            masks.append(self._predict_first_mask(src, prompts.dense[rows], tokens))
            rows_per_group.append(rows)
        order = torch.cat(rows_per_group)
        return torch.cat(masks)[torch.argsort(order)]  # (B, 1, 4h_s, 4w_s)

    def _predict_first_mask(
        self, image_embed: torch.Tensor, dense: torch.Tensor, sparse: torch.Tensor
    ) -> torch.Tensor:
        """``MaskDecoder.predict_masks`` for per-expression image embeddings, first mask only.

        Follows segment_anything's ``predict_masks`` step by step, except that the image
        embedding is already one per prompt set (no ``repeat_interleave``).

        Args:
            image_embed: (b, C, h_s, w_s) the image embedding of each expression's image.
            dense: (b, C, h_s, w_s) dense prompts.
            sparse: (b, k, C) sparse prompts.

        Returns:
            (b, 1, 4 h_s, 4 w_s) logits.
        """
        decoder = self.mask_decoder
        # Concatenate output tokens
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
        tokens = torch.cat([output_tokens, sparse.to(output_tokens.dtype)], dim=1)  # (b, 5+k, C)

        # Image embedding of each expression plus its dense prompt
        src = image_embed + dense  # (b, C, h_s, w_s)
        pos_src = self.prompt_encoder.get_dense_pe().expand_as(src)  # (b, C, h_s, w_s)
        b, c, h, w = src.shape

        # Run the transformer
        hs, src = decoder.transformer(src, pos_src, tokens)  # (b, 5+k, C), (b, h*w, C)
        mask_token_out = hs[:, 1]  # first mask token (multimask off): (b, C)

        # Upscale the embedding and predict the mask with the first hypernetwork MLP
        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = decoder.output_upscaling(src)  # (b, C/8, 4h, 4w)
        hyper_in = decoder.output_hypernetworks_mlps[0](mask_token_out).unsqueeze(1)  # (b, 1, C/8)
        b, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, 1, h, w)

    def postprocess_masks(
        self,
        mask_logits: torch.Tensor,
        input_sizes: torch.Tensor,
        orig_sizes: torch.Tensor,
        image_index: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Low-res logits -> original image logits, as ``Sam.postprocess_masks``.

        Bilinear to the SAM frame, crop to the unpadded ``input_size``, bilinear to the original.

        Args:
            mask_logits: (B, 1, S_s/4, S_s/4) logits in the low-res frame (or any square frame
                aligned with the SAM frame, e.g. the upsampled coarse mask).
            input_sizes: (I, 2) (h', w') of the resized image in the SAM frame.
            orig_sizes: (I, 2) (H, W) of the original images.
            image_index: (B,) expression -> image row.

        Returns:
            B tensors (H, W) of logits in the original frame.
        """
        frame = F.interpolate(
            mask_logits.float(), (self.image_size, self.image_size), mode="bilinear",
            align_corners=False,
        )  # (B, 1, S_s, S_s)
        out = []
        for row, image in enumerate(image_index.tolist()):
            h, w = (int(v) for v in input_sizes[image])
            orig = tuple(int(v) for v in orig_sizes[image])
            crop = frame[row : row + 1, :, :h, :w]  # (1, 1, h', w')
            out.append(F.interpolate(crop, orig, mode="bilinear", align_corners=False)[0, 0])
        return out
