"""What the app answers: masks, coarse masks, points and pictures for the expressions about one
image, with each image's SAM embedding computed once and reused.

The masks are ``PromptRIS.predict``'s for the same image, expressions, threshold and prompt
switches (the same call, given the cached F_IS). Everything a user can get wrong raises
:class:`InputProblem` with a one-line message for the page.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from prompt_ris.data.rle import encode_rle
from prompt_ris.data.transforms import LetterboxedImage
from prompt_ris.method_picture import (
    expression_color,
    expressions_picture,
    mask_iou,
    method_picture,
)
from prompt_ris.models import PromptRIS
from prompt_ris.prompt_switches import PROMPT_TYPES, PromptSwitches

MAX_PIXELS = 4096 * 4096  # larger images are refused (memory), with the fix
MAX_EXPRESSIONS = 8  # per request
CACHE_IMAGES = 8  # SAM embeddings kept (least recently used dropped)


class InputProblem(ValueError):
    """Something wrong with what the user gave; the message is shown in the page."""


@dataclass
class Answer:
    """The answers about one image.

    Attributes:
        expressions: the N expressions, in order.
        masks: (N, H, W) bool final masks.
        coarse_probs: (N, H, W) float32 coarse-mask probabilities (S_C).
        points: (N, 2) (x, y) where the point prompt clicked.
        ious: per expression, the IoU with its ground truth, or None when unknown.
        notes: warnings for the page (an expression cut to the text tower's length).
        embedded: whether this answer computed the image's SAM embedding (False: reused).
        seconds: time spent answering.
    """

    expressions: list[str]
    masks: np.ndarray
    coarse_probs: np.ndarray
    points: np.ndarray
    ious: list[float | None]
    notes: list[str] = field(default_factory=list)
    embedded: bool = False
    seconds: float = 0.0

    def masks_json(self) -> str:
        """The masks as COCO RLE, one entry per expression (what scripts and tests read)."""
        return json.dumps(
            [
                {"expression": text, "mask": encode_rle(mask), "iou": iou}
                for text, mask, iou in zip(self.expressions, self.masks, self.ious, strict=True)
            ]
        )


def read_image(path: str | Path) -> np.ndarray:
    """An uploaded file as (H, W, 3) uint8, refusing what is not an image or too large."""
    name = Path(path).name
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise InputProblem(_too_large(width, height))
            return np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError as err:
        raise InputProblem(f"'{name}' is too large to open ({err}); downscale it") from err
    except (UnidentifiedImageError, OSError) as err:
        raise InputProblem(
            f"'{name}' is not an image this app can read; upload a PNG, JPEG or WebP file"
        ) from err


def check_image(image: np.ndarray | None) -> np.ndarray:
    """An (H, W, 3) uint8 image, or the problem with it."""
    if image is None:
        raise InputProblem("no image yet; upload one, pick an example or press 'new scene'")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise InputProblem(f"the image is of shape {image.shape}; give an RGB image")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise InputProblem(_too_large(image.shape[1], image.shape[0]))
    return image


def parse_expressions(text: str | None) -> list[str]:
    """One expression per non-empty line, or the problem with the list."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise InputProblem("no expression; write one per line, e.g. 'the red circle'")
    if len(lines) > MAX_EXPRESSIONS:
        raise InputProblem(
            f"{len(lines)} expressions; the app answers up to {MAX_EXPRESSIONS} at once: "
            "remove some lines"
        )
    return lines


def parse_switches(names: Sequence[str] | None) -> PromptSwitches:
    """The prompt switches from the ticked names, or the problem (at least one must be on)."""
    ticked = [name for name in PROMPT_TYPES if name in (names or ())]
    if not ticked:
        raise InputProblem("every prompt is switched off; tick mask, point or text")
    return PromptSwitches.parse(" + ".join(ticked))


def _too_large(width: int, height: int) -> str:
    return (
        f"the image is {width} x {height} pixels ({width * height / 1e6:.1f} MP); the app takes "
        f"up to {MAX_PIXELS / 1e6:.1f} MP: downscale it"
    )


class Answerer:
    """Answers expressions about images with one model, caching each image's SAM embedding.

    Safe to call from several threads: the model runs one request at a time.

    Args:
        model: a loaded PromptRIS (put in eval mode on ``device``).
        device: where the model runs (default: where it is).
        cache_images: how many images' embeddings are kept.
    """

    def __init__(
        self, model: PromptRIS, device: str | torch.device | None = None,
        cache_images: int = CACHE_IMAGES,
    ) -> None:  # fmt: skip
        self.model = model.to(device).eval() if device is not None else model.eval()
        self.cache_images = cache_images
        self._cache: OrderedDict[str, tuple[LetterboxedImage, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.embeddings_computed = 0

    @property
    def default_switches(self) -> PromptSwitches:
        return self.model.default_switches

    def answer(
        self,
        image: np.ndarray,
        expressions: list[str],
        threshold: float = 0.5,
        switches: PromptSwitches | None = None,
        truths: dict[str, np.ndarray] | None = None,
    ) -> Answer:
        """Masks, coarse masks and points for ``expressions`` about ``image``.

        Raises:
            InputProblem: the threshold is not in (0, 1).
        """
        if not 0.0 < threshold < 1.0:
            raise InputProblem(f"threshold {threshold} is not in (0, 1); e.g. 0.5")
        started = time.perf_counter()
        with self._lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            letterboxed, embed, embedded = self._embedding(image)
            prediction = self.model.predict(
                letterboxed, expressions, switches=switches, threshold=threshold,
                return_probs=True, return_coarse=True, sam_img_embed=embed,
            )  # fmt: skip
        notes = [str(w.message) for w in caught if "was cut" in str(w.message)]
        truths = truths or {}
        ious = [
            mask_iou(mask, truths[text]) if text in truths else None
            for text, mask in zip(expressions, prediction.masks, strict=True)
        ]
        return Answer(
            expressions=list(expressions), masks=prediction.masks,
            coarse_probs=prediction.coarse_probs, points=prediction.points, ious=ious,
            notes=notes, embedded=embedded, seconds=time.perf_counter() - started,
        )  # fmt: skip

    def _embedding(self, image: np.ndarray) -> tuple[LetterboxedImage, torch.Tensor, bool]:
        """(letterboxed image, F_IS (1, D_S, h_s, w_s), computed now) for ``image``."""
        key = hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return (*self._cache[key], False)
        letterboxed = self.model.letterbox(image).to(self.model.device, self.model.dtype)
        with torch.inference_mode():
            embed = self.model.encode_sam(letterboxed.sam_image[None])  # (1, D_S, h_s, w_s)
        self._cache[key] = (letterboxed, embed)
        while len(self._cache) > self.cache_images:
            self._cache.popitem(last=False)
        self.embeddings_computed += 1
        return letterboxed, embed, True


def overview(image: np.ndarray, answer: Answer) -> np.ndarray:
    """Every final mask over the image in its expression's colour, with the points."""
    return expressions_picture(image, list(answer.masks), list(answer.points))


def pictures(
    image: np.ndarray, answer: Answer, truths: dict[str, np.ndarray] | None = None
) -> list[tuple[Image.Image, str]]:
    """The method's picture for each expression, with its caption."""
    truths = truths or {}
    out = []
    for k, text in enumerate(answer.expressions):
        picture = method_picture(
            image, text, answer.masks[k], answer.coarse_probs[k], answer.points[k],
            truths.get(text), color=expression_color(k),
        )  # fmt: skip
        iou = answer.ious[k]
        out.append((picture, text if iou is None else f"{text} (IoU {iou:.2f})"))
    return out


def results_table(answer: Answer) -> str:
    """Markdown table: each expression in its colour, its mask's share of the image, its IoU."""
    rows = ["| | expression | mask | IoU |", "|---|---|---:|---:|"]
    for k, text in enumerate(answer.expressions):
        r, g, b = expression_color(k)
        swatch = f'<span style="color:#{r:02x}{g:02x}{b:02x}">&#9632;</span>'
        iou = "-" if answer.ious[k] is None else f"{answer.ious[k]:.2f}"
        rows.append(f"| {swatch} | {text} | {answer.masks[k].mean():.1%} | {iou} |")
    return "\n".join(rows)
