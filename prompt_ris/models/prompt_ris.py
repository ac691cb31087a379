"""PromptRIS: prompt-tuned CLIP -> coarse mask -> mask/point/text prompts -> frozen SAM.

Glossary (paper symbol -> code name):

    F_IC  CLIP image tokens (B, h*w, D_v)         -> ``clip_img_tokens`` (CLIPFeatures.img_tokens)
    F_T   CLIP text tokens (B, L, D_t)            -> ``text_tokens`` (CLIPFeatures.text_tokens)
    T_V2L / T_L2V  CMP prompts (eqs. 5-6)         -> ``V2LPrompter`` / ``L2VPrompter`` outputs
    t_g   global text feature at [EOS]            -> ``text_global``
    S'_C  coarse mask (B, 1, h, w), CLIP frame    -> ``coarse_logits``
    S_C   S'_C upsampled to the low-res frame     -> ``coarse_lowres`` (``upsample_coarse``)
    F_IS  SAM image embedding (I, C, h_s, w_s)    -> ``sam_img_embed``
    E, e_p  point table, point (eq. 3)            -> ``point_table``, ``point_embed``
    P_mask, P_text                                -> ``dense`` prompt, ``text_prompts``
    S'    SAM mask (B, 1, S_s/4, S_s/4), low-res  -> ``mask_logits``
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from prompt_ris.models.clip_prompted import PromptedCLIP
from prompt_ris.models.coarse_decoder import CoarseDecoder
from prompt_ris.models.sam_bridge import FrozenSAM
from prompt_ris.models.sam_prompts import (
    GumbelPointPrompt,
    MaskPrompt,
    TextPrompter,
    assemble_sam_prompts,
)

if TYPE_CHECKING:
    from prompt_ris.config import Config, ModelConfig



@dataclass(frozen=True)
class PromptSwitches:
    """Which prompts SAM receives (Table 5 ablation). Prompt dropout acts on top of these."""

    mask: bool = True
    point: bool = True
    text: bool = True


@dataclass
class PromptRISOutput:
    """Model outputs, the same type in training and evaluation.

    Attributes:
        coarse_logits: S'_C, (B, 1, h_c, w_c) on the CLIP frame grid (30 x 30 for ViT-B).
        mask_logits: S', (B, 1, S_s/4, S_s/4) in the low-res frame; None when ``with_sam=False``.
        text_global: t_g, (B, D_C).
    """

    coarse_logits: torch.Tensor
    mask_logits: torch.Tensor | None
    text_global: torch.Tensor


@dataclass
class PromptKeep:
    """Per-expression (B,) bool flags: which prompt each expression keeps after dropout.
    None means kept by every expression."""

    mask: torch.Tensor | None
    point: torch.Tensor | None
    text: torch.Tensor | None


class PromptRIS(nn.Module):
    """Prompt-RIS (Sec. 3): the composition of the parts built by ``build_prompt_ris``.

    Args:
        clip: PromptedCLIP (CLIP towers + Cross-Modal Prompting).
        decoder: CoarseDecoder (eqs. 1-2).
        sam: FrozenSAM (SAM encoder, prompt encoder, mask decoder; eq. 4).
        mask_prompt: MaskPrompt.
        point_prompt: GumbelPointPrompt (eq. 3).
        text_prompter: TextPrompter.
        text_length: L, tokens per expression the model expects (``tokenize(texts, L)``).
        drop_probs: per-sample probabilities of dropping the (mask, point, text) prompt in
            training (Sec. 4.2).
        default_switches: prompts used when ``forward`` gets no ``switches``.
        config: the config it was built from (kept for ``save_pretrained``).
    """

    def __init__(
        self,
        *,
        clip: PromptedCLIP,
        decoder: CoarseDecoder,
        sam: FrozenSAM,
        mask_prompt: MaskPrompt,
        point_prompt: GumbelPointPrompt,
        text_prompter: TextPrompter,
        text_length: int,
        drop_probs: tuple[float, float, float] = (0.0, 0.0, 0.0),
        default_switches: PromptSwitches = PromptSwitches(),
        config: Config | None = None,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.decoder = decoder
        self.sam = sam
        self.mask_prompt = mask_prompt
        self.point_prompt = point_prompt
        self.text_prompter = text_prompter
        self.text_length = text_length
        self.drop_probs = drop_probs
        self.default_switches = default_switches
        self.config = config

    # ----------------------------------------------------------------------------------------
    # Forward: the data flow of DESIGN.md section 2
    # ----------------------------------------------------------------------------------------
    def forward(
        self,
        clip_images: torch.Tensor,
        sam_images: torch.Tensor | None,
        text_tokens: torch.Tensor,
        image_index: torch.Tensor,
        with_sam: bool = True,
        switches: PromptSwitches | None = None,
        sam_img_embed: torch.Tensor | None = None,
        prompt_dropout: bool | None = None,
    ) -> PromptRISOutput:
        """Segment the objects B expressions refer to in I images.

        Args:
            clip_images: (I, 3, S_c, S_c) CLIP-normalised letterboxed images.
            sam_images: (I, 3, S_s, S_s) SAM-normalised letterboxed images (unused when
                ``sam_img_embed`` is given or ``with_sam=False``).
            text_tokens: (B, L) fixed-length CLIP tokens.
            image_index: (B,) expression -> image row.
            with_sam: False skips SAM (stage 1): only the coarse mask is computed.
            switches: prompts given to SAM; defaults to the config's ``prompts.use_*``.
            sam_img_embed: precomputed F_IS (I, C, h_s, w_s), e.g. from ``encode_sam``.
            prompt_dropout: drop prompts per sample (Sec. 4.2); None = ``self.training``.

        Returns:
            PromptRISOutput.
        """
        switches = switches or self.default_switches
        feats = self.clip(clip_images, text_tokens, image_index)  # eqs. 5-6: F_IC, F_T (B, ., .)
        coarse = self.decoder(  # eqs. 1-2: S'_C (B, 1, h_c, w_c), t_g (B, D_C)
            feats.img_tokens, feats.text_tokens, feats.text_pad_mask, feats.eos_index,
            feats.grid_size,
        )
        if not with_sam:
            return PromptRISOutput(coarse.coarse_logits, None, coarse.text_global)

        if sam_img_embed is None:
            sam_img_embed = self.encode_sam(sam_images)  # F_IS: (I, C, h_s, w_s), once per image
        sam_img_embed = sam_img_embed.to(self.sam.pad_embed.dtype)  # e.g. a cached fp16 F_IS
        coarse_lowres = self.upsample_coarse(coarse.coarse_logits)  # S_C: (B, 1, S_s/4, S_s/4)
        dropout = self.training if prompt_dropout is None else prompt_dropout
        keep = self._prompt_keep(text_tokens.shape[0], switches, dropout, text_tokens.device)
        encoder = self.sam.prompt_encoder
        dense = self.mask_prompt(coarse_lowres, keep.mask, encoder)  # P_mask: (B, C, h_s, w_s)
        point_embed = (  # eq. 3: e_p (B, C)
            self.point_prompt(coarse_lowres, self.sam.point_table()) if switches.point else None
        )
        text_prompts = (  # P_text: (B, L, C)
            self.text_prompter(
                feats.text_tokens, feats.text_pad_mask, sam_img_embed, image_index,
                encoder.get_dense_pe(), self.sam.pad_embed,
            )
            if switches.text
            else None
        )
        prompts = assemble_sam_prompts(  # sparse (B, k, C), dense (B, C, h_s, w_s)
            dense=dense, point_embed=point_embed, text_prompts=text_prompts,
            pad_embed=self.sam.pad_embed, keep_point=keep.point, keep_text=keep.text,
        )
        mask_logits = self.sam.decode(sam_img_embed, image_index, prompts)  # eq. 4: (B, 1, ., .)
        return PromptRISOutput(coarse.coarse_logits, mask_logits, coarse.text_global)

    def _prompt_keep(
        self, batch: int, switches: PromptSwitches, dropout: bool, device: torch.device
    ) -> PromptKeep:
        """Per-sample keep flags (None = kept everywhere). A switched-off mask is never kept
        (switched-off point/text prompts are not computed at all); with dropout each prompt
        type is dropped per sample with its own probability (Sec. 4.2)."""
        flags: list[torch.Tensor | None] = []
        for use, prob in zip((switches.mask, switches.point, switches.text), self.drop_probs):
            if not use:
                flags.append(torch.zeros(batch, dtype=torch.bool, device=device))
            elif dropout and prob > 0:
                flags.append(torch.rand(batch, device=device) >= prob)
            else:
                flags.append(None)
        return PromptKeep(*flags)

    # ----------------------------------------------------------------------------------------
    # Pieces used by the engine and the predictor
    # ----------------------------------------------------------------------------------------
    def encode_sam(self, sam_images: torch.Tensor) -> torch.Tensor:
        """F_IS for I images (I, 3, S_s, S_s) -> (I, C, S_s/16, S_s/16); no grad when frozen."""
        return self.sam.encode_images(sam_images)

    def upsample_coarse(self, coarse_logits: torch.Tensor) -> torch.Tensor:
        """S'_C on the CLIP grid (B, 1, h_c, w_c) -> S_C in the low-res frame (B, 1, S_s/4, S_s/4).

        The CLIP and SAM frames are the same letterboxed square, so a plain bilinear resize
        aligns them.
        """
        size = self.sam.lowres_size
        return F.interpolate(coarse_logits, (size, size), mode="bilinear", align_corners=False)

    def postprocess_masks(
        self,
        mask_logits: torch.Tensor,
        input_sizes: torch.Tensor,
        orig_sizes: torch.Tensor,
        image_index: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Low-res logits (B, 1, S_s/4, S_s/4) -> B logit maps (H, W) in the original frame."""
        return self.sam.postprocess_masks(mask_logits, input_sizes, orig_sizes, image_index)

    def learnable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that training changes (``requires_grad``), by name, detached."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    # ----------------------------------------------------------------------------------------
    # Construction and export
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        path_or_config: str | Path | Config | ModelConfig,
        clip_weights: str | None = None,
        sam_weights: str | None = None,
    ) -> PromptRIS:
        """Build from a YAML file, a ``Config`` or a ``ModelConfig`` (see ``build_prompt_ris``)."""
        from prompt_ris.config import Config, ModelConfig, load_config
        from prompt_ris.models.build import build_prompt_ris

        if isinstance(path_or_config, (str, Path)):
            cfg = load_config(path_or_config)
        elif isinstance(path_or_config, Config):
            cfg = path_or_config
        elif isinstance(path_or_config, ModelConfig):
            cfg = Config(model=path_or_config)
        else:
            raise TypeError(
                f"from_config takes a YAML path, a Config or a ModelConfig, got "
                f"{type(path_or_config).__name__}"
            )
        model = build_prompt_ris(cfg.model, clip_weights=clip_weights, sam_weights=sam_weights)
        model.config = cfg  # the whole config (data frames, training), not only its model part
        return model

    def save_pretrained(self, directory: str | Path, self_contained: bool = False) -> Path:
        """Write ``model.safetensors`` (learned parameters, or everything with
        ``self_contained``) and ``config.json``; see ``prompt_ris.models.pretrained``."""
        from prompt_ris.models.pretrained import save_pretrained

        if self.config is None:
            raise ValueError("this PromptRIS has no config; build it with build_prompt_ris")
        return save_pretrained(self, directory, config=self.config, self_contained=self_contained)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        clip_weights: str | None = None,
        sam_weights: str | None = None,
    ) -> PromptRIS:
        """Rebuild from ``save_pretrained`` output (strict keys); see ``models.pretrained``."""
        from prompt_ris.models.pretrained import load_pretrained

        return load_pretrained(directory, clip_weights=clip_weights, sam_weights=sam_weights)

    def predict(self, image: object, expressions: str | list[str], **kwargs: object) -> object:
        """One-shot prediction for an image path/array and expressions (``predictor.predict``)."""
        from prompt_ris.predictor import predict

        return predict(self, image, expressions, **kwargs)
