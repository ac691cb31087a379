"""Promptable-segmentation pretraining of the tiny SAM on synthetic scenes.

segment_anything's ``Sam`` (built by ``prompt_ris.models.build.build_sam`` from the config
numbers) learns to segment an object from one of four prompts, all through SAM's own prompt
encoder and mask decoder (``multimask_output=False``: the first mask, the one Prompt-RIS reads):

- ``point``: a random pixel of the object (a positive click, padded as SAM pads a lone point);
- ``box``: the object's box with each side jittered by up to ``box_jitter`` of its length;
- ``mask``: a coarse mask, the kind Prompt-RIS feeds SAM: the ground truth pooled to a coarse grid
  (the CLIP patch grid and its neighbours), blurred, shifted, sometimes leaking onto another
  object, turned into logits of random confidence and upsampled bilinearly to the low-res frame;
- ``point+mask``: a click and a coarse mask together, the combination Prompt-RIS uses;
- ``clicks+mask``: a coarse mask with several positive and negative clicks, as in SAM's own
  interactive training rounds (the previous mask plus the clicks so far). Each prompt set has its
  own number of clicks, padded with SAM's ``not_a_point`` label (-1), so the frozen decoder meets
  sparse token lists of varying length and content, as Prompt-RIS's point and text prompts are.

Loss: BCE + Dice on the low-res logits against the low-res ground truth (the frames of
``prompt_ris.data.transforms``), plus SAM's IoU-prediction MSE.

Scenes come from ``world`` (``synthetic.WORLDS``): ``flat`` (the committed run) or ``ambiguous``
(a shape inside a larger one, two same-coloured shapes overlapping). With ``multimask`` the lone
click is trained as SAM trains an ambiguous prompt: its three multimask outputs (mask tokens 1-3,
``multimask_output=True``) against a target drawn among the masks that contain the click (the
object, or its group: the touching pair, the outer shape with its inner one), only the lowest of
the three losses back-propagated, all three IoU predictions trained; every other prompt kind
trains the single output (mask token 0) on the object, as without ``multimask``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.modeling import Sam

from prompt_ris.data.transforms import letterbox_sam, lowres_mask
from prompt_ris.losses import DICE_SMOOTH, dice_loss
from prompt_ris.miniature.captions import SceneSpec, paint_scene, sample_scene
from prompt_ris.miniature.synthetic import WORLDS
from prompt_ris.models.frozen_sam import MULTIMASK_TOKENS, predict_first_mask, predict_token_masks

logger = logging.getLogger(__name__)

PROMPT_KINDS = ("point", "box", "mask", "point+mask", "clicks+mask")
COARSE_GRIDS = (8, 16, 16, 32)  # coarse-mask resolutions drawn (the tiny CLIP grid is 16 x 16)


@dataclass
class SamPretrainConfig:
    """Settings of the promptable-segmentation pretraining (defaults: the committed run)."""

    steps: int = 1500
    images_per_step: int = 8
    objects_per_image: int = 4  # each gets every prompt kind: 4 x 4 masks per image
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    box_jitter: float = 0.1  # box sides move by up to this share of the box side
    leak_prob: float = 0.3  # share of coarse masks that also cover part of another object
    max_positive_clicks: int = 3  # clicks+mask: 1 to this many clicks on the object
    max_negative_clicks: int = 3  # clicks+mask: 0 to this many clicks off it
    seed: int = 0
    log_every: int = 50
    world: str = "flat"  # the scenes: synthetic.WORLDS
    multimask: bool = False  # a lone click trains the three multimask outputs (min loss)


@dataclass
class SamSample:
    """One scene in the SAM frame, with its objects' masks and prompts.

    Attributes:
        image: (3, S, S) SAM-normalised, letterboxed.
        input_size: (h', w') of the unpadded image in the SAM frame.
        gt_lowres: (K, S/4, S/4) float, covered fraction of each low-res pixel.
        masks: K (H, W) bool masks in the original frame.
        scale: SAM frame pixels per original pixel.
        situations: each object's situation (``synthetic.SITUATIONS``).
        groups: each object's group (``ShapeSpec.group``; -1 apart).
        group_masks: each group's (H, W) bool mask, the union of its objects' visible masks.
    """

    image: torch.Tensor
    input_size: tuple[int, int]
    gt_lowres: torch.Tensor
    masks: list[np.ndarray]
    scale: float
    situations: list[str] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    group_masks: dict[int, np.ndarray] = field(default_factory=dict)


def make_sample(spec: SceneSpec, sam_size: int) -> SamSample:
    """Draw a scene and put it and its visible masks into the SAM frames."""
    pixels, masks = paint_scene(spec)
    image, input_size = letterbox_sam(Image.fromarray(pixels), sam_size)
    kept = [i for i, m in enumerate(masks) if m.any()]  # one hidden entirely has nothing to show
    masks = [masks[i] for i in kept]
    gt = torch.stack([lowres_mask(m, sam_size) for m in masks])  # (K, S/4, S/4)
    scale = sam_size / max(spec.width, spec.height)  # the letterbox resize factor
    objects = [spec.objects[i] for i in kept]
    groups = [o.group for o in objects]
    group_masks = {
        g: np.logical_or.reduce([m for m, h in zip(masks, groups) if h == g])
        for g in sorted(set(groups) - {-1})
    }
    situations = [o.situation for o in objects]
    return SamSample(image, input_size, gt, masks, scale, situations, groups, group_masks)


def random_pixel(mask: np.ndarray, rng: random.Random) -> tuple[int, int]:
    """A random pixel (x, y) of ``mask``, in the original frame."""
    ys, xs = np.nonzero(mask)
    j = rng.randrange(len(xs))
    return int(xs[j]), int(ys[j])


def sam_point(pixel: tuple[int, int], scale: float) -> tuple[float, float]:
    """An original-frame pixel (x, y) as SAM point coordinates in the SAM frame.

    Pixel index i of the original has its centre at continuous position i + 0.5, which is
    (i + 0.5) * scale in the SAM frame; SAM adds 0.5 to a click, so the click is that minus 0.5.
    """
    return (pixel[0] + 0.5) * scale - 0.5, (pixel[1] + 0.5) * scale - 0.5


def random_point(mask: np.ndarray, scale: float, rng: random.Random) -> tuple[float, float]:
    """A random pixel of ``mask`` as SAM point coordinates (x, y) in the SAM frame."""
    return sam_point(random_pixel(mask, rng), scale)


def click_targets(sample: SamSample, k: int, pixel: tuple[int, int]) -> list[np.ndarray]:
    """The masks a click at ``pixel`` on object ``k`` can mean, those of them that contain it:
    the object's visible mask (the part) and its group's mask (the whole), (H, W) bool each."""
    x, y = pixel
    options = [sample.masks[k]]
    if sample.groups and sample.groups[k] >= 0:
        options.append(sample.group_masks[sample.groups[k]])
    return [m for m in options if m[y, x]]


def object_box(
    mask: np.ndarray, scale: float, rng: random.Random | None = None, jitter: float = 0.0
) -> tuple[float, float, float, float]:
    """The mask's box (x0, y0, x1, y1) in SAM-frame pixels, each side moved by up to
    ``jitter`` of the box's width or height (no jitter without ``rng``)."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0
    if rng is not None and jitter > 0:
        w, h = x1 - x0, y1 - y0
        x0, x1 = x0 + rng.uniform(-jitter, jitter) * w, x1 + rng.uniform(-jitter, jitter) * w
        y0, y1 = y0 + rng.uniform(-jitter, jitter) * h, y1 + rng.uniform(-jitter, jitter) * h
    return x0 * scale, y0 * scale, x1 * scale, y1 * scale


def coarse_mask_logits(
    gt_lowres: torch.Tensor,
    grid: int,
    confidence: float,
    shift: tuple[int, int] = (0, 0),
    leak: torch.Tensor | None = None,
    leak_weight: float = 0.0,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A coarse-mask prompt, as Prompt-RIS makes one: logits on a coarse grid, upsampled.

    Args:
        gt_lowres: (S/4, S/4) ground truth in the low-res frame.
        grid: side of the coarse grid (the CLIP patch grid is ``clip.image_size / patch_size``).
        confidence: logit of a fully covered cell (an empty cell gets ``-confidence``).
        shift: (dy, dx) cells to roll the coarse map by.
        leak: (S/4, S/4) another object's mask that leaks into the coarse mask, or None.
        leak_weight: share of it that leaks (0-1).
        noise: std of Gaussian noise added to the coarse probabilities.
        generator: random source of the noise.

    Returns:
        (1, S/4, S/4) logits, the format of SAM's ``mask_input``.
    """
    side = gt_lowres.shape[-1]
    target = gt_lowres if leak is None else torch.maximum(gt_lowres, leak_weight * leak)
    prob = F.adaptive_avg_pool2d(target[None, None], grid)  # (1, 1, g, g)
    prob = torch.roll(prob, shifts=shift, dims=(2, 3))
    if noise > 0:
        prob = prob + noise * torch.randn(prob.shape, generator=generator)
    logits = confidence * (2.0 * prob.clamp(0, 1) - 1.0)  # (1, 1, g, g)
    return F.interpolate(logits, (side, side), mode="bilinear", align_corners=False)[0]


def random_clicks(
    sample: SamSample, k: int, rng: random.Random, max_positive: int, max_negative: int
) -> list[tuple[float, float, int]]:
    """Clicks (x, y, label) for object ``k``: 1 to ``max_positive`` on it (label 1) and 0 to
    ``max_negative`` off it (label 0), most on the other objects (where a coarse mask leaks)."""
    clicks = [
        (*random_point(sample.masks[k], sample.scale, rng), 1)
        for _ in range(rng.randint(1, max_positive))
    ]
    others = [m for j, m in enumerate(sample.masks) if j != k]
    background = ~np.logical_or.reduce(sample.masks)
    for _ in range(rng.randint(0, max_negative)):
        region = rng.choice(others) if others and rng.random() < 0.7 else background
        clicks.append((*random_point(region, sample.scale, rng), 0))
    return clicks


def pad_clicks(clicks: list[list[tuple[float, float, int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Click lists of any lengths -> coords (N, P, 2) and labels (N, P), padded with label -1."""
    count = max(len(c) for c in clicks)
    coords = torch.zeros(len(clicks), count, 2)
    labels = torch.full((len(clicks), count), -1, dtype=torch.long)
    for row, group in enumerate(clicks):
        for col, (x, y, label) in enumerate(group):
            coords[row, col] = torch.tensor([x, y])
            labels[row, col] = label
    return coords, labels


def random_coarse_mask(
    sample: SamSample, k: int, rng: random.Random, generator: torch.Generator, leak_prob: float
) -> torch.Tensor:
    """A randomly degraded coarse mask of object ``k``: (1, S/4, S/4) logits."""
    leak, leak_weight = None, 0.0
    others = [j for j in range(len(sample.gt_lowres)) if j != k]
    if others and rng.random() < leak_prob:
        leak, leak_weight = sample.gt_lowres[rng.choice(others)], rng.uniform(0.2, 0.8)
    grid = rng.choice(COARSE_GRIDS)
    max_shift = 1 if grid >= 16 else 0
    shift = (rng.randint(-max_shift, max_shift), rng.randint(-max_shift, max_shift))
    return coarse_mask_logits(
        sample.gt_lowres[k],
        grid,
        confidence=rng.uniform(2.0, 12.0),
        shift=shift,
        leak=leak,
        leak_weight=leak_weight,
        noise=rng.uniform(0.0, 0.2),
        generator=generator,
    )


def encode_prompts(
    sam: Sam,
    kind: str,
    points: torch.Tensor | None,
    boxes: torch.Tensor | None,
    masks: torch.Tensor | None,
    clicks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's prompt encoder for one prompt kind.

    Args:
        sam: the model.
        kind: one of ``PROMPT_KINDS``.
        points: (N, 2) positive clicks (x, y) in the SAM frame.
        boxes: (N, 4) boxes in the SAM frame.
        masks: (N, 1, S/4, S/4) coarse-mask logits.
        clicks: for ``clicks+mask``: coords (N, P, 2) and labels (N, P) from ``pad_clicks``.

    Returns:
        sparse (N, k, C) and dense (N, C, S/16, S/16) embeddings.
    """
    point_arg = None
    if kind.startswith("point"):
        labels = torch.ones(points.shape[0], 1, dtype=torch.long)
        point_arg = (points[:, None, :], labels)  # (N, 1, 2), (N, 1)
    elif kind.startswith("clicks"):
        point_arg = clicks  # (N, P, 2), (N, P)
    return sam.prompt_encoder(
        points=point_arg,
        boxes=boxes if kind == "box" else None,
        masks=masks if "mask" in kind else None,
    )


def decode(
    sam: Sam, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder for N prompt sets, each with its own image embedding (so the prompts of
    many images run as one batch): the first mask and its predicted IoU.

    Args:
        sam: the model.
        image_embeddings: (N, C, S/16, S/16), the embedding of each prompt set's image.
        sparse: (N, k, C) sparse prompt embeddings.
        dense: (N, C, S/16, S/16) dense prompt embeddings.

    Returns:
        low-res mask logits (N, 1, S/4, S/4) and predicted IoU (N, 1).
    """
    image_pe = sam.prompt_encoder.get_dense_pe()  # (1, C, S/16, S/16)
    decoder = sam.mask_decoder
    masks, iou_token = predict_first_mask(decoder, image_embeddings, image_pe, sparse, dense)
    return masks, decoder.iou_prediction_head(iou_token)[:, :1]  # (N, 1, S/4, S/4), (N, 1)


def decode_tokens(
    sam: Sam,
    image_embeddings: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    token_ids: tuple[int, ...] = MULTIMASK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode` for the mask tokens ``token_ids`` (default: the three multimask outputs).

    Returns:
        low-res mask logits (N, T, S/4, S/4) and their predicted IoUs (N, T).
    """
    image_pe = sam.prompt_encoder.get_dense_pe()  # (1, C, S/16, S/16)
    decoder = sam.mask_decoder
    masks, iou_token = predict_token_masks(
        decoder, image_embeddings, image_pe, sparse, dense, token_ids
    )
    iou_pred = decoder.iou_prediction_head(iou_token)[:, list(token_ids)]  # (N, T)
    return masks, iou_pred


def bce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE + Dice over N masks (N, 1, h, w) against soft targets in [0, 1]; Dice with plain
    sums in the denominator (``losses.dice_loss(..., squared=False)``)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return bce + dice_loss(logits, target, squared=False)


def bce_dice_each(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`bce_dice` of each of M masks per prompt set: logits (N, M, h, w) against targets
    (N, 1, h, w) -> (N, M)."""
    target = target.float().expand_as(logits)  # (N, M, h, w)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((2, 3))
    probs = logits.float().sigmoid()
    inter, denom = (probs * target).sum((2, 3)), probs.sum((2, 3)) + target.sum((2, 3))
    return bce + 1.0 - (2.0 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)  # (N, M)


def multimask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SAM's loss for an ambiguous prompt: per prompt set the lowest BCE + Dice among its M
    outputs (N, M, h, w) against its target (N, 1, h, w), averaged over the N sets."""
    return bce_dice_each(logits, target).min(dim=1).values.mean()


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU (N,) of thresholded logits (N, 1, h, w) with targets thresholded at 0.5; (N, M) for
    M masks per row (N, M, h, w)."""
    if logits.shape[1] > 1:
        pred, gt = logits > 0, (target > 0.5).expand_as(logits)  # (N, M, h, w)
        inter, union = (pred & gt).sum((2, 3)).float(), (pred | gt).sum((2, 3)).float()
        return inter / union.clamp(min=1)  # (N, M)
    pred, gt = (logits > 0).flatten(1), (target > 0.5).flatten(1)
    inter, union = (pred & gt).sum(1).float(), (pred | gt).sum(1).float()
    return inter / union.clamp(min=1)


def lr_at(step: int, cfg: SamPretrainConfig) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_loss(
    sam: Sam,
    samples: list[SamSample],
    rng: random.Random,
    generator: torch.Generator,
    cfg: SamPretrainConfig,
) -> torch.Tensor:
    """BCE + Dice + IoU-MSE of every prompt kind for up to ``objects_per_image`` objects of
    each scene."""
    embeddings = sam.image_encoder(torch.stack([s.image for s in samples]))  # (I, C, h, w)
    rows, points, boxes, coarse, clicks, targets = [], [], [], [], [], []
    click_targets_lowres = []
    sam_size = sam.image_encoder.img_size
    for i, sample in enumerate(samples):
        count = min(cfg.objects_per_image, len(sample.masks))
        for k in rng.sample(range(len(sample.masks)), count):
            rows.append(i)
            pixel = random_pixel(sample.masks[k], rng)
            points.append(sam_point(pixel, sample.scale))
            boxes.append(object_box(sample.masks[k], sample.scale, rng, cfg.box_jitter))
            coarse.append(random_coarse_mask(sample, k, rng, generator, cfg.leak_prob))
            clicks.append(
                random_clicks(sample, k, rng, cfg.max_positive_clicks, cfg.max_negative_clicks)
            )
            targets.append(sample.gt_lowres[k])
            if cfg.multimask:
                options = click_targets(sample, k, pixel)
                choice = rng.randrange(len(options))
                click_targets_lowres.append(
                    sample.gt_lowres[k] if choice == 0 else lowres_mask(options[choice], sam_size)
                )
    image_embeddings = embeddings[torch.tensor(rows)]  # (N, C, h, w)
    target = torch.stack(targets).unsqueeze(1)  # (N, 1, S/4, S/4)
    points_t, boxes_t = torch.tensor(points).float(), torch.tensor(boxes).float()
    masks_t = torch.stack(coarse)  # (N, 1, S/4, S/4)
    clicks_t = pad_clicks(clicks)  # (N, P, 2), (N, P)
    losses = []
    for kind in PROMPT_KINDS:
        sparse, dense = encode_prompts(sam, kind, points_t, boxes_t, masks_t, clicks_t)
        if cfg.multimask and kind == "point":
            click_target = torch.stack(click_targets_lowres).unsqueeze(1)  # (N, 1, S/4, S/4)
            logits, iou_pred = decode_tokens(sam, image_embeddings, sparse, dense)  # (N, 3, ...)
            iou = mask_iou(logits.detach(), click_target)  # (N, 3)
            losses.append(multimask_loss(logits, click_target) + F.mse_loss(iou_pred, iou))
            continue
        logits, iou_pred = decode(sam, image_embeddings, sparse, dense)
        iou = mask_iou(logits.detach(), target)  # (N,)
        losses.append(bce_dice(logits, target) + F.mse_loss(iou_pred[:, 0], iou))
    return torch.stack(losses).mean()


def pretrain_sam(sam: Sam, cfg: SamPretrainConfig) -> dict[str, float]:
    """Train every part of ``sam`` in place; returns timing and the last losses."""
    if cfg.world not in WORLDS:
        raise ValueError(f"unknown world {cfg.world!r}; choose from {', '.join(WORLDS)}")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    sam_size = sam.image_encoder.img_size
    optimizer = torch.optim.AdamW(sam.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sam.train()
    start, recent = time.time(), []
    for step in range(cfg.steps):
        samples = [
            make_sample(sample_scene(rng, world=cfg.world), sam_size)
            for _ in range(cfg.images_per_step)
        ]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = step_loss(sam, samples, rng, generator, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [loss.item()])[-cfg.log_every :]
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logger.info(
                "sam step %d/%d loss %.3f (%.0f s)",
                step + 1,
                cfg.steps,
                sum(recent) / len(recent),
                time.time() - start,
            )
    sam.eval()
    return {
        "seconds": time.time() - start,
        "steps": cfg.steps,
        "final_loss": sum(recent) / max(1, len(recent)),
    }
