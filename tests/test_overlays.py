"""Mask pictures (overlays.py): the tint and outline by hand, side-by-side panels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from prompt_ris.overlays import (
    COARSE_COLOR,
    GROUND_TRUTH_COLOR,
    OVERLAY_ALPHA,
    PREDICTION_COLOR,
    draw_overlay,
    mask_panels,
    prediction_and_truth,
)


def _box_mask() -> np.ndarray:
    mask = np.zeros((40, 50), bool)
    mask[20:30, 10:20] = True
    return mask


def test_draw_overlay_by_hand() -> None:
    image = np.full((40, 50, 3), 100, np.uint8)
    mask = _box_mask()
    out = np.asarray(draw_overlay(image, mask, None, color=(0, 200, 250)))
    assert out.shape == (40, 50, 3)
    assert OVERLAY_ALPHA == 0.5
    np.testing.assert_array_equal(out[25, 15], [50, 150, 175])  # inside: 0.5 * 100 + 0.5 * c
    np.testing.assert_array_equal(out[20, 15], [0, 200, 250])  # outline
    np.testing.assert_array_equal(out[5, 5], [100, 100, 100])  # outside
    with_text = np.asarray(draw_overlay(image, mask, "the box"))
    assert (with_text[:8, :8] != 100).any()  # the text band is drawn top-left
    np.testing.assert_array_equal(with_text[35:, 30:], out[35:, 30:])
    with pytest.raises(ValueError, match="does not match"):
        draw_overlay(image, mask[:-1])


def test_default_colour_is_segment_anythings_blue() -> None:
    image = Image.new("RGB", (50, 40), (100, 100, 100))  # a PIL image works as well
    out = np.asarray(draw_overlay(image, _box_mask()))
    assert PREDICTION_COLOR == (30, 144, 255)
    np.testing.assert_array_equal(out[20, 15], PREDICTION_COLOR)  # outline: the colour itself
    np.testing.assert_array_equal(out[25, 15], [65, 122, 178])  # (100 + c) / 2, rounded half-even
    assert len({PREDICTION_COLOR, GROUND_TRUTH_COLOR, COARSE_COLOR}) == 3


def test_prediction_and_truth_side_by_side() -> None:
    image = np.full((100, 160, 3), 100, np.uint8)
    pred = np.zeros((100, 160), bool)
    pred[60:80, 20:50] = True
    truth = np.roll(pred, 70, axis=1)  # columns 90:120
    canvas = np.asarray(prediction_and_truth(image, pred, truth, "the box (IoU 0.00)"))
    assert canvas.shape == (100, 320, 3)
    np.testing.assert_array_equal(canvas[79, 30], PREDICTION_COLOR)  # left: the prediction
    np.testing.assert_array_equal(canvas[79, 160 + 100], GROUND_TRUTH_COLOR)  # right: the truth
    np.testing.assert_array_equal(canvas[79, 160 + 30], [100, 100, 100])  # not in the truth
    np.testing.assert_array_equal(canvas[79, 100], [100, 100, 100])  # not in the prediction
    np.testing.assert_array_equal(
        canvas[:, :160], np.asarray(draw_overlay(image, pred, "the box (IoU 0.00)"))
    )
    right = np.asarray(draw_overlay(image, truth, "ground truth", color=GROUND_TRUTH_COLOR))
    np.testing.assert_array_equal(canvas[:, 160:], right)
    assert (canvas[:8, 160:168] != 100).any()  # the caption of the right panel


def test_mask_panels_in_a_row_with_black_for_missing() -> None:
    image = np.full((40, 50, 3), 100, np.uint8)
    mask = _box_mask()
    row = mask_panels(image, [mask, None], [GROUND_TRUTH_COLOR, PREDICTION_COLOR])
    assert row.shape == (40, 150, 3) and row.dtype == np.uint8
    np.testing.assert_array_equal(row[:, :50], image)
    np.testing.assert_array_equal(
        row[:, 50:100], np.asarray(draw_overlay(image, mask, color=GROUND_TRUTH_COLOR))
    )
    assert not row[:, 100:].any()
    with pytest.raises(ValueError):
        mask_panels(image, [mask], [GROUND_TRUTH_COLOR, PREDICTION_COLOR])  # one colour a mask
