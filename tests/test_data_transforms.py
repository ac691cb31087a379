"""Letterboxing, frame maps and image loading (transforms.py)."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from prompt_ris.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    ImageLoadError,
    ImageSizeMismatchError,
    frame_to_original,
    letterbox_clip,
    letterbox_image,
    letterbox_mask,
    letterbox_sam,
    load_image,
    lowres_mask,
    resized_shape,
)


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


def test_constants_match_upstream() -> None:
    assert CLIP_MEAN == tuple(OPENAI_DATASET_MEAN) and CLIP_STD == tuple(OPENAI_DATASET_STD)
    params = inspect.signature(Sam.__init__).parameters
    assert list(SAM_PIXEL_MEAN) == params["pixel_mean"].default
    assert list(SAM_PIXEL_STD) == params["pixel_std"].default


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


def test_sam_frame_equals_segment_anything_preprocessing() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    sam_image, input_size = letterbox_sam(Image.fromarray(pixels), 64)
    resized = ResizeLongestSide(64).apply_image(pixels)  # SAM's own resize
    assert input_size == resized.shape[:2] == (45, 64)
    mean = torch.tensor(SAM_PIXEL_MEAN)[:, None, None]
    std = torch.tensor(SAM_PIXEL_STD)[:, None, None]
    expected = (torch.from_numpy(resized).permute(2, 0, 1).float() - mean) / std
    torch.testing.assert_close(sam_image[:, :45, :64], expected, atol=1e-5, rtol=0)
    assert sam_image[:, 45:].abs().sum() == 0  # zero padding after normalisation


def test_clip_frame_geometry_and_normalisation() -> None:
    img = Image.new("RGB", (40, 20), (255, 128, 0))
    clip = letterbox_clip(img, 32)
    assert clip.shape == (3, 32, 32)
    value = (np.array([255, 128, 0]) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    expected = torch.tensor(value).float()[:, None, None].expand(3, 16, 32)
    torch.testing.assert_close(clip[:, :16, :], expected)
    assert clip[:, 16:].abs().sum() == 0


def test_huge_thin_image_letterboxes_in_both_frames() -> None:
    img = Image.new("RGB", (4000, 3), (10, 200, 30))
    frames = letterbox_image(img, 480, 1024)
    assert frames.clip_image.shape == (3, 480, 480) and frames.sam_image.shape == (3, 1024, 1024)
    assert frames.input_size == (1, 1024) and frames.orig_size == (3, 4000)
    assert frames.sam_image[:, 1:].abs().sum() == 0
    mask = np.zeros((3, 4000), dtype=bool)
    mask[:, :2000] = True
    low = lowres_mask(mask, 1024)
    assert low.shape == (256, 256)
    # Row 0 of the SAM frame is the image; a low-res pixel averages 4 rows: 1/4 where covered.
    torch.testing.assert_close(low[0, :128], torch.full((128,), 0.25))
    assert low[0, 128:].sum() == 0 and low[1:].sum() == 0


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
    back = frame_to_original(low[None, None], (h, w), (height, width), frame)[0, 0] > 0.5
    wrong = back.numpy() != mask
    assert wrong.sum() < 0.05 * mask.sum()
    assert not (wrong & ~_near_border(mask, radius)).any()


def test_clip_frame_mask_round_trip() -> None:
    mask = _ellipse(90, 160)
    boxed = letterbox_mask(mask, 64)
    size = resized_shape(90, 160, 64)
    assert size == (36, 64) and boxed[36:].sum() == 0
    back = frame_to_original(boxed[None, None], size, (90, 160), 64)[0, 0] > 0.5
    wrong = back.numpy() != mask
    assert not (wrong & ~_near_border(mask, 3)).any()


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def test_image_modes_load_as_rgb(tmp_path: Path) -> None:
    cases = {
        "L": (Image.new("L", (4, 3), 100), "png", (100, 100, 100)),
        "LA": (Image.new("LA", (4, 3), (50, 0)), "png", (50, 50, 50)),
        "RGBA": (Image.new("RGBA", (4, 3), (10, 20, 30, 0)), "png", (10, 20, 30)),
        "CMYK": (Image.new("CMYK", (4, 3), (255, 0, 0, 0)), "tiff", (0, 255, 255)),
        "I;16": (Image.fromarray(np.full((3, 4), 25700, dtype=np.uint16)), "png", (100, 100, 100)),
    }
    palette = Image.new("P", (4, 3), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50])
    palette.info["transparency"] = 0
    cases["P"] = (palette, "png", (200, 100, 50))
    for mode, (img, ext, rgb) in cases.items():
        path = _save(img, tmp_path / f"{mode.replace(';', '_')}.{ext}")
        loaded = load_image(path)
        assert loaded.mode == "RGB" and loaded.size == (4, 3), mode
        assert loaded.getpixel((2, 1)) == rgb, mode
    full = Image.fromarray(np.full((3, 4), 65535, dtype=np.uint16))
    assert load_image(_save(full, tmp_path / "white16.png")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_user_vs_annotated_images(tmp_path: Path) -> None:
    stored = np.zeros((10, 30, 3), dtype=np.uint8)  # H=10, W=30 as stored
    stored[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = _save(Image.fromarray(stored), tmp_path / "rotated.png", exif=exif.tobytes())
    upright = np.asarray(load_image(path))
    assert upright.shape == (30, 10, 3)  # a user image is turned upright
    assert tuple(upright[0, 9]) == (255, 0, 0)  # the stored top-left is now top-right
    as_stored = np.asarray(load_image(path, expected_hw=(10, 30)))
    np.testing.assert_array_equal(as_stored, stored)  # annotations are in the stored frame
    assert np.asarray(load_image(path, expected_hw=(30, 10))).shape == (30, 10, 3)
    with pytest.raises(ImageSizeMismatchError, match="rotated.png.*annotation says 5x5"):
        load_image(path, expected_hw=(5, 5))


def test_bad_image_files_raise_naming_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    truncated = tmp_path / "truncated.png"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    _save(Image.fromarray(noise), truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    for path in (empty, corrupt, truncated, tmp_path / "absent.jpg"):
        with pytest.raises(ImageLoadError, match=path.name):
            load_image(path)
