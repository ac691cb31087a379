"""PromptRIS: prompt-tuned CLIP -> coarse mask -> mask/point/text prompts -> frozen SAM.

Glossary (paper symbol -> code name; docs/design.md has the full table and the equation index):

    F_IC  CLIP image tokens (B, h*w, D_IC)        -> ``CLIPFeatures.img_tokens``
    F_T   CLIP text tokens (B, L, D_T)            -> ``CLIPFeatures.text_tokens``
    T_V2L / T_L2V  CMP prompts (eqs. 5-6)         -> ``V2LPrompter`` / ``L2VPrompter`` outputs
    t_g   global text feature at [EOS]            -> ``text_global``
    S'_C  coarse mask (B, 1, h, w), CLIP grid     -> ``coarse_logits``
    S_C   S'_C upsampled to the low-res frame     -> ``coarse_lowres``
    F_IS  SAM image embedding (I, D_S, h_s, w_s)  -> ``sam_img_embed``
    E, e_p  point table, point (eq. 3)            -> ``FrozenSAM.point_table``, ``embed_point``
    P_mask, P_text                                -> ``SAMPrompts.dense``, ``TextPrompter`` output
    S'    SAM mask (B, 1, S_s/4, S_s/4), low-res  -> ``mask_logits``

The class is the top of the model package: its parts are built by ``models.build`` and its
checkpoints written and read by ``models.pretrained``; it imports both, and neither imports it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prompt_ris.config import Config, ModelConfig, load_config
from prompt_ris.data.batch import ModelInputs
from prompt_ris.data.text import expression_list, tokenize
from prompt_ris.data.transforms import ImageInput, LetterboxedImage, as_rgb_image, letterbox_image
from prompt_ris.frames import lowres_cell_to_original, lowres_to_original
from prompt_ris.metrics import DEFAULT_THRESHOLD, threshold_logit
from prompt_ris.models.build import build_parts
from prompt_ris.models.cross_modal_prompting import PromptedCLIP
from prompt_ris.models.coarse_decoder import CoarseDecoder
from prompt_ris.models.frozen_sam import FrozenSAM, PromptKeep
from prompt_ris.models.hub import checkpoint_folder, push_to_hub
from prompt_ris.models.pretrained import read_checkpoint, save_pretrained
from prompt_ris.models.text_prompter import TextPrompter
from prompt_ris.prompt_switches import PROMPT_TYPES, PromptSwitches


@dataclass
class PromptRISOutput:
    """Model outputs, the same type in training and evaluation.

    Attributes:
        coarse_logits: S'_C, (B, 1, h_c, w_c) on the CLIP token grid (30 x 30 for ViT-B).
        coarse_lowres: S_C, (B, 1, S_s/4, S_s/4) float32, S'_C upsampled to the low-res frame
            (what the mask and point prompts, the coarse losses and the coarse metrics read).
        mask_logits: S', (B, 1, S_s/4, S_s/4) in the low-res frame; None when ``with_sam=False``.
        text_global: t_g, (B, D_C).
        text_attention: where the text prompter's tokens read F_IS, (B, blocks, L, h_s w_s)
            cross-attention weights averaged over heads; only when asked for
            (``forward(..., text_attention=True)``) and text prompts were made.
        text_pad_mask: (B, L) bool, True at padding, with ``text_attention``.
    """

    coarse_logits: torch.Tensor
    coarse_lowres: torch.Tensor
    mask_logits: torch.Tensor | None
    text_global: torch.Tensor
    text_attention: torch.Tensor | None = None
    text_pad_mask: torch.Tensor | None = None


@dataclass
class EncodedBatch:
    """What ``PromptRIS.encode`` computes once per batch, shared by every prompt switch set.

    Attributes:
        text_tokens: F_T, (B, L, D_T) CLIP text tokens after CMP.
        text_pad_mask: (B, L) bool, True at padding.
        coarse_logits: S'_C, (B, 1, h_c, w_c).
        coarse_lowres: S_C, (B, 1, S_s/4, S_s/4) float32.
        text_global: t_g, (B, D_C).
        sam_img_embed: F_IS, (I, D_S, h_s, w_s), None when SAM was not run.
        image_index: (B,) expression -> image row.
    """

    text_tokens: torch.Tensor
    text_pad_mask: torch.Tensor
    coarse_logits: torch.Tensor
    coarse_lowres: torch.Tensor
    text_global: torch.Tensor
    sam_img_embed: torch.Tensor | None
    image_index: torch.Tensor


@dataclass
class FrameLogits:
    """Masks of B expressions mapped back to their images' original frames.

    Attributes:
        coarse: B float32 (H_b, W_b) logit maps of S_C, or None when not asked for.
        final: per switch set, B float32 (H_b, W_b) logit maps of S'.
        points: (B, 2) float32 (x, y) in the original frames where the point prompt clicks
            (the argmax cell of S_C, eq. 3 in eval mode), with ``coarse``.
    """

    coarse: list[torch.Tensor] | None
    final: dict[PromptSwitches, list[torch.Tensor]]
    points: torch.Tensor | None = None


class NonFiniteOutputError(RuntimeError):
    """The model produced NaN or infinite logits."""


@dataclass
class Prediction:
    """Masks for the N expressions of one image, in the original frame (H, W as loaded).

    Attributes:
        expressions: the N expressions, in order.
        masks: (N, H, W) bool, final (SAM) masks thresholded at the prediction's threshold.
        probs: (N, H, W) float32 foreground probabilities, when ``return_probs``.
        coarse_masks: (N, H, W) bool, the CLIP coarse mask S_C mapped to the original frame,
            when ``return_coarse``.
        coarse_probs: (N, H, W) float32, when both ``return_coarse`` and ``return_probs``.
        points: (N, 2) float32 (x, y) in the original frame where the point prompt clicked
            (eq. 3: the argmax of S_C), when ``return_coarse``.
    """

    expressions: list[str]
    masks: np.ndarray
    probs: np.ndarray | None = None
    coarse_masks: np.ndarray | None = None
    coarse_probs: np.ndarray | None = None
    points: np.ndarray | None = None

    @classmethod
    def from_logits(
        cls,
        expressions: list[str],
        logits: dict[str, torch.Tensor],
        threshold: float = DEFAULT_THRESHOLD,
        return_probs: bool = False,
    ) -> Prediction:
        """Threshold ``{"final": (N, H, W)[, "coarse": (N, H, W), "points": (N, 2)]}`` logits
        into a Prediction.

        A pixel is foreground when its probability is strictly above ``threshold``.

        Raises:
            NonFiniteOutputError: a logit is NaN or infinite (it would threshold to an empty
                mask without a word).
        """
        cut = threshold_logit(threshold)
        logits = dict(logits)
        points = logits.pop("points", None)
        for name, values in logits.items():
            finite = torch.isfinite(values).flatten(1).all(1)  # (N,)
            if not bool(finite.all()):
                bad = [expressions[k] for k in torch.nonzero(~finite).flatten().tolist()]
                raise NonFiniteOutputError(
                    f"the {name} mask of {bad[:3]} came out NaN or infinite, not a mask: the "
                    "weights hold non-finite values or the computation overflowed; predict in "
                    "float32 (--dtype fp32, dtype=torch.float32) or use another checkpoint"
                )
        prediction = cls(expressions=expressions, masks=_numpy(logits["final"] > cut))
        if return_probs:
            prediction.probs = _numpy(torch.sigmoid(logits["final"]))
        if "coarse" in logits:
            prediction.coarse_masks = _numpy(logits["coarse"] > cut)
            if return_probs:
                prediction.coarse_probs = _numpy(torch.sigmoid(logits["coarse"]))
        if points is not None:
            prediction.points = _numpy(points)
        return prediction


class PromptRIS(nn.Module):
    """Prompt-RIS (Sec. 3): the composition of the parts built by ``models.build``.

    Args:
        clip: PromptedCLIP (CLIP towers + Cross-Modal Prompting, eqs. 5-6).
        decoder: CoarseDecoder (eqs. 1-2).
        sam: FrozenSAM (SAM's encoder, its side of the prompts with eq. 3, decoding with eq. 4).
        text_prompter: TextPrompter (the learned text prompts P_text).
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
        self.text_prompter = text_prompter
        self.text_length = text_length
        self.drop_probs = drop_probs
        self.default_switches = default_switches
        self.config = config

    # ----------------------------------------------------------------------------------------
    # Forward: the data flow of docs/design.md, "Data flow"
    # ----------------------------------------------------------------------------------------
    def forward(
        self,
        inputs: ModelInputs,
        *,
        with_sam: bool = True,
        switches: PromptSwitches | None = None,
        sam_img_embed: torch.Tensor | None = None,
        prompt_dropout: bool | None = None,
        text_attention: bool = False,
    ) -> PromptRISOutput:
        """Segment the objects B expressions refer to in I images: ``encode``, then ``decode``.

        Args:
            inputs: CLIP and SAM images (I, 3, S, S), text tokens (B, L), image_index (B,);
                a :class:`~prompt_ris.data.batch.Batch` is one.
            with_sam: False skips SAM (stage 1): only the coarse mask is computed.
            switches: prompts given to SAM; defaults to the config's ``model.prompts.switches``.
            sam_img_embed: precomputed F_IS (I, D_S, h_s, w_s), e.g. from ``encode_sam``;
                ``inputs.sam_images`` is then not read.
            prompt_dropout: drop prompts per sample (Sec. 4.2); None = ``self.training``.
            text_attention: also return where the text prompter's tokens read F_IS
                (``PromptRISOutput.text_attention``; for ``train.text_grounding_weight``).
        """
        encoded = self.encode(inputs, with_sam=with_sam, sam_img_embed=sam_img_embed)
        maps: list[torch.Tensor] | None = [] if text_attention else None
        mask_logits = (
            self.decode(encoded, switches, prompt_dropout=prompt_dropout, text_attention=maps)
            if with_sam
            else None
        )
        return PromptRISOutput(
            encoded.coarse_logits,
            encoded.coarse_lowres,
            mask_logits,
            encoded.text_global,
            text_attention=torch.stack(maps, 1) if maps else None,  # (B, blocks, L, hw)
            text_pad_mask=encoded.text_pad_mask if maps else None,
        )

    def encode(
        self,
        inputs: ModelInputs,
        *,
        with_sam: bool = True,
        sam_img_embed: torch.Tensor | None = None,
    ) -> EncodedBatch:
        """The part of the forward that no prompt switch changes: CLIP with CMP, the coarse
        decoder and (``with_sam``) SAM's image encoder, once per batch.

        Args:
            inputs: as for ``forward``.
            with_sam: also compute F_IS (unless ``sam_img_embed`` is given).
            sam_img_embed: precomputed F_IS (I, D_S, h_s, w_s).
        """
        image_index = inputs.image_index
        feats = self.clip(inputs.clip_images, inputs.text_tokens, image_index)  # eqs. 5-6
        coarse = self.decoder(  # eqs. 1-2: S'_C (B, 1, h_c, w_c), t_g (B, D_C)
            feats.img_tokens, feats.text_tokens, feats.text_pad_mask, feats.eos_index,
            feats.grid_size,
        )  # fmt: skip
        coarse_lowres = self.upsample_coarse(coarse.coarse_logits)  # S_C: (B, 1, S_s/4, S_s/4)
        if with_sam and sam_img_embed is None:
            sam_img_embed = self.encode_sam(inputs.sam_images)  # F_IS: once per image
        if sam_img_embed is not None:
            sam_img_embed = sam_img_embed.to(self.sam.dtype)  # e.g. a cached fp16 F_IS
        return EncodedBatch(
            text_tokens=feats.text_tokens,
            text_pad_mask=feats.text_pad_mask,
            coarse_logits=coarse.coarse_logits,
            coarse_lowres=coarse_lowres,
            text_global=coarse.text_global,
            sam_img_embed=sam_img_embed,
            image_index=image_index,
        )

    def decode(
        self,
        encoded: EncodedBatch,
        switches: PromptSwitches | None = None,
        *,
        prompt_dropout: bool | None = None,
        text_attention: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """SAM's prompt and decoder side for one switch set: the final mask S' (B, 1, S_s/4,
        S_s/4) in the low-res frame.

        Args:
            encoded: ``encode``'s output, with F_IS.
            switches: prompts given to SAM; defaults to the config's ``model.prompts.switches``.
            prompt_dropout: drop prompts per sample (Sec. 4.2); None = ``self.training``.
            text_attention: when given, the text prompter's cross-attention weights
                (B, L, h_s w_s) per block are appended to it.
        """
        if encoded.sam_img_embed is None:
            raise ValueError("decode needs F_IS; call encode(inputs, with_sam=True)")
        switches = self.default_switches if switches is None else switches
        image_index, sam_img_embed = encoded.image_index, encoded.sam_img_embed
        dropout = self.training if prompt_dropout is None else prompt_dropout
        batch = int(encoded.text_tokens.shape[0])
        keep = self._prompt_keep(batch, switches, dropout, image_index.device)
        text_prompts = (  # P_text: (B, L, D_S)
            self.text_prompter(
                encoded.text_tokens, encoded.text_pad_mask, sam_img_embed, image_index,
                self.sam.dense_pe(), text_attention,
            )
            if "text" in switches
            else None
        )  # fmt: skip
        prompts = self.sam.embed_prompts(  # P_mask, [P_point (eq. 3); pad; P_text]
            encoded.coarse_lowres, use_point="point" in switches, text_prompts=text_prompts,
            text_pad_mask=encoded.text_pad_mask, keep=keep,
        )  # fmt: skip
        return self.sam.decode(sam_img_embed, image_index, prompts)  # eq. 4: S'

    def _prompt_keep(
        self, batch: int, switches: PromptSwitches, dropout: bool, device: torch.device
    ) -> PromptKeep:
        """Per-sample keep flags (None = kept everywhere). A switched-off mask is never kept
        (switched-off point/text prompts are not computed at all); with dropout each prompt
        type is dropped per sample with its own probability (Sec. 4.2)."""
        flags: dict[str, torch.Tensor | None] = {}
        for prompt_type, prob in zip(PROMPT_TYPES, self.drop_probs):
            if prompt_type not in switches:
                flags[prompt_type] = torch.zeros(batch, dtype=torch.bool, device=device)
            elif dropout and prob > 0:
                flags[prompt_type] = torch.rand(batch, device=device) >= prob
            else:
                flags[prompt_type] = None
        return PromptKeep(**flags)

    # ----------------------------------------------------------------------------------------
    # Pieces used by the engine and by inference
    # ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights (inputs are cast to it)."""
        return next(self.parameters()).dtype

    @property
    def clip_image_size(self) -> int:
        """S_c, side of the CLIP frame (480 for ViT-B/16)."""
        return int(self.clip.clip.visual.image_size[0])

    def encode_sam(self, sam_images: torch.Tensor) -> torch.Tensor:
        """F_IS for I images (I, 3, S_s, S_s) -> (I, D_S, S_s/16, S_s/16); no grad when frozen."""
        return self.sam.encode_images(sam_images)

    def upsample_coarse(self, coarse_logits: torch.Tensor) -> torch.Tensor:
        """S'_C on the CLIP grid (B, 1, h_c, w_c) -> S_C (B, 1, S_s/4, S_s/4) float32.

        The CLIP and SAM frames are the same letterboxed square, so a plain bilinear resize
        aligns them.
        """
        size = self.sam.lowres_size
        return F.interpolate(
            coarse_logits.float(), (size, size), mode="bilinear", align_corners=False
        )

    def original_logits(
        self,
        out: PromptRISOutput,
        input_sizes: torch.Tensor,
        orig_sizes: torch.Tensor,
        image_index: torch.Tensor,
        outputs: Sequence[str] = ("coarse", "final"),
    ) -> dict[str, list[torch.Tensor]]:
        """The coarse (S_C) and final (S') masks in each expression's original frame.

        Args:
            out: the forward's output.
            input_sizes: (I, 2) (h', w') of each image in the SAM frame.
            orig_sizes: (I, 2) (H, W) of each original image.
            image_index: (B,) expression -> image row.
            outputs: which of "coarse" and "final" to map ("final" only when SAM ran).

        Returns:
            ``{output: B float32 logit maps (H_b, W_b)}``.
        """
        lowres = {"coarse": out.coarse_lowres, "final": out.mask_logits}
        return {
            name: self.to_original(lowres[name], input_sizes, orig_sizes, image_index)
            for name in outputs
            if lowres[name] is not None
        }

    def to_original(
        self,
        lowres: torch.Tensor,
        input_sizes: torch.Tensor,
        orig_sizes: torch.Tensor,
        image_index: torch.Tensor,
    ) -> list[torch.Tensor]:
        """(B, 1, S_s/4, S_s/4) low-res logits -> B float32 (H_b, W_b) maps in the original
        frames (SAM's ``postprocess_masks``, :func:`prompt_ris.frames.lowres_to_original`)."""
        return lowres_to_original(lowres, input_sizes, orig_sizes, image_index, self.sam.image_size)

    @torch.no_grad()
    def segment_batch(
        self,
        inputs: ModelInputs,
        input_sizes: torch.Tensor,
        orig_sizes: torch.Tensor,
        switch_sets: Sequence[PromptSwitches | None] = (None,),
        *,
        with_coarse: bool = True,
        sam_img_embed: torch.Tensor | None = None,
    ) -> FrameLogits:
        """Masks of a batch in the original frames, for one or more prompt switch sets.

        Runs in eval mode (argmax point, no prompt dropout) and restores the mode afterwards.
        CLIP, the coarse decoder and SAM's image encoder run once; SAM's prompt and decoder
        side once per switch set. Evaluation and single-image prediction both come here.

        Args:
            inputs: images (I, 3, S, S), text tokens (B, L) and image_index (B,).
            input_sizes: (I, 2) (h', w') of each image in the SAM frame.
            orig_sizes: (I, 2) (H, W) of each original image.
            switch_sets: the switch sets to decode with (None = the model's own); empty: the
                coarse mask only, without SAM.
            with_coarse: also map the coarse mask S_C.
            sam_img_embed: F_IS (I, D_S, h_s, w_s) of these images, if already computed.
        """
        with _eval_mode(self):
            encoded = self.encode(
                inputs, with_sam=len(switch_sets) > 0, sam_img_embed=sam_img_embed
            )
            index = inputs.image_index
            final = {}
            for switches in switch_sets:
                switches = self.default_switches if switches is None else switches
                mask_logits = self.decode(encoded, switches)  # S': (B, 1, S_s/4, S_s/4)
                final[switches] = self.to_original(mask_logits, input_sizes, orig_sizes, index)
            coarse, points = None, None
            if with_coarse:
                coarse = self.to_original(encoded.coarse_lowres, input_sizes, orig_sizes, index)
                cells = encoded.coarse_lowres.flatten(1).argmax(dim=1)  # (B,) eq. 3's click
                points = lowres_cell_to_original(
                    cells, input_sizes, orig_sizes, index, self.sam.lowres_size,
                    self.sam.image_size,
                )  # fmt: skip
        return FrameLogits(coarse=coarse, final=final, points=points)

    def learnable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that training changes (``requires_grad``), by name, detached."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    # ----------------------------------------------------------------------------------------
    # Inference on one image (the core of ``Predictor``)
    # ----------------------------------------------------------------------------------------
    def letterbox(self, image: ImageInput) -> LetterboxedImage:
        """A path, PIL image or uint8 array in this model's CLIP and SAM frames (CPU tensors)."""
        return letterbox_image(as_rgb_image(image), self.clip_image_size, self.sam.image_size)

    @torch.inference_mode()
    def segment(
        self,
        image: LetterboxedImage,
        text_tokens: torch.Tensor,
        *,
        sam_img_embed: torch.Tensor | None = None,
        switches: PromptSwitches | None = None,
        with_coarse: bool = False,
        max_batch: int | None = None,
        with_points: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Logits of N tokenized expressions about one letterboxed image, in its original frame.

        Runs in eval mode (argmax point, no prompt dropout) and restores the mode afterwards.

        Args:
            image: the image in both frames (``letterbox``).
            text_tokens: (N, L) long, ``tokenize(texts, self.text_length)``.
            sam_img_embed: F_IS (1, D_S, h_s, w_s) of this image, if already computed (else it
                is computed once for all N).
            switches: which SAM prompts to use; default: the model's config.
            with_coarse: also map the coarse mask S_C.
            max_batch: expressions per forward pass (None: all at once); results do not
                depend on it.
            with_points: also return where the point prompt clicked (needs ``with_coarse``).

        Returns:
            ``{"final": (N, H, W)[, "coarse": (N, H, W)][, "points": (N, 2)]}`` float32 logits
            and the (x, y) of the clicks.
        """
        image = image.to(self.device, self.dtype)
        sizes = (torch.tensor([image.input_size]), torch.tensor([image.orig_size]))
        if sam_img_embed is None:
            sam_img_embed = self.encode_sam(image.sam_image[None])  # (1, D_S, h_s, w_s)
        chunks: dict[str, list[torch.Tensor]] = {"final": [], "coarse": [], "points": []}
        for tokens in text_tokens.split(max_batch or max(1, text_tokens.shape[0])):
            num = tokens.shape[0]
            inputs = ModelInputs(
                clip_images=image.clip_image[None],  # (1, 3, S_c, S_c)
                sam_images=image.sam_image[None],  # (1, 3, S_s, S_s)
                text_tokens=tokens.to(self.device),  # (n, L)
                image_index=torch.zeros(num, dtype=torch.long, device=self.device),  # (n,)
            )
            frames = self.segment_batch(
                inputs, *sizes, (switches,), with_coarse=with_coarse, sam_img_embed=sam_img_embed
            )
            (final,) = frames.final.values()
            chunks["final"].extend(final)
            chunks["coarse"].extend(frames.coarse or ())
            chunks["points"].extend(() if frames.points is None else frames.points)
        if not with_points:
            chunks.pop("points")
        return {name: torch.stack(maps) for name, maps in chunks.items() if maps}  # (N, H, W)

    def predict(
        self,
        image: ImageInput | LetterboxedImage,
        expressions: str | Sequence[str],
        *,
        switches: PromptSwitches | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        return_probs: bool = False,
        return_coarse: bool = False,
        sam_img_embed: torch.Tensor | None = None,
        max_batch: int | None = None,
    ) -> Prediction:
        """Masks for one image and one or more expressions, on the model's device and dtype.

        For several questions about one image, device and precision choices and long lists,
        use ``prompt_ris.Predictor``, which embeds the image once and calls this.

        Args:
            image: a file path (turned upright by its EXIF orientation), a PIL image, an
                (H, W, 3) uint8 RGB array, or an image already letterboxed (``letterbox``).
            expressions: one expression or a list; each must be non-empty.
            switches: which SAM prompts to use (Table 5); default: the model's config.
            threshold: probability above which a pixel belongs to the mask.
            return_probs: also return foreground probabilities.
            return_coarse: also return the CLIP coarse mask S_C.
            sam_img_embed: F_IS (1, D_S, h_s, w_s) of this image, if already computed.
            max_batch: expressions per forward pass (None: all at once).

        Returns:
            A :class:`Prediction` with (N, H, W) arrays in the original frame.

        Raises:
            TypeError: ``expressions`` is not a string or a list of strings.
            NonFiniteOutputError: the model gave NaN or infinite logits.
        """
        texts = expression_list(expressions)
        tokens = tokenize(texts, self.text_length, warn_truncated=True)  # (N, L)
        letterboxed = image if isinstance(image, LetterboxedImage) else self.letterbox(image)
        logits = self.segment(
            letterboxed, tokens, sam_img_embed=sam_img_embed, switches=switches,
            with_coarse=return_coarse, max_batch=max_batch, with_points=return_coarse,
        )  # fmt: skip
        return Prediction.from_logits(texts, logits, threshold, return_probs)

    # ----------------------------------------------------------------------------------------
    # Construction and checkpoints
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        path_or_config: str | Path | Config | ModelConfig,
        clip_weights: str | None = None,
        sam_weights: str | None = None,
    ) -> PromptRIS:
        """Build from a YAML file, a ``Config`` or a ``ModelConfig``.

        Args:
            path_or_config: the config; a bare ``ModelConfig`` is wrapped into a default
                ``Config``.
            clip_weights: overrides ``model.clip.pretrained`` (a file or an open_clip tag).
            sam_weights: overrides ``model.sam.checkpoint`` (a file).

        Returns:
            PromptRIS with CLIP and SAM frozen as the config says and the learned parts
            trainable; ``model.config`` is the whole config.
        """
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
        parts = build_parts(cfg.model, clip_weights=clip_weights, sam_weights=sam_weights)
        return cls(**parts.as_kwargs(), config=cfg)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        clip_weights: str | None = None,
        sam_weights: str | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
    ) -> PromptRIS:
        """Rebuild a model written by ``save_pretrained`` (or exported by training), from a
        folder or from the model hub (``"owner/name"``, see ``models.hub``).

        A learned-only checkpoint is rebuilt on the base weights its config names (or on
        ``clip_weights`` / ``sam_weights``); a self-contained one needs no base-weight files.
        Keys and shapes are checked strictly (see ``models.pretrained``).

        Args:
            path: a checkpoint folder or its ``model.safetensors``, or a hub id
                ``owner/name`` (when no such local path exists).
            clip_weights: local CLIP weights (or open_clip tag) replacing the config's.
            sam_weights: local SAM checkpoint replacing the config's.
            device: where to put the model (default: CPU).
            dtype: cast the floating tensors to this dtype (default: float32, as built).
            revision: hub branch, tag or commit (hub ids only).
            cache_dir: huggingface_hub's cache folder (default: its own).
            local_files_only: only look in that cache (as ``HF_HUB_OFFLINE=1`` does).

        Returns:
            The model in eval mode, ``model.config`` set to the checkpoint's ``Config``.
        """
        folder = checkpoint_folder(
            path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
        checkpoint = read_checkpoint(folder)
        model_cfg, clip_weights, sam_weights = checkpoint.build_args(clip_weights, sam_weights)
        model = cls.from_config(model_cfg, clip_weights=clip_weights, sam_weights=sam_weights)
        checkpoint.load_into(model)
        model.config = copy.deepcopy(checkpoint.config)  # the full resolved config
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(
        self, directory: str | Path, self_contained: bool = False, training: dict | None = None
    ) -> Path:
        """Write ``model.safetensors`` (the learned parameters, or everything with
        ``self_contained``) and ``config.json`` into ``directory``; see ``models.pretrained``.

        Returns:
            The path of the written ``model.safetensors``.
        """
        if self.config is None:
            raise ValueError("this PromptRIS has no config; build it with PromptRIS.from_config")
        return save_pretrained(
            self, directory, config=self.config, self_contained=self_contained, training=training
        )


    def push_to_hub(
        self, repo_id: str, results: dict | None = None, self_contained: bool = False,
        **options: object,
    ) -> str:  # fmt: skip
        """Upload this model with its model card (and the figures of ``results``, a
        ``results.json``) to the hub repository ``repo_id``; ``options``: ``private``,
        ``token``, ``revision``, ``commit_message``. Returns the commit's URL."""
        return push_to_hub(
            lambda folder: self.save_pretrained(folder, self_contained=self_contained),
            repo_id, results, **options,
        )  # fmt: skip


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
