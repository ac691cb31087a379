"""The frames (frames.py): constants, SAM's resize rule, and the way back to the original frame."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from prompt_ris.config import Config
from prompt_ris.data.transforms import lowres_mask
from prompt_ris.frames import (
    CLIP_MEAN,
    CLIP_STD,
    LOWRES_FACTOR,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    lowres_to_original,
    resized_shape,
)
from prompt_ris.models.build import build_sam


def _ellipse(height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[:height, :width]
    cy, cx = height * 0.45, width * 0.55
    return ((ys - cy) / (height * 0.3)) ** 2 + ((xs - cx) / (width * 0.25)) ** 2 <= 1.0


def _near_border(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` (chessboard distance) of the mask's border."""
    padded = np.pad(mask, radius, mode="edge")
    h, w = mask.shape
    windows = [
        padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
    ]
    stack = np.stack(windows)
    return stack.any(0) & ~stack.all(0)


def _letterbox_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """A mask letterboxed into a ``size`` square by hand: box-filter shrink, zero pad."""
    h, w = resized_shape(*mask.shape, size)
    resized = Image.fromarray(mask.astype(np.float32)).resize((w, h), Image.Resampling.BOX)
    out = torch.zeros(size, size)
    out[:h, :w] = torch.tensor(np.asarray(resized))
    return out


def _one(*values: object) -> torch.Tensor:
    return torch.tensor([list(values)])


def test_constants_match_upstream(tiny_cfg: Config) -> None:
    assert CLIP_MEAN == tuple(OPENAI_DATASET_MEAN) and CLIP_STD == tuple(OPENAI_DATASET_STD)
    params = inspect.signature(Sam.__init__).parameters
    assert list(SAM_PIXEL_MEAN) == params["pixel_mean"].default
    assert list(SAM_PIXEL_STD) == params["pixel_std"].default
    sam = build_sam(tiny_cfg.model.sam, None)  # the SAM we build normalises the same way
    assert sam.pixel_mean.flatten().tolist() == pytest.approx(SAM_PIXEL_MEAN)
    assert sam.pixel_std.flatten().tolist() == pytest.approx(SAM_PIXEL_STD)
    # The low-res frame is SAM's mask-decoder output: 4 x its image-embedding grid.
    side = tiny_cfg.model.sam.image_size // 16
    assert sam.prompt_encoder.mask_input_size == (LOWRES_FACTOR * side,) * 2
    assert LOWRES_FACTOR == 4


def test_resized_shape_follows_sam_rule() -> None:
    assert resized_shape(480, 640, 1024) == (768, 1024)
    assert resized_shape(427, 640, 1024) == (683, 1024)  # 427 * 1.6 = 683.2
    assert resized_shape(640, 427, 480) == (480, 320)  # 427 * 0.75 = 320.25
    assert resized_shape(3, 4000, 1024) == (1, 1024)  # 0.768 rounds to 1
    assert resized_shape(5000, 1, 1024) == (1024, 1)  # SAM would give 0 here
    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 3000, size=(50, 2)):
        assert resized_shape(int(h), int(w), 1024) == ResizeLongestSide.get_preprocess_shape(
            int(h), int(w), 1024
        )
    for bad in ((0, 5), (5, 0), (-1, 3)):
        with pytest.raises(ValueError, match="must be positive"):
            resized_shape(*bad, 1024)


def test_lowres_to_original_crops_then_resizes_by_hand() -> None:
    logits = torch.arange(16.0).reshape(1, 1, 4, 4)
    # Frame = logits' side and input = original size: the map is a plain crop of the top-left.
    (crop,) = lowres_to_original(logits, _one(2, 3), _one(2, 3), torch.tensor([0]), 4)
    assert crop.tolist() == [[0.0, 1.0, 2.0], [4.0, 5.0, 6.0]]
    # Half the size in each direction: bilinear (align_corners=False) at factor 1/2 averages
    # 2 x 2 blocks: (0 + 1 + 4 + 5) / 4 = 2.5, (2 + 3 + 6 + 7) / 4 = 4.5.
    (half,) = lowres_to_original(logits, _one(2, 4), _one(1, 2), torch.tensor([0]), 4)
    assert half.tolist() == [[2.5, 4.5]]
    # A constant map stays constant through both resizes, at any size; output is float32.
    flat = torch.full((2, 1, 8, 8), -3.0, dtype=torch.bfloat16)
    maps = lowres_to_original(flat, _one(32, 20), _one(7, 5), torch.tensor([0, 0]), 32)
    assert [tuple(m.shape) for m in maps] == [(7, 5), (7, 5)]
    assert all(m.dtype == torch.float32 and bool((m == -3.0).all()) for m in maps)


def test_lowres_to_original_is_sam_postprocess_per_image(tiny_cfg: Config) -> None:
    sam = build_sam(tiny_cfg.model.sam, None)  # S_s = 256, low-res 64
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 64, 64)
    input_sizes = torch.tensor([[256, 192], [100, 256]])  # a tall and a wide image
    orig_sizes = torch.tensor([[120, 90], [50, 128]])
    image_index = torch.tensor([1, 0, 1])
    got = lowres_to_original(logits, input_sizes, orig_sizes, image_index, 256)
    assert [tuple(m.shape) for m in got] == [(50, 128), (120, 90), (50, 128)]
    for row, image in enumerate(image_index.tolist()):
        want = sam.postprocess_masks(
            logits[row : row + 1],
            tuple(input_sizes[image].tolist()),
            tuple(orig_sizes[image].tolist()),
        )[0, 0]
        torch.testing.assert_close(got[row], want)


@pytest.mark.parametrize(
    ("height", "width", "frame", "radius"),
    [(50, 80, 256, 2), (120, 45, 128, 3), (300, 200, 1024, 2)],
)
def test_lowres_round_trip_differs_only_at_the_border(
    height: int, width: int, frame: int, radius: int
) -> None:
    mask = _ellipse(height, width)
    low = lowres_mask(mask, frame)
    assert low.shape == (frame // 4, frame // 4) and 0 <= low.min() and low.max() <= 1
    # Area is kept: low-res pixel = 16 SAM pixels, a SAM pixel = (H / h')^2 original pixels.
    h, w = resized_shape(height, width, frame)
    area = float(low.sum()) * 16 * (height * width) / (h * w)
    assert area == pytest.approx(mask.sum(), rel=0.02)
    (back,) = lowres_to_original(
        low[None, None], _one(h, w), _one(height, width), torch.tensor([0]), frame
    )
    wrong = (back > 0.5).numpy() != mask
    assert wrong.sum() < 0.05 * mask.sum()
    assert not (wrong & ~_near_border(mask, radius)).any()


def test_clip_frame_mask_round_trip() -> None:
    """Any square frame aligned with the SAM frame maps back the same way (here a 64 CLIP frame,
    given as its own "SAM" side)."""
    mask = _ellipse(90, 160)
    boxed = _letterbox_mask(mask, 64)
    size = resized_shape(90, 160, 64)
    assert size == (36, 64) and boxed[36:].sum() == 0
    (back,) = lowres_to_original(
        boxed[None, None], _one(*size), _one(90, 160), torch.tensor([0]), 64
    )
    wrong = (back > 0.5).numpy() != mask
    assert not (wrong & ~_near_border(mask, 3)).any()
