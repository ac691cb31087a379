"""Inference front end: embed an image once with SAM, then segment many expressions.

Shaped like ``segment_anything.SamPredictor``: :meth:`Predictor.set_image` letterboxes the image
into the CLIP and SAM frames and runs the frozen SAM image encoder once (F_IS);
:meth:`Predictor.predict` hands any number of expressions to ``PromptRIS.predict`` (the one
prediction path, which evaluation shares through ``PromptRIS.segment_batch``) in batches that share
the cached embedding, on the chosen device and precision. The CLIP image tower cannot be cached:
its input is prompted by the text (L2V, eq. 6), so it runs once per expression.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from prompt_ris.data.transforms import ImageInput, LetterboxedImage
from prompt_ris.metrics import DEFAULT_THRESHOLD, threshold_logit
from prompt_ris.models import Prediction, PromptRIS
from prompt_ris.prompt_switches import PromptSwitches

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32  # expressions per forward pass


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
        threshold_logit(threshold)  # a threshold outside (0, 1) is refused here, not at predict
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
        self._image: LetterboxedImage | None = None  # both frames, on the device
        self._sam_img_embed: torch.Tensor | None = None  # F_IS: (1, D_S, h_s, w_s)

    @property
    def orig_size(self) -> tuple[int, int] | None:
        """(H, W) of the current image (original frame)."""
        return None if self._image is None else self._image.orig_size

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(h', w') of the current image in the SAM frame."""
        return None if self._image is None else self._image.input_size

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
        letterboxed = self.model.letterbox(image).to(self.device, self.model.dtype)
        with torch.inference_mode(), self._autocast():
            embed = self.model.encode_sam(letterboxed.sam_image[None])  # (1, D_S, h_s, w_s)
        self._image, self._sam_img_embed = letterboxed, embed
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
            TypeError: ``expressions`` is not a string or a list of strings.
            NonFiniteOutputError: the model gave NaN or infinite logits (a RuntimeError).
        """
        self._check_image_set()
        with self._autocast():
            return self.model.predict(
                self._image, expressions, switches=switches, threshold=self.threshold,
                return_probs=return_probs, return_coarse=return_coarse,
                sam_img_embed=self._sam_img_embed, max_batch=self.max_batch,
            )  # fmt: skip

    def predict_torch(
        self,
        text_tokens: torch.Tensor,
        *,
        switches: PromptSwitches | None = None,
        with_coarse: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Logits in the original frame for already tokenized expressions.

        Args:
            text_tokens: (N, L) long, ``tokenize(texts, model.clip.text_length)``.
            switches: which SAM prompts to use; default: the model's config.
            with_coarse: also map the coarse logits S_C to the original frame.

        Returns:
            ``{"final": (N, H, W)[, "coarse": (N, H, W)]}`` float32 logits.
        """
        self._check_image_set()
        with self._autocast():
            return self.model.segment(
                self._image, text_tokens, sam_img_embed=self._sam_img_embed, switches=switches,
                with_coarse=with_coarse, max_batch=self.max_batch,
            )  # fmt: skip

    def _check_image_set(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("no image is set; call set_image(image) before predict()")

    # ---------------------------------------------------------------------------------------
    # Helpers
    # ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        enabled = self.dtype != torch.float32
        with torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=enabled):
            yield


def resolve_device(
    device: str | torch.device | None, model: torch.nn.Module | None = None
) -> torch.device:
    """The requested device, else the model's accelerator, else CUDA when available, else CPU.

    Raises:
        ValueError: the requested device does not exist here (``device_problem``).
    """
    if device is not None:
        problem = device_problem(device)
        if problem is not None:
            raise ValueError(f"device {str(device)!r}: {problem}; use device='cpu'")
        return torch.device(device)
    if model is not None:
        param = next(model.parameters(), None)
        if param is not None and param.device.type != "cpu":
            return param.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_problem(device: str | torch.device) -> str | None:
    """Why ``device`` cannot be used on this machine (not a device name, no CUDA, no CUDA device
    of that number), or None."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return f"{str(device)!r} is not a device name (cpu, cuda, cuda:1, ...)"
    if parsed.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device here"
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        return f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


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

