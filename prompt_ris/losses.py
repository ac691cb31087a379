"""The training stages and their losses: BCE + Dice segmentation, Instance Contrastive Learning
(eqs. 7-8), eq. (9); and the text grounding loss, an option the paper does not have.

Conventions (docs/design.md, "Losses"):

- Every loss works in float32 (logits are cast, autocast is switched off for the ICL matmul),
  so bf16 mixed precision neither underflows the logs nor rounds the overlaps O.
- A target of a different size than the logits is area-resized to the logits' size. The coarse
  terms read S_C, the coarse mask already upsampled by the model (bilinear, in float32) from the
  CLIP grid to the low-res frame of ``gt_masks`` (S_s / 4): both frames letterbox the same image
  the same way, so this is a pure resampling.
- Dice follows V-Net [36] (the paper's Dice reference, and the form of eq. 7): squared sums in the
  denominator, ``1 - (2 sum(p t) + s) / (sum p^2 + sum t^2 + s)`` per mask with smoothing ``s = 1``
  (so an empty prediction of an empty target costs 0), averaged over the batch. ``dice_loss``
  also has the plain-sum form (``squared=False``: ``sum p + sum t``), which the miniature SAM's
  pretraining uses.
- ICL's weight ``w_i`` is the hard IoU of ``sigmoid(S_i) > 0.5`` (i.e. ``logits > 0``) with
  ``target > 0.5``; it carries no gradient. An empty prediction of an empty target has IoU 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.nn.functional as F

from prompt_ris.data.batch import Batch
from prompt_ris.models import PromptRISOutput


class Stage(IntEnum):
    """The two training stages (Sec. 4.2); ``train.stage1_epochs`` / ``stage2_epochs`` count
    their epochs."""

    COARSE = 1  # CLIP + CMP + ICL: the coarse mask S_C only, SAM not run
    FULL = 2  # end to end: the final mask through the prompts and the frozen SAM too


DICE_SMOOTH = 1.0  # additive smoothing of the segmentation Dice (numerator and denominator)
ICL_EPS = 1e-6  # O_ij is clamped to [eps, 1 - eps] before the logs of eq. (8)


def _match_size(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-resize ``target`` (B, 1, H, W) to ``size`` unless it already has it."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target.float()
    return F.interpolate(target.float(), size=size, mode="area")


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    squared: bool = True,
) -> torch.Tensor:
    """Dice loss ``1 - (2 sum(p t) + s) / (sum p^2 + sum t^2 + s)`` (V-Net), mean over the batch,
    with ``s = DICE_SMOOTH``; with ``squared=False`` the denominator is ``sum p + sum t + s``.

    Args:
        logits: (B, 1, h, w) mask logits.
        target: (B, 1, h, w) ground truth in [0, 1], same size as ``logits``.
        squared: squared sums in the denominator (V-Net, eq. 7's form), else plain sums.

    Returns:
        Scalar tensor.
    """
    probs = logits.float().sigmoid().flatten(1)  # (B, h*w)
    target = target.float().flatten(1)  # (B, h*w)
    inter = (probs * target).sum(-1)  # (B,)
    if squared:
        denom = probs.square().sum(-1) + target.square().sum(-1)  # (B,)
    else:
        denom = probs.sum(-1) + target.sum(-1)  # (B,)
    return (1.0 - (2.0 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)).mean()


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Segmentation loss ``BCE + Dice`` (L_clipseg / L_samseg of eq. 9).

    BCE-with-logits is the mean over all pixels of all masks; Dice is the V-Net form (module
    docstring) averaged over the masks.

    Args:
        logits: (B, 1, h, w) mask logits.
        target: (B, 1, H, W) ground truth in [0, 1]; area-resized to (h, w) if the sizes differ.

    Returns:
        Scalar tensor.
    """
    logits = logits.float()
    target = _match_size(target, tuple(logits.shape[-2:]))  # (B, 1, h, w)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return bce + dice_loss(logits, target)


@torch.no_grad()
def hard_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` (probability > 0.5) with ``target > 0.5``, per mask, no gradient.

    Args:
        logits: (B, 1, h, w) mask logits.
        target: (B, 1, h, w) ground truth in [0, 1].

    Returns:
        (B,) float IoU; 1.0 where prediction and ground truth are both empty.
    """
    pred = (logits > 0).flatten(1)  # (B, h*w)
    gt = (target > 0.5).flatten(1)  # (B, h*w)
    inter = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def instance_contrastive_loss(
    logits: torch.Tensor,
    object_ids: torch.Tensor,
    image_index: torch.Tensor,
    target: torch.Tensor,
    eps: float = ICL_EPS,
) -> torch.Tensor:
    """Instance Contrastive Learning loss L_icl (eqs. 7-8).

    For the b expressions of one image: ``O_ij = 2 sum_k S_i^k S_j^k / (sum_k (S_i^k)^2 +
    sum_k (S_j^k)^2)`` on sigmoid probabilities (eq. 7), clamped to ``[eps, 1 - eps]``;
    ``Y_ij = 1`` when expressions i and j refer to the same object; ``w_i`` = IoU of mask i with
    its ground truth (no gradient, :func:`hard_iou`);
    ``L = -(1 / b^2) sum_ij w_i (Y_ij log O_ij + (1 - Y_ij) log(1 - O_ij))`` (eq. 8).
    The loss is averaged over the images; images may have different b. The diagonal (i = j) is
    included as in eq. (8); it is a constant ``-w_i log(1 - eps)`` with no gradient.
    :func:`icl_pairs` gives the pairs themselves (O, Y, w and each pair's term).

    Args:
        logits: (B, 1, h, w) mask logits.
        object_ids: (B,) annotated object identity of each expression.
        image_index: (B,) image row of each expression.
        target: (B, 1, H, W) ground truth in [0, 1]; area-resized to (h, w) if sizes differ.
        eps: clamp margin for O.

    Returns:
        Scalar tensor.
    """
    # Autocast would run the matmul below in bf16/fp16: O needs float32 near 0 and 1.
    with torch.autocast(logits.device.type, enabled=False):
        return _icl(logits.float(), object_ids, image_index, target, eps)


@dataclass
class ICLPairs:
    """The pairwise quantities of eq. (8) for a batch; pairs across images are zero in ``terms``.

    Attributes:
        overlap: O_ij, eq. (7), (B, B), unclamped.
        gap: 1 - O_ij computed from the mask differences (exact near O = 1), (B, B), unclamped.
        same_object: Y_ij, (B, B) float.
        same_image: (B, B) bool, i and j are expressions of the same image.
        weights: w_i, (B,), the hard IoU of mask i with its ground truth.
        terms: ``-w_i (Y_ij log O_ij + (1 - Y_ij) log(1 - O_ij))`` with O clamped, (B, B),
            zero where ``same_image`` is False; the loss is their mean over each image's b^2
            pairs, averaged over the images.
    """

    overlap: torch.Tensor
    gap: torch.Tensor
    same_object: torch.Tensor
    same_image: torch.Tensor
    weights: torch.Tensor
    terms: torch.Tensor


def icl_pairs(
    logits: torch.Tensor,
    object_ids: torch.Tensor,
    image_index: torch.Tensor,
    target: torch.Tensor,
    eps: float = ICL_EPS,
) -> ICLPairs:
    """Every pair's O_ij, Y_ij, w_i and term of eq. (8), in float32 (the arguments of
    :func:`instance_contrastive_loss`); what the loss sums, pair by pair."""
    with torch.autocast(logits.device.type, enabled=False):
        return _pairs(logits.float(), object_ids, image_index, target, eps)


def _pairs(
    logits: torch.Tensor,
    object_ids: torch.Tensor,
    image_index: torch.Tensor,
    target: torch.Tensor,
    eps: float,
) -> ICLPairs:
    """Body of :func:`icl_pairs`, in float32."""
    target = _match_size(target, tuple(logits.shape[-2:]))  # (B, 1, h, w)
    weights = hard_iou(logits, target)  # (B,)
    probs = logits.sigmoid().flatten(1)  # (B, h*w)
    # All pairs of the batch at once, pairs across images masked out: no loop over images and
    # no host-device synchronisation; every pairwise quantity is (B, B).
    same_image = image_index[:, None] == image_index[None, :]  # (B, B)
    squares = probs.square().sum(-1)  # (B,)
    denom = (squares[:, None] + squares[None, :]).clamp_min(torch.finfo(probs.dtype).tiny)
    overlap = 2.0 * (probs @ probs.T) / denom  # O, eq. (7), (B, B)
    # 1 - O = sum (S_i - S_j)^2 / denom, from the differences themselves (cdist without the
    # matmul shortcut): near O = 1, the case ICL pushes down for different objects, the
    # subtraction 1 - O would lose all float32 precision.
    distance = torch.cdist(probs, probs, compute_mode="donot_use_mm_for_euclid_dist")  # (B, B)
    gap = distance.square() / denom  # (B, B)
    same = (object_ids[:, None] == object_ids[None, :]).float()  # Y, (B, B)
    log_likelihood = (
        same * overlap.clamp(eps, 1.0 - eps).log() + (1.0 - same) * gap.clamp(eps, 1.0 - eps).log()
    )  # (B, B)
    terms = -(weights[:, None] * log_likelihood * same_image)  # (B, B)
    return ICLPairs(overlap, gap, same, same_image, weights, terms)


def _icl(
    logits: torch.Tensor,
    object_ids: torch.Tensor,
    image_index: torch.Tensor,
    target: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Body of :func:`instance_contrastive_loss`, in float32."""
    pairs = _pairs(logits, object_ids, image_index, target, eps)
    b = pairs.same_image.sum(-1).float()  # (B,) expressions of each row's image
    per_row = pairs.terms.sum(-1) / b.square()  # (B,)
    # Eq. (8) per image is the sum of its rows; the mean over images divides by their number,
    # sum_rows 1 / b_row.
    return per_row.sum() / b.reciprocal().sum()


def referent_share(target: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The referent's share of each cell of an h x w grid, normalised to sum to 1: (B, h w) from
    a (B, 1, H, W) ground truth in [0, 1] (area-pooled)."""
    cells = F.adaptive_avg_pool2d(target.float(), grid).flatten(1)  # (B, h w)
    return cells / cells.sum(1, keepdim=True).clamp_min(1e-6)


def text_grounding_loss(
    attention: torch.Tensor, text_pad_mask: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Where the text prompter's tokens read F_IS against where the referent is: the
    cross-entropy of each block's attention weights (per word token, [SOS] and [EOS] included)
    against the referent's share of each F_IS cell, normalised to sum to 1; mean over the
    expression's tokens, the blocks and the batch. Not in the paper
    (``train.text_grounding_weight``).

    Args:
        attention: (B, blocks, L, h w) weights over F_IS's square h x w grid, rows summing to 1.
        text_pad_mask: (B, L) bool, True at padding (left out).
        target: (B, 1, H, W) ground truth in [0, 1]; area-pooled to the grid.

    Returns:
        Scalar tensor.
    """
    side = math.isqrt(attention.shape[-1])
    if side * side != attention.shape[-1]:
        raise ValueError(f"attention over {attention.shape[-1]} cells is not a square grid")
    share = referent_share(target, (side, side))  # (B, h w)
    log_weights = attention.float().clamp_min(1e-8).log()  # (B, blocks, L, h w)
    per_token = -(share[:, None, None] * log_weights).sum(-1)  # (B, blocks, L)
    words = (~text_pad_mask).float()[:, None]  # (B, 1, L)
    return ((per_token * words).sum(-1) / words.sum(-1).clamp_min(1.0)).mean()


def stage_loss(
    out: PromptRISOutput,
    batch: Batch,
    stage: Stage,
    icl_weight: float = 1.0,
    text_grounding_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total training loss of a stage (eq. 9) and its terms for logging.

    ``Stage.COARSE``: ``L_clipseg + icl_weight * L_icl(coarse)``.
    ``Stage.FULL``: ``L_clipseg + L_samseg + icl_weight * (L_icl(coarse) + L_icl(final))``,
    plus ``text_grounding_weight * text_grounding_loss`` when that weight is above 0 (not in
    the paper; ``out.text_attention`` is then needed).
    The coarse terms read S_C (``out.coarse_lowres``, the low-res frame of ``batch.gt_masks``).

    Args:
        out: model output with ``coarse_lowres`` (B, 1, S_s/4, S_s/4) and ``mask_logits``
            (B, 1, S_s/4, S_s/4) or None (stage 1).
        batch: the batch with ``gt_masks``, ``object_ids`` and ``image_index``.
        stage: a ``Stage`` (or its number, 1 or 2).
        icl_weight: weight of the ICL terms (1.0 in the paper).
        text_grounding_weight: weight of the text grounding term (0 in the paper).

    Returns:
        The total loss (scalar tensor) and a dict of detached scalar tensors (read them with
        ``float()`` when logging; keeping them on the device avoids a host sync per step):
        ``clipseg``, ``icl_coarse`` and, in stage 2, ``samseg`` and ``icl_final`` (the ICL terms
        already multiplied by ``icl_weight``, so the terms sum to the total), ``text_grounding``
        when its weight is above 0 (multiplied too), plus ``total``.
    """
    if stage not in tuple(Stage):
        raise ValueError(f"stage must be 1 or 2 (a Stage), got {stage!r}")
    gt = batch.gt_masks.float()  # (B, 1, S_s/4, S_s/4)
    object_ids, image_index = batch.object_ids, batch.image_index
    coarse = out.coarse_lowres.float()  # S_C: (B, 1, S_s/4, S_s/4)

    def icl(logits: torch.Tensor) -> torch.Tensor:
        if icl_weight == 0:  # switched off: skip the pairwise work, keep the logged term
            return logits.new_zeros((), dtype=torch.float32)
        return icl_weight * instance_contrastive_loss(logits, object_ids, image_index, gt)

    terms = {"clipseg": bce_dice_loss(coarse, gt), "icl_coarse": icl(coarse)}
    if stage == Stage.FULL:
        if out.mask_logits is None:
            raise ValueError(
                "stage 2 loss needs out.mask_logits, but the model ran without SAM; "
                "call the model with with_sam=True in stage 2"
            )
        final = out.mask_logits.float()  # (B, 1, S_s/4, S_s/4)
        terms["samseg"] = bce_dice_loss(final, gt)
        terms["icl_final"] = icl(final)
        if text_grounding_weight > 0:
            if out.text_attention is None or out.text_pad_mask is None:
                raise ValueError(
                    "text_grounding_weight > 0 needs out.text_attention; call the model with "
                    "text_attention=True and text among its switches"
                )
            terms["text_grounding"] = text_grounding_weight * text_grounding_loss(
                out.text_attention, out.text_pad_mask, gt
            )
    total = torch.stack(list(terms.values())).sum()
    logged = {name: value.detach() for name, value in terms.items()}
    logged["total"] = total.detach()
    return total, logged
