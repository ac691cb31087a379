"""Image loading and coercion, letterboxing into both frames, ground-truth masks (transforms.py).

The frames themselves and the map back to the original frame are tested in test_frames.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from prompt_ris.data.transforms import (
    ImageLoadError,
    ImageSizeMismatchError,
    as_rgb_image,
    letterbox_clip,
    letterbox_image,
    letterbox_sam,
    load_image,
    lowres_mask,
    sam_frame_to_rgb,
)
from prompt_ris.frames import CLIP_MEAN, CLIP_STD, SAM_PIXEL_MEAN, SAM_PIXEL_STD


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


def test_as_rgb_image_accepts_paths_pil_and_arrays(tmp_path: Path) -> None:
    array = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = _save(Image.fromarray(array), tmp_path / "img.png")
    for image in (path, str(path), Image.fromarray(array), array):
        rgb = as_rgb_image(image)
        assert rgb.mode == "RGB" and rgb.size == (7, 5)
        np.testing.assert_array_equal(np.asarray(rgb), array)
    grey = np.full((3, 4), 77, np.uint8)
    for image in (grey, grey[..., None], np.dstack([grey] * 3 + [np.zeros_like(grey)])):
        np.testing.assert_array_equal(np.asarray(as_rgb_image(image)), np.full((3, 4, 3), 77))


def test_as_rgb_image_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="missing.png"):
        as_rgb_image(tmp_path / "missing.png")
    for array, message in (
        (np.zeros((0, 5, 3), np.uint8), "zero size"),
        (np.zeros((5, 5, 3), np.float32), "uint8"),
        (np.zeros((5, 5, 2), np.uint8), "shape"),
    ):
        with pytest.raises(ValueError, match=message):
            as_rgb_image(array)
    with pytest.raises(ValueError, match="zero size"):
        as_rgb_image(Image.new("RGB", (0, 7)))
    with pytest.raises(ValueError, match="mode 'La'"):
        as_rgb_image(Image.new("La", (4, 4)))
    with pytest.raises(TypeError, match="path, a PIL image"):
        as_rgb_image(torch.zeros(3, 4, 4))  # type: ignore[arg-type]


def test_letterboxed_image_to_moves_both_frames() -> None:
    frames = letterbox_image(Image.new("RGB", (20, 10), (1, 2, 3)), 16, 32)
    moved = frames.to("meta", torch.float16)
    assert moved.clip_image.device.type == moved.sam_image.device.type == "meta"
    assert moved.clip_image.dtype == moved.sam_image.dtype == torch.float16
    assert moved.clip_image.shape == (3, 16, 16) and moved.sam_image.shape == (3, 32, 32)
    assert (moved.input_size, moved.orig_size) == ((16, 32), (10, 20))
    assert (frames.input_size, frames.orig_size) == ((16, 32), (10, 20))
    assert frames.sam_image.dtype == torch.float32  # a new object; the original is unchanged


def test_sam_frame_to_rgb_inverts_the_normalisation() -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    sam_image, (h, w) = letterbox_sam(Image.fromarray(pixels), 32)
    assert (h, w) == (24, 32)
    full = sam_frame_to_rgb(sam_image[None], 32)  # (1, 32, 32, 3) uint8
    assert full.shape == (1, 32, 32, 3) and full.dtype == np.uint8
    np.testing.assert_array_equal(full[0, :24], pixels)  # same size: the pixels come back
    # Padding (0 after normalisation) comes back as the mean colour, rounded.
    np.testing.assert_array_equal(
        full[0, 24:], np.broadcast_to(np.round(SAM_PIXEL_MEAN), (8, 32, 3))
    )
    quarter = sam_frame_to_rgb(sam_image[None], 8)  # area-averaged 4 x 4 blocks
    block = pixels[:4, :4].reshape(16, 3).astype(np.float64).mean(0)
    np.testing.assert_allclose(quarter[0, 0, 0], block, atol=0.51)
