"""Inference front end: embed an image once with SAM, then segment many expressions.

Shaped like ``segment_anything.SamPredictor``: :meth:`Predictor.set_image` letterboxes the image
into the CLIP and SAM frames and runs the frozen SAM image encoder once (F_IS, DESIGN §2);
:meth:`Predictor.predict` tokenizes any number of expressions and runs the rest of the model for
all of them in one batch that shares the cached embedding, then maps the masks back to the
original image. The CLIP image tower cannot be cached: its input is prompted by the text (L2V,
eq. 6), so it runs once per expression.
"""

from __future__ import annotations

import contextlib
import logging
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from prompt_ris.data.text import tokenize
from prompt_ris.data.transforms import letterbox_image, load_image, to_rgb

if TYPE_CHECKING:
    from prompt_ris.models.prompt_ris import PromptRIS, PromptSwitches

logger = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | np.ndarray
DEFAULT_THRESHOLD = 0.5  # probability above which a pixel is foreground (DESIGN §6)
DEFAULT_MAX_BATCH = 32  # expressions per forward pass
OVERLAY_COLOR = (30, 144, 255)  # segment_anything's show_mask colour
OVERLAY_ALPHA = 0.5
MIN_FONT_SIZE = 10  # pixels; the caption scales with the image above this


@dataclass
class Prediction:
    """Masks for the N expressions of one image, in the original frame (H, W as loaded).

    Attributes:
        expressions: the N expressions, in order.
        masks: (N, H, W) bool, final (SAM) masks thresholded at the predictor's threshold.
        probs: (N, H, W) float32 foreground probabilities, when ``return_probs``.
        coarse_masks: (N, H, W) bool, the CLIP coarse mask S_C (eq. 2) mapped to the original
            frame, when ``return_coarse``.
        coarse_probs: (N, H, W) float32, when both ``return_coarse`` and ``return_probs``.
    """

    expressions: list[str]
    masks: np.ndarray
    probs: np.ndarray | None = None
    coarse_masks: np.ndarray | None = None
    coarse_probs: np.ndarray | None = None


class Predictor:
    """Segment the objects that expressions refer to in one image at a time.

    Args:
        model: a built or loaded :class:`PromptRIS`; it is moved to ``device`` and put in eval
            mode (argmax point, no prompt dropout).
        device: default: the model's device when it is already on an accelerator, else CUDA
            when available, else CPU.
        dtype: computation dtype, applied with autocast (the weights keep their own dtype).
            Default: bfloat16 on a CUDA device that supports it, float32 otherwise.
        threshold: probability above which a pixel belongs to the mask.
        max_batch: expressions run through the model at once (bounds memory for long lists;
            the results do not depend on it).
    """

    def __init__(
        self,
        model: PromptRIS,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.device = resolve_device(device, model)
        self.dtype = resolve_dtype(dtype, self.device)
        self.threshold = threshold
        self.max_batch = max_batch
        self.model = model.to(self.device).eval()
        logger.info("predicting on %s with %s computation", self.device, self.dtype)
        self.reset_image()

    # ---------------------------------------------------------------------------------------
    # Image
    # ---------------------------------------------------------------------------------------
    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.orig_size: tuple[int, int] | None = None  # (H, W) original frame
        self.input_size: tuple[int, int] | None = None  # (h', w') in the SAM frame
        self._clip_images: torch.Tensor | None = None  # (1, 3, S_c, S_c)
        self._sam_images: torch.Tensor | None = None  # (1, 3, S_s, S_s)
        self._sam_img_embed: torch.Tensor | None = None  # (1, C, h_s, w_s)

    def set_image(self, image: ImageInput) -> None:
        """Letterbox ``image`` to the CLIP and SAM frames and embed it once with SAM (F_IS).

        Args:
            image: a file path (turned upright by its EXIF orientation), a PIL image of any mode
                Pillow can convert to RGB, or an (H, W, 3) uint8 array (RGB order; (H, W) grey
                and (H, W, 4) RGBA arrays are converted too).

        Raises:
            ImageLoadError: the file is missing, empty, corrupt or of zero size (an OSError).
            ValueError: an in-memory image is empty, of an unusable dtype or shape, or of a
                mode that cannot be converted to RGB.
        """
        self.reset_image()  # a failed call must not leave the previous image in place
        rgb = as_rgb_image(image)
        frames = letterbox_image(rgb, self._clip_image_size(), self.model.sam.image_size)
        weight_dtype = _float_dtype(self.model)
        weight = {"device": self.device, "dtype": weight_dtype}
        self._clip_images = frames.clip_image[None].to(**weight)  # (1, 3, S_c, S_c)
        self._sam_images = frames.sam_image[None].to(**weight)  # (1, 3, S_s, S_s)
        with torch.inference_mode(), self._autocast():
            self._sam_img_embed = self.model.encode_sam(self._sam_images)  # (1, C, h_s, w_s)
        self.input_size, self.orig_size = frames.input_size, frames.orig_size
        self.is_image_set = True

    # ---------------------------------------------------------------------------------------
    # Prediction
    # ---------------------------------------------------------------------------------------
    def predict(
        self,
        expressions: str | Sequence[str],
        *,
        switches: PromptSwitches | None = None,
        return_probs: bool = False,
        return_coarse: bool = False,
    ) -> Prediction:
        """Masks for one or more expressions about the current image, in one batch.

        Args:
            expressions: one expression or a list; each must be non-empty. Expressions longer
                than ``model.clip.text_length`` tokens are cut with a warning.
            switches: which SAM prompts to use (Table 5); default: the model's config.
            return_probs: also return foreground probabilities.
            return_coarse: also return the CLIP coarse mask S_C (eq. 2).

        Returns:
            A :class:`Prediction` with (N, H, W) arrays in the original frame.

        Raises:
            RuntimeError: no image was set.
            EmptyExpressionError: an expression is empty or whitespace only.
            ValueError: ``expressions`` is an empty list.
        """
        texts = [expressions] if isinstance(expressions, str) else list(expressions)
        if not texts:
            raise ValueError("no expression given; pass a string or a non-empty list of strings")
        tokens = tokenize(texts, self._text_length(), warn_truncated=True)  # (N, L)
        mask_logits, coarse_logits = self.predict_torch(
            tokens, switches=switches, with_coarse=return_coarse
        )
        probs = torch.sigmoid(mask_logits)  # (N, H, W)
        prediction = Prediction(expressions=texts, masks=_to_numpy(probs > self.threshold))
        if return_probs:
            prediction.probs = _to_numpy(probs)
        if coarse_logits is not None:
            coarse_probs = torch.sigmoid(coarse_logits)  # (N, H, W)
            prediction.coarse_masks = _to_numpy(coarse_probs > self.threshold)
            if return_probs:
                prediction.coarse_probs = _to_numpy(coarse_probs)
        return prediction

    @torch.inference_mode()
    def predict_torch(
        self,
        text_tokens: torch.Tensor,
        *,
        switches: PromptSwitches | None = None,
        with_coarse: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits in the original frame for already tokenized expressions.

        Args:
            text_tokens: (N, L) long, ``tokenize(texts, model.clip.text_length)``.
            switches: which SAM prompts to use; default: the model's config.
            with_coarse: also map the coarse logits S_C to the original frame.

        Returns:
            (N, H, W) float32 final mask logits, and (N, H, W) float32 coarse logits or None.
        """
        if not self.is_image_set:
            raise RuntimeError("no image is set; call set_image(image) before predict()")
        chunks = [
            self._predict_chunk(tokens.to(self.device), switches, with_coarse)
            for tokens in text_tokens.split(self.max_batch)
        ]
        mask_logits = torch.cat([mask for mask, _ in chunks])  # (N, H, W)
        if not with_coarse:
            return mask_logits, None
        return mask_logits, torch.cat([coarse for _, coarse in chunks])  # (N, H, W)

    def _predict_chunk(
        self, text_tokens: torch.Tensor, switches: PromptSwitches | None, with_coarse: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``predict_torch`` for at most ``max_batch`` expressions sharing the cached F_IS."""
        num = text_tokens.shape[0]
        image_index = torch.zeros(num, dtype=torch.long, device=self.device)  # (n,) all image 0
        with self._autocast():
            out = self.model(
                self._clip_images,
                self._sam_images,
                text_tokens,
                image_index,
                switches=switches,
                sam_img_embed=self._sam_img_embed,
            )
        sizes = (
            torch.tensor([self.input_size]),  # (1, 2) (h', w') in the SAM frame
            torch.tensor([self.orig_size]),  # (1, 2) (H, W)
            image_index,
        )
        # Low-res frame (n, 1, S_s/4, S_s/4) -> original frame (n, H, W)
        mask_logits = torch.stack(self.model.postprocess_masks(out.mask_logits.float(), *sizes))
        if not with_coarse:
            return mask_logits, None
        coarse_lowres = self.model.upsample_coarse(out.coarse_logits.float())  # (n, 1, ., .)
        coarse_logits = torch.stack(self.model.postprocess_masks(coarse_lowres, *sizes))
        return mask_logits, coarse_logits

    # ---------------------------------------------------------------------------------------
    # Helpers
    # ---------------------------------------------------------------------------------------
    def _text_length(self) -> int:
        return self.model.text_length

    def _clip_image_size(self) -> int:
        return int(self.model.clip.clip.visual.image_size[0])

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        enabled = self.dtype != torch.float32
        with torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=enabled):
            yield


def predict(
    model: PromptRIS,
    image: ImageInput,
    expressions: str | Sequence[str],
    *,
    switches: PromptSwitches | None = None,
    return_probs: bool = False,
    return_coarse: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> Prediction:
    """One-shot prediction: ``Predictor(model).set_image(image)`` then ``predict(expressions)``.

    Backs ``PromptRIS.predict(image, expressions, **kw)``; see :class:`Predictor` for the
    arguments. To ask several questions about one image, keep a :class:`Predictor` instead so
    that the SAM embedding is computed once.
    """
    predictor = Predictor(model, device=device, dtype=dtype)
    predictor.set_image(image)
    return predictor.predict(
        expressions, switches=switches, return_probs=return_probs, return_coarse=return_coarse
    )


def resolve_device(
    device: str | torch.device | None, model: torch.nn.Module | None = None
) -> torch.device:
    """The requested device, else the model's accelerator, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    if model is not None:
        param = next(model.parameters(), None)
        if param is not None and param.device.type != "cpu":
            return param.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The requested dtype (a torch dtype or "fp32"/"bf16"/"fp16"), else bf16 on CUDA, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


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


def draw_overlay(
    image: Image.Image | np.ndarray,
    mask: np.ndarray,
    text: str | None = None,
    *,
    color: tuple[int, int, int] = OVERLAY_COLOR,
    alpha: float = OVERLAY_ALPHA,
) -> Image.Image:
    """The mask tinted over the image with its outline, and the expression written at the top.

    Args:
        image: (H, W, 3) uint8 array or RGB PIL image, original frame.
        mask: (H, W) bool, same frame.
        text: written in white on a dark band at the top-left, wrapped to the image width.
        color: RGB tint of the mask.
        alpha: opacity of the tint.

    Returns:
        An RGB PIL image of size (W, H).
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"mask of shape {mask.shape} does not match image {rgb.shape[:2]}")
    out = rgb.astype(np.float32)
    tint = np.asarray(color, dtype=np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * tint
    out[_outline(mask)] = tint
    canvas = Image.fromarray(out.round().astype(np.uint8))
    if text:
        _write_text(canvas, text)
    return canvas


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (or at the image border)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = (
        padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    )
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


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating weights (inputs are cast to it)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
