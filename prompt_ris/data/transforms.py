"""Image loading and coercion, letterboxing into the CLIP and SAM frames, ground-truth masks.

The frames and their constants are defined in :mod:`prompt_ris.frames`: both square frames resize
the longest side with SAM's rounding rule and pad bottom/right with zeros *after* normalisation,
so they describe the same pixels.

The image resampling matches the upstream preprocessing of each encoder: SAM's
``ResizeLongestSide`` resizes a PIL image bilinearly (torchvision on PIL), open_clip's transform
resizes bicubically.

Image modes: anything Pillow opens is returned as 8-bit RGB. Alpha is dropped (``RGBA``, ``LA``,
``P`` with transparency keep their colour values), 16-bit and 32-bit grey (``I;16``, ``I``) are
scaled from 0-65535 to 0-255, float images (``F``) from [0, 1] when their maximum is <= 1.

EXIF orientation: an image that the user gives (``expected_hw=None``) is turned upright with
``ImageOps.exif_transpose``. For annotated dataset images the annotation frame wins: COCO's
masks are drawn on the *stored* pixels, so the stored orientation is kept when its size equals the
annotated (height, width), the EXIF-transposed one is used only when that is the one that matches,
and an image matching neither raises :class:`ImageSizeMismatchError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from prompt_ris.frames import (
    CLIP_MEAN,
    CLIP_STD,
    LOWRES_FACTOR,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    resized_shape,
)

logger = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | np.ndarray  # what inference accepts as an image
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# What Pillow raises on unreadable files (SyntaxError: some plugins' "broken file" signal).
_DECODE_ERRORS = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
    ValueError,
)


class ImageLoadError(OSError):
    """An image file is missing, empty, corrupt or of an unusable size."""


class ImageSizeMismatchError(ImageLoadError):
    """An image's size (in either EXIF orientation) differs from its annotation's size."""


@dataclass
class LetterboxedImage:
    """One image in both encoder frames.

    Attributes:
        clip_image: (3, S_c, S_c) CLIP-normalised, letterboxed.
        sam_image: (3, S_s, S_s) SAM-normalised (0-255 scale), letterboxed.
        input_size: (h', w') of the unpadded image in the SAM frame.
        orig_size: (H, W) of the original image.
    """

    clip_image: torch.Tensor
    sam_image: torch.Tensor
    input_size: tuple[int, int]
    orig_size: tuple[int, int]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LetterboxedImage:
        """The same image with both tensors on ``device`` as ``dtype``."""
        return LetterboxedImage(
            self.clip_image.to(device=device, dtype=dtype),
            self.sam_image.to(device=device, dtype=dtype),
            self.input_size,
            self.orig_size,
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB (see the module docstring for the rules)."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_BIT_MODES or img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 65535 -> 255
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")  # resolves palette transparency before the alpha is dropped
    return img.convert("RGB")



def load_image(path: str | Path, expected_hw: tuple[int, int] | None = None) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image.

    Args:
        path: the image file.
        expected_hw: the annotated (H, W) for dataset images; None for user images, which are
            turned upright by their EXIF orientation.

    Returns:
        RGB image; for dataset images its size equals ``expected_hw``.

    Raises:
        ImageLoadError: the file is missing, empty, corrupt or has zero size.
        ImageSizeMismatchError: neither orientation matches ``expected_hw``.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image file '{path}' does not exist; check the image folder path")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"image file '{path}' is empty (0 bytes); re-download or remove it")
    try:
        opened = Image.open(path)
        opened.load()  # decode now, so a truncated file fails here and names itself
    except _DECODE_ERRORS as err:
        fix = "re-download it or remove it from the dataset" if expected_hw else "replace it"
        raise ImageLoadError(
            f"cannot read image '{path}' ({type(err).__name__}: {err}); the file is corrupt or "
            f"not an image: {fix}"
        ) from err
    try:
        if opened.width == 0 or opened.height == 0:
            raise ImageLoadError(f"image '{path}' has zero size {opened.size}; remove it")
        img = _orient(opened, expected_hw, path)
        rgb = to_rgb(img)
        return rgb.copy() if rgb is opened else rgb  # detach from the file before closing it
    finally:
        opened.close()


def as_rgb_image(image: ImageInput) -> Image.Image:
    """A path, PIL image or uint8 array as an 8-bit RGB PIL image (modes as ``load_image``).

    Raises:
        ImageLoadError: a path is missing, empty, corrupt or of zero size.
        ValueError: an in-memory image is empty, has an unusable dtype or shape, or a mode that
            cannot be converted to RGB.
        TypeError: ``image`` is none of the accepted types.
    """
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"image must be a path, a PIL image or an (H, W, 3) uint8 array, got "
            f"{type(image).__name__}"
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"the image has zero size {image.size} (W, H); give a non-empty image")
    try:
        return to_rgb(image)
    except (ValueError, OSError) as err:
        raise ValueError(
            f"cannot convert a PIL image of mode '{image.mode}' to RGB ({err}); convert it to "
            "RGB yourself (e.g. image.convert('RGB') from a mode Pillow supports)"
        ) from err


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ValueError(
            f"image arrays must be uint8 (0-255), got {array.dtype}; convert e.g. with "
            "(x * 255).round().clip(0, 255).astype(np.uint8) for [0, 1] floats"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(
            f"image arrays must be (H, W, 3) RGB (or (H, W) grey, (H, W, 4) RGBA), got shape "
            f"{array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"the image array has zero size {array.shape}; give a non-empty image")
    return Image.fromarray(np.ascontiguousarray(array))


def _orient(img: Image.Image, expected_hw: tuple[int, int] | None, path: Path) -> Image.Image:
    """Apply the EXIF orientation rule of the module docstring."""
    if expected_hw is None:
        return ImageOps.exif_transpose(img)
    if (img.height, img.width) == tuple(expected_hw):
        return img  # the annotation frame is the stored pixel frame
    upright = ImageOps.exif_transpose(img)
    if (upright.height, upright.width) != tuple(expected_hw):
        raise ImageSizeMismatchError(
            f"image '{path}' is {img.height}x{img.width} (H x W) but its annotation says "
            f"{expected_hw[0]}x{expected_hw[1]}; the file does not belong to this annotation "
            "file: re-download the images or fix the image folder"
        )
    logger.info("image '%s' matches its annotation only after EXIF transposition", path)
    return upright


def _letterbox_pil(
    img: Image.Image,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    pixel_scale: float,
    resample: Image.Resampling,
) -> tuple[torch.Tensor, tuple[int, int]]:
    # numpy, not torch: single-threaded work that is cheap inside DataLoader workers.
    new_h, new_w = resized_shape(img.height, img.width, size)
    pixels = np.asarray(img.resize((new_w, new_h), resample), dtype=np.float32)  # (h', w', 3)
    pixels = (pixels * pixel_scale - np.float32(mean)) / np.float32(std)
    out = np.zeros((3, size, size), dtype=np.float32)
    out[:, :new_h, :new_w] = pixels.transpose(2, 0, 1)  # pad bottom/right with zeros
    return torch.from_numpy(out), (new_h, new_w)


def letterbox_clip(img: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> (3, size, size) CLIP frame: bicubic resize, CLIP mean/std (0-1), zero pad."""
    return _letterbox_pil(img, size, CLIP_MEAN, CLIP_STD, 1.0 / 255.0, Image.Resampling.BICUBIC)[0]


def letterbox_sam(img: Image.Image, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB image -> (3, size, size) SAM frame and its input_size (h', w').

    Same as ``ResizeLongestSide.apply_image`` + ``Sam.preprocess``: bilinear resize, pixel
    mean/std on the 0-255 scale, zero pad bottom/right. SAM's two steps take a numpy array and
    a ``Sam`` for its statistics; here the SAM frame is made like the CLIP frame, from the PIL
    image (``tests/test_data_transforms.py`` holds it to SAM's).
    """
    return _letterbox_pil(
        img, size, SAM_PIXEL_MEAN, SAM_PIXEL_STD, 1.0, Image.Resampling.BILINEAR
    )


def letterbox_image(img: Image.Image, clip_size: int, sam_size: int) -> LetterboxedImage:
    """One RGB image in both encoder frames (see :class:`LetterboxedImage`)."""
    clip_image = letterbox_clip(img, clip_size)
    sam_image, input_size = letterbox_sam(img, sam_size)
    return LetterboxedImage(clip_image, sam_image, input_size, (img.height, img.width))


def sam_frame_to_rgb(sam_images: torch.Tensor, size: int) -> np.ndarray:
    """SAM-normalised images (I, 3, S_s, S_s) -> (I, size, size, 3) uint8 RGB, area-resized.

    The inverse of :func:`letterbox_sam`'s normalisation (padding comes back black-ish), for
    pictures of what the model saw, e.g. at the low-res frame's size.
    """
    mean = torch.tensor(SAM_PIXEL_MEAN, device=sam_images.device)[:, None, None]
    std = torch.tensor(SAM_PIXEL_STD, device=sam_images.device)[:, None, None]
    pixels = (sam_images.float() * std + mean).clamp(0, 255)  # (I, 3, S_s, S_s)
    pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="area")
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (I, size, size, 3)


def _letterbox_mask_np(mask: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
    m = np.asarray(mask, dtype=np.float32)
    new_h, new_w = resized_shape(m.shape[0], m.shape[1], size)
    # Box filter (exact area average) when shrinking, bilinear when enlarging.
    shrink = new_h <= m.shape[0] and new_w <= m.shape[1]
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    resized = np.asarray(Image.fromarray(m).resize((new_w, new_h), resample))
    out = np.zeros((size, size), dtype=np.float32)
    out[:new_h, :new_w] = np.clip(resized, 0.0, 1.0)
    return out


def letterbox_mask(mask: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Original-frame mask (H, W) -> (size, size) float in [0, 1] in a letterboxed frame.

    Same geometry as the images (resize longest side with SAM's rule, pad bottom/right with 0);
    the values are area averages, so border pixels are fractional.
    """
    return torch.from_numpy(_letterbox_mask_np(mask, size))


def lowres_mask(mask: np.ndarray | torch.Tensor, sam_size: int) -> torch.Tensor:
    """Original-frame mask (H, W) -> (sam_size/4, sam_size/4) float in the low-res frame.

    The mask is letterboxed into the SAM frame, then area-averaged over 4 x 4 blocks, so each
    low-res pixel is the covered fraction of the SAM-frame pixels it spans.
    """
    if sam_size % LOWRES_FACTOR:
        raise ValueError(f"SAM image size {sam_size} must be a multiple of {LOWRES_FACTOR}")
    sam_frame = _letterbox_mask_np(mask, sam_size)  # (S_s, S_s)
    side = sam_size // LOWRES_FACTOR
    blocks = sam_frame.reshape(side, LOWRES_FACTOR, side, LOWRES_FACTOR)
    return torch.from_numpy(blocks.mean(axis=(1, 3)))  # (S_s/4, S_s/4)
