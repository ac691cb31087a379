"""Pictures of masks: overlays for inference, evaluation, TensorBoard and the demo.

One drawing rule everywhere: the mask tinted over the image with its outline in the same
colour, optionally with the expression written at the top. Predictions are blue (segment_anything's
``show_mask`` colour), ground truth magenta, CLIP's coarse mask orange.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PREDICTION_COLOR = (30, 144, 255)  # segment_anything's show_mask colour
GROUND_TRUTH_COLOR = (255, 40, 220)  # magenta, apart from the prediction's blue
COARSE_COLOR = (255, 150, 20)  # orange: CLIP's coarse mask S_C
OVERLAY_ALPHA = 0.5  # opacity of the mask tint
MIN_FONT_SIZE = 10  # pixels; the caption scales with the image above this


def draw_overlay(
    image: Image.Image | np.ndarray,
    mask: np.ndarray,
    text: str | None = None,
    *,
    color: tuple[int, int, int] = PREDICTION_COLOR,
) -> Image.Image:
    """The mask tinted over the image with its outline, and the expression written at the top.

    Args:
        image: (H, W, 3) uint8 array or RGB PIL image, original frame.
        mask: (H, W) bool, same frame.
        text: written in white on a dark band at the top-left, wrapped to the image width.
        color: RGB tint of the mask.

    Returns:
        An RGB PIL image of size (W, H).
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"mask of shape {mask.shape} does not match image {rgb.shape[:2]}")
    out = rgb.astype(np.float32)
    tint = np.asarray(color, dtype=np.float32)
    out[mask] = (1 - OVERLAY_ALPHA) * out[mask] + OVERLAY_ALPHA * tint
    out[_outline(mask)] = tint
    canvas = Image.fromarray(out.round().astype(np.uint8))
    if text:
        _write_text(canvas, text)
    return canvas


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (or at the image border)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~interior


def _write_text(canvas: Image.Image, text: str) -> None:
    width, height = canvas.size
    size = max(MIN_FONT_SIZE, min(width, height) // 20)
    font = ImageFont.load_default(size=size)  # Pillow's bundled font (>= 10.1), no file needed
    draw = ImageDraw.Draw(canvas)
    margin = max(2, size // 4)
    # Wrap to the image width, measured in pixels (at least one word per line).
    avg = max(1.0, font.getlength("x"))
    lines = textwrap.wrap(text, width=max(1, int((width - 2 * margin) / avg))) or [text]
    line_height = size + margin
    band = min(height, len(lines) * line_height + margin)
    band_width = min(width, int(max(font.getlength(line) for line in lines)) + 2 * margin)
    draw.rectangle([0, 0, band_width, band], fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * line_height), line, fill=(255, 255, 255), font=font)


def prediction_and_truth(
    image: Image.Image | np.ndarray, prediction: np.ndarray, truth: np.ndarray, text: str
) -> Image.Image:
    """Prediction (left, captioned with ``text``) beside the ground truth (right), (H, 2W)."""
    pred = draw_overlay(image, prediction, text)
    gt = draw_overlay(image, truth, "ground truth", color=GROUND_TRUTH_COLOR)
    canvas = Image.new("RGB", (2 * pred.width, pred.height))
    canvas.paste(pred, (0, 0))
    canvas.paste(gt, (pred.width, 0))
    return canvas


def mask_panels(
    image: np.ndarray,
    masks: Sequence[np.ndarray | None],
    colors: Sequence[tuple[int, int, int]],
) -> np.ndarray:
    """The image, then one overlay per mask, side by side; a missing mask gives a black panel.

    Args:
        image: (H, W, 3) uint8.
        masks: (H, W) bool masks (or None).
        colors: one colour per mask.

    Returns:
        (H, (1 + len(masks)) * W, 3) uint8.
    """
    panels = [image]
    for mask, color in zip(masks, colors, strict=True):
        if mask is None:
            panels.append(np.zeros_like(image))
        else:
            panels.append(np.asarray(draw_overlay(image, mask, color=color)))
    return np.concatenate(panels, axis=1)
