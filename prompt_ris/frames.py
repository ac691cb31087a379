"""The four frames an image lives in, the constants that define them, and the way back.

- **CLIP frame**: the image letterboxed into a ``model.clip.image_size`` square (480 for ViT-B/16),
  normalised with CLIP's mean and std; its token grid is S_c / patch (30 x 30).
- **SAM frame**: the same image letterboxed into a ``model.sam.image_size`` square (1024),
  normalised with SAM's pixel mean and std (0-255 scale).
- **Low-res frame**: the SAM frame / 4 (256 x 256), where SAM's mask decoder, the upsampled coarse
  mask S_C, the point grid of eq. (3) and the training targets live.
- **Original frame**: the image as loaded, (H, W); where every metric is computed.

Letterbox = resize the longest side to S with SAM's rounding rule ``new = int(old * S / max(h, w)
+ 0.5)`` and pad bottom/right after normalisation. Both square frames are made the same way, so
they describe the same pixels and a plain resize maps one onto the other. ``input_size`` is
(h', w'), the resized, unpadded region in the SAM frame. See docs/design.md, "Frames".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD, on the 0-1 scale.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# segment_anything's Sam.pixel_mean / pixel_std, on the 0-255 scale.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
LOWRES_FACTOR = 4  # SAM's mask decoder works at image_size / 4 (256 for 1024)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h', w') after resizing the longest side to ``size`` with SAM's rounding rule.

    ``new = int(old * size / max(h, w) + 0.5)`` as in ``ResizeLongestSide.get_preprocess_shape``;
    unlike SAM, a side is never rounded down to 0 (a 5000 x 1 image gives 1024 x 1, not 1024 x 0).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got (H, W) = ({height}, {width})")
    scale = size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def lowres_to_original(
    logits: torch.Tensor,
    input_sizes: torch.Tensor,
    orig_sizes: torch.Tensor,
    image_index: torch.Tensor,
    sam_size: int,
) -> list[torch.Tensor]:
    """Masks in the low-res frame -> one logit map per expression in its image's original frame.

    SAM's ``postprocess_masks``: bilinear to the SAM frame, crop the unpadded ``input_size``,
    bilinear to the original size. SAM's own is a ``Sam`` method that takes one image's sizes
    for a whole batch; here every expression uses its own image's (``tests/test_frames.py``
    holds it to SAM's per image). Used for both the final mask S' and the upsampled coarse
    mask S_C, by evaluation and by inference alike.

    Args:
        logits: (B, 1, s, s) in the low-res frame (or any square frame aligned with the SAM
            frame).
        input_sizes: (I, 2) (h', w') of each resized image in the SAM frame.
        orig_sizes: (I, 2) (H, W) of each original image.
        image_index: (B,) expression -> image row.
        sam_size: S_s, side of the SAM frame.

    Returns:
        B float32 tensors (H_b, W_b).
    """
    frame = F.interpolate(
        logits.float(), (sam_size, sam_size), mode="bilinear", align_corners=False
    )  # (B, 1, S_s, S_s)
    out = []
    for row, image in enumerate(image_index.tolist()):
        h, w = (int(v) for v in input_sizes[image])
        orig = tuple(int(v) for v in orig_sizes[image])
        crop = frame[row : row + 1, :, :h, :w]  # (1, 1, h', w')
        out.append(F.interpolate(crop, orig, mode="bilinear", align_corners=False)[0, 0])
    return out


def lowres_cell_to_original(
    cells: torch.Tensor,
    input_sizes: torch.Tensor,
    orig_sizes: torch.Tensor,
    image_index: torch.Tensor,
    lowres_size: int,
    sam_size: int,
) -> torch.Tensor:
    """Flat cell indices of the low-res frame -> (x, y) of their centres in the original frame.

    What the point prompt of eq. (3) clicks (``FrozenSAM.embed_point`` takes the argmax cell of
    S_C), as a pixel position of the image as loaded. A cell in the letterbox padding maps
    outside the image.

    Args:
        cells: (B,) long, row * lowres_size + column.
        input_sizes: (I, 2) (h', w') of each resized image in the SAM frame.
        orig_sizes: (I, 2) (H, W) of each original image.
        image_index: (B,) expression -> image row.
        lowres_size: side of the low-res frame (S_s / 4).
        sam_size: S_s, side of the SAM frame.

    Returns:
        (B, 2) float32 (x, y) in original pixels.
    """
    step = sam_size / lowres_size  # SAM-frame pixels per low-res cell
    row = torch.div(cells, lowres_size, rounding_mode="floor").float()  # (B,)
    col = (cells % lowres_size).float()  # (B,)
    sam_xy = torch.stack([(col + 0.5) * step, (row + 0.5) * step], dim=1)  # (B, 2) SAM frame
    resized = input_sizes[image_index].float().flip(1)  # (B, 2) (w', h')
    orig = orig_sizes[image_index].float().flip(1)  # (B, 2) (W, H)
    return sam_xy.cpu() * (orig / resized).cpu()  # (B, 2)
