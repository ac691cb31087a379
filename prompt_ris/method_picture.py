"""The picture that shows the method on one expression: image | coarse mask with the point | final
mask | ground truth.

Panels, left to right: the image; CLIP's coarse mask S_C as a heat map over it with the point
prompt SAM was given (eq. 3) as a dot; SAM's final mask; the ground truth when there is one. A
title names each panel and a caption below gives the expression and, with ground truth, the IoU.
Every panel is at least ``PANEL_SIZE`` pixels on its shorter side. Masks are drawn with
torchvision's ``draw_segmentation_masks``, the point with ``draw_keypoints``, the heat map with
PIL's ``ImageOps.colorize``; predict, evaluation's overlays, the demo and the app all draw here.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torchvision.utils import draw_keypoints, draw_segmentation_masks

PANEL_SIZE = 384  # pixels, the shorter side of a panel at least
MASK_ALPHA = 0.5  # opacity of a mask over the image
HEAT_ALPHA = 0.6  # opacity of the coarse heat map over the image
FINAL_COLOR = (30, 144, 255)  # segment_anything's show_mask blue
TRUTH_COLOR = (255, 40, 220)  # magenta
POINT_COLOR = (0, 255, 0)  # the click SAM was given
# One colour per expression when several are drawn on one image (the app).
EXPRESSION_COLORS = (
    (30, 144, 255), (255, 99, 71), (50, 205, 50), (255, 215, 0), (186, 85, 211),
    (0, 206, 209), (255, 140, 0), (244, 164, 196),
)  # fmt: skip
TITLES = ("image", "coarse mask (CLIP) + point", "final mask (SAM)", "ground truth")


def expression_color(k: int) -> tuple[int, int, int]:
    """The colour of the k-th expression of an image."""
    return EXPRESSION_COLORS[k % len(EXPRESSION_COLORS)]


def mask_iou(mask: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two (H, W) bool masks (1.0 when both are empty)."""
    union = np.logical_or(mask, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(mask, truth).sum() / union)


def panel_scale(height: int, width: int) -> float:
    """The resize factor that gives a panel's shorter side ``PANEL_SIZE`` pixels."""
    return PANEL_SIZE / min(height, width)


def heat_map(
    image: np.ndarray, coarse_prob: np.ndarray, point: Sequence[float] | None = None
) -> np.ndarray:
    """The coarse probability as a heat map (black-red-yellow) over the image, with the point.

    Args:
        image: (H, W, 3) uint8.
        coarse_prob: (H, W) float in [0, 1], S_C's probability in the same frame.
        point: (x, y) in the same frame, or None.

    Returns:
        (H, W, 3) uint8.
    """
    grey = Image.fromarray((np.clip(coarse_prob, 0, 1) * 255).round().astype(np.uint8))
    heat = ImageOps.colorize(grey, black=(0, 0, 0), white=(255, 255, 0), mid=(220, 20, 20))
    blended = Image.blend(Image.fromarray(image), heat, HEAT_ALPHA)
    out = np.asarray(blended)
    if point is not None:
        out = draw_point(out, point)
    return out


def draw_point(image: np.ndarray, point: Sequence[float], radius: int | None = None) -> np.ndarray:
    """A dot at (x, y) (clamped into the image), (H, W, 3) uint8 -> same."""
    height, width = image.shape[:2]
    x = min(max(float(point[0]), 0.0), width - 1.0)
    y = min(max(float(point[1]), 0.0), height - 1.0)
    radius = radius or max(3, min(height, width) // 40)
    chw = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
    keypoints = torch.tensor([[[x, y]]], dtype=torch.float32)  # (1, 1, 2)
    drawn = draw_keypoints(chw, keypoints, colors=POINT_COLOR, radius=radius)
    return drawn.permute(1, 2, 0).numpy()  # (H, W, 3)


def draw_masks(
    image: np.ndarray, masks: Sequence[np.ndarray], colors: Sequence[tuple[int, int, int]]
) -> np.ndarray:
    """(H, W) bool masks tinted over an (H, W, 3) uint8 image, each in its colour -> same."""
    if not len(masks):
        return image
    chw = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
    stacked = torch.from_numpy(np.stack([np.asarray(m, dtype=bool) for m in masks]))  # (N, H, W)
    drawn = draw_segmentation_masks(chw, stacked, alpha=MASK_ALPHA, colors=list(colors))
    return drawn.permute(1, 2, 0).numpy()  # (H, W, 3)


def method_picture(
    image: np.ndarray,
    expression: str,
    final_mask: np.ndarray,
    coarse_prob: np.ndarray | None = None,
    point: Sequence[float] | None = None,
    truth: np.ndarray | None = None,
    *,
    color: tuple[int, int, int] = FINAL_COLOR,
) -> Image.Image:
    """Image | coarse mask with the point | final mask | ground truth, titled and captioned.

    Args:
        image: (H, W, 3) uint8, the original frame.
        expression: written in the caption.
        final_mask: (H, W) bool, SAM's mask.
        coarse_prob: (H, W) float probability of S_C; None leaves that panel out.
        point: (x, y) of the point prompt, original frame.
        truth: (H, W) bool ground truth; None leaves its panel (and the IoU) out.
        color: the final mask's colour.

    Returns:
        An RGB image, panels side by side above the caption.
    """
    image = np.asarray(image, dtype=np.uint8)
    height, width = image.shape[:2]
    given = (("final_mask", final_mask), ("coarse_prob", coarse_prob), ("truth", truth))
    for name, array in given:
        if array is not None and np.shape(array) != (height, width):
            raise ValueError(
                f"{name} of shape {np.shape(array)} does not match image {(height, width)}"
            )
    panels = [image]
    titles = [TITLES[0]]
    if coarse_prob is not None:
        panels.append(heat_map(image, coarse_prob, point))
        titles.append(TITLES[1])
    panels.append(draw_masks(image, [final_mask], [color]))
    titles.append(TITLES[2])
    caption = expression
    if truth is not None:
        panels.append(draw_masks(image, [truth], [TRUTH_COLOR]))
        titles.append(TITLES[3])
        caption = f"{expression}  (IoU {mask_iou(np.asarray(final_mask, bool), truth):.2f})"
    return compose(panels, titles, caption)


def compose(panels: Sequence[np.ndarray], titles: Sequence[str], caption: str) -> Image.Image:
    """Same-size (H, W, 3) panels side by side, each scaled to ``PANEL_SIZE`` on its shorter
    side under its title, above a caption band."""
    height, width = panels[0].shape[:2]
    scale = panel_scale(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.NEAREST if scale >= 1 else Image.BILINEAR  # keep mask edges crisp
    font_size = max(14, size[1] // 24)
    font = ImageFont.load_default(size=font_size)
    title_h = font_size + 12
    lines = textwrap.wrap(caption, width=max(20, int(size[0] * len(panels) / (font_size * 0.55))))
    caption_h = (font_size + 8) * max(1, len(lines)) + 12
    width_all, height_all = size[0] * len(panels), title_h + size[1] + caption_h
    canvas = Image.new("RGB", (width_all, height_all), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        canvas.paste(Image.fromarray(panel).resize(size, resample), (k * size[0], title_h))
        draw.text((k * size[0] + 6, 6), title, fill=(0, 0, 0), font=font)
    for i, line in enumerate(lines or [caption]):
        y = title_h + size[1] + 6 + i * (font_size + 8)
        draw.text((6, y), line, fill=(0, 0, 0), font=font)
    return canvas


def expressions_picture(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    points: Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """Every expression's final mask over one image, each in its own colour (``expression_color``),
    with its point; (H, W, 3) uint8."""
    colors = [expression_color(k) for k in range(len(masks))]
    out = draw_masks(np.asarray(image, dtype=np.uint8), masks, colors)
    for point in points or ():
        out = draw_point(out, point)
    return out
