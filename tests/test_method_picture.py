"""The method's picture: its panels, sizes and caption, and the point it shows is the one SAM
was given (the argmax of the coarse mask)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from prompt_ris.method_picture import (
    PANEL_SIZE,
    expression_color,
    expressions_picture,
    mask_iou,
    method_picture,
)


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.full((30, 50, 3), 120, dtype=np.uint8)
    truth = np.zeros((30, 50), dtype=bool)
    truth[5:15, 10:20] = True
    coarse = np.zeros((30, 50), dtype=np.float32)
    coarse[6:14, 11:19] = 0.9
    return image, truth, coarse


def test_four_panels_of_at_least_the_panel_size_with_ground_truth() -> None:
    image, truth, coarse = _scene()
    picture = method_picture(image, "the grey square", truth, coarse, (15.0, 10.0), truth)
    panel_w = round(50 * PANEL_SIZE / 30)
    assert isinstance(picture, Image.Image) and picture.mode == "RGB"
    assert picture.width == 4 * panel_w and picture.height > PANEL_SIZE
    rgb = np.asarray(picture)
    green = (rgb == (0, 255, 0)).all(axis=2)  # the point, in the coarse panel only
    assert green[:, panel_w : 2 * panel_w].any() and not green[:, :panel_w].any()
    assert not green[:, 2 * panel_w :].any()


def test_three_panels_without_ground_truth_and_iou() -> None:
    image, truth, coarse = _scene()
    assert method_picture(image, "x", truth, coarse, (1, 1)).width == 3 * round(50 * 384 / 30)
    assert method_picture(image, "x", truth).width == 2 * round(50 * 384 / 30)
    with pytest.raises(ValueError, match="does not match image"):
        method_picture(image, "x", truth[:10])
    half = truth.copy()
    half[5:15, 15:20] = False
    assert mask_iou(half, truth) == pytest.approx(0.5)
    assert mask_iou(np.zeros_like(truth), np.zeros_like(truth)) == 1.0


def test_expressions_picture_gives_each_expression_its_colour() -> None:
    image, truth, _ = _scene()
    other = np.zeros_like(truth)
    other[20:28, 30:45] = True
    out = expressions_picture(image, [truth, other])
    assert out.shape == image.shape and expression_color(0) != expression_color(1)
    assert not np.array_equal(out[10, 15], out[24, 40])  # two tints
    np.testing.assert_array_equal(out[0, 0], image[0, 0])  # outside every mask: the image


def test_prediction_point_is_the_argmax_of_the_coarse_mask(tiny_model) -> None:  # noqa: ANN001
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)  # square: no letterbox padding
    out = tiny_model.predict(image, ["a", "the b"], return_coarse=True, return_probs=True)
    assert out.points.shape == (2, 2)
    for k in range(2):
        y, x = np.unravel_index(out.coarse_probs[k].argmax(), out.coarse_probs[k].shape)
        assert abs(out.points[k][0] - x) <= 2 and abs(out.points[k][1] - y) <= 2
