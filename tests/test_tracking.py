"""What a training run records (engine/tracking.py): loss meters, metrics.jsonl and its trimming
on resume, and the overlay panels written to the tracker."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prompt_ris.data.batch import Batch
from prompt_ris.engine.checkpointing import TrainerState
from prompt_ris.engine import tracking
from prompt_ris.engine.tracking import (
    METRICS_FILENAME,
    STAGE2_STEP_COST,
    LossMeter,
    StageProgress,
    append_metrics,
    logged_before_checkpoint,
    overlay_panels,
    remaining_seconds,
    tracker_problem,
    trim_metrics,
)
from prompt_ris.losses import Stage
from prompt_ris.models import PromptRIS
from prompt_ris.overlays import COARSE_COLOR, GROUND_TRUTH_COLOR, PREDICTION_COLOR


def test_loss_meter_sums_terms_and_expressions() -> None:
    meter = LossMeter()
    meter.add({"total": torch.tensor(1.5), "icl": torch.tensor(0.5)}, 8)
    first = meter.sums["total"]
    meter.add({"total": torch.tensor(2.0), "icl": torch.tensor(0.25)}, 4)
    assert (meter.steps, meter.expressions) == (2, 12)
    assert meter.sums["total"].item() == 3.5 and meter.sums["icl"].item() == 0.75
    assert first.item() == 1.5  # the first step's tensor was copied, not summed in place


def test_logged_before_checkpoint_rule() -> None:
    mid_epoch = TrainerState(epoch=1, step_in_epoch=2, global_step=6)
    end_of_epoch = TrainerState(epoch=2, step_in_epoch=0, global_step=8)
    train, val = {"loss/total": 1.0}, {"val/final/oIoU": 50.0}
    for step, record, state, kept in [
        (5, train, mid_epoch, True),  # before the checkpoint
        (7, train, mid_epoch, False),  # after it
        (6, train, mid_epoch, True),  # the checkpoint's own step: training logs come first
        (6, val, mid_epoch, False),  # ... a validation at that step only if it ends an epoch
        (8, val, end_of_epoch, True),
        (9, val, end_of_epoch, False),
    ]:
        assert logged_before_checkpoint({"step": step, **record}, state) is kept, (step, record)


def test_append_then_trim_keeps_what_the_checkpoint_saw(tmp_path: Path) -> None:
    trim_metrics(tmp_path, TrainerState(global_step=3))  # no file yet: nothing to do
    assert not (tmp_path / METRICS_FILENAME).exists()
    records = [
        {"step": 1, "loss/total": 3.0},
        {"step": 2, "loss/total": 2.0},
        {"step": 2, "epoch": 1, "val/final/oIoU": 10.0},
        {"step": 3, "loss/total": 1.0},
    ]
    for record in records:
        append_metrics(tmp_path, record)
    lines = (tmp_path / METRICS_FILENAME).read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    trim_metrics(tmp_path, TrainerState(epoch=0, step_in_epoch=2, global_step=2))  # mid-epoch
    kept = [json.loads(line) for line in (tmp_path / METRICS_FILENAME).read_text().splitlines()]
    assert kept == records[:2]


def test_overlay_panels_show_input_truth_coarse_final(
    tiny_model: PromptRIS, synthetic_batch: Batch
) -> None:
    model = tiny_model.eval()
    images, texts = overlay_panels(model, synthetic_batch, with_sam=True, count=3)
    assert images.shape == (3, 3, 64, 4 * 64) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert texts == synthetic_batch.texts[:3]
    gt = synthetic_batch.gt_masks[0, 0] > 0.5  # a box: its top-left corner is outlined
    y, x = (int(v[0]) for v in torch.nonzero(gt, as_tuple=True))
    np.testing.assert_allclose(images[0, :, y, 64 + x], np.array(GROUND_TRUTH_COLOR) / 255.0)
    np.testing.assert_array_equal(images[0, :, :, :64], images[1, :, :, :64])  # same image
    with torch.no_grad():
        out = model(synthetic_batch, prompt_dropout=False)
    coarse = (out.coarse_lowres[0, 0] > 0).numpy()
    final = (out.mask_logits[0, 0] > 0).numpy()
    outside = ~gt.numpy()  # the truth panel away from the truth is the input image
    np.testing.assert_array_equal(
        images[0, :, :, 64:128][:, outside], images[0, :, :, :64][:, outside]
    )
    for panel, mask, color in ((2, coarse, COARSE_COLOR), (3, final, PREDICTION_COLOR)):
        tinted = images[0, :, :, 64 * panel : 64 * (panel + 1)]
        changed = (tinted != images[0, :, :, :64]).any(0)
        assert not (changed & ~mask).any(), panel  # tinted only where the mask is
        if mask.any():  # the mask's outline has the colour itself
            ys, xs = np.nonzero(mask)
            np.testing.assert_allclose(tinted[:, ys[0], xs[0]], np.array(color) / 255.0)
    # Stage 1 (no SAM): the final panel is black; count caps at the batch size.
    stage1, texts = overlay_panels(model, synthetic_batch, with_sam=False, count=10)
    assert stage1.shape == (4, 3, 64, 256) and len(texts) == 4
    assert not stage1[:, :, :, 192:].any()
    full = overlay_panels(model, synthetic_batch, with_sam=True, count=4)[0]
    np.testing.assert_array_equal(stage1[:, :, :, :192], full[:, :, :, :192])


# --------------------------------------------------------------------------------------------
# Throughput, ETA and trackers
# --------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_loss_meter_counts_training_time_only(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(tracking, "_clock", clock)
    meter = LossMeter()
    clock.now += 2.0  # two seconds of training: 3 steps of 4 expressions
    for _ in range(3):
        meter.add({"total": torch.tensor(1.0)}, 4)
    assert meter.pause() is True and meter.pause() is False
    clock.now += 1000.0  # a validation: not training time
    meter.resume()
    clock.now += 1.0  # one more step
    meter.add({"total": torch.tensor(1.0)}, 4)
    assert meter.elapsed == 3.0
    assert meter.expressions_per_s == 16 / 3.0


def test_eta_weights_each_stage_by_its_cost() -> None:
    coarse, full = Stage.COARSE, Stage.FULL
    zero = {coarse: 0.0, full: 0.0}
    none = {coarse: 0, full: 0}
    assert remaining_seconds(0, 10, 4, zero, none) is None  # nothing measured yet
    # Stage 1 measured at 1 s/step; stage 2 estimated at STAGE2_STEP_COST times that.
    eta = remaining_seconds(2, 10, 4, {coarse: 2.0, full: 0.0}, {coarse: 2, full: 0})
    assert eta == 2 * 1.0 + 6 * STAGE2_STEP_COST * 1.0
    # Once stage 2 has run, its measured cost replaces the estimate.
    assert remaining_seconds(6, 10, 4, {coarse: 4.0, full: 6.0}, {coarse: 4, full: 2}) == 4 * 3.0
    # A run resumed in stage 2 needs no stage-1 measurement.
    assert remaining_seconds(8, 10, 4, {coarse: 0.0, full: 5.0}, {coarse: 0, full: 2}) == 2 * 2.5


def test_progress_bar_shows_the_stage_weighted_eta() -> None:
    clock = FakeClock()
    out = io.StringIO()
    bar = StageProgress(total=10, stage1_steps=4, clock=clock, file=out, mininterval=0)
    for _ in range(2):  # stage 1 at 1 s per step
        clock.now += 1.0
        bar.update(1)
    assert bar.eta_seconds == 2 * 1.0 + 6 * STAGE2_STEP_COST
    assert bar.format_dict["eta"] == "00:14"
    clock.now += 500.0  # a validation
    bar.unpause()
    for _ in range(4):  # the rest of stage 1 (1 s), then stage 2 at 3 s per step
        clock.now += 1.0 if bar.n < 4 else 3.0
        bar.update(1)
    assert bar.measured_steps == {Stage.COARSE: 4, Stage.FULL: 2}
    assert bar.measured_seconds == {Stage.COARSE: 4.0, Stage.FULL: 6.0}
    assert bar.eta_seconds == 4 * 3.0
    bar.close()
    assert "<00:12," in out.getvalue()  # the bar prints the weighted ETA


def test_tracker_choices_and_missing_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracker_problem("tensorboard") is None and tracker_problem("none") is None
    assert tracker_problem("all") is None
    assert "choose one of" in tracker_problem("tensorbord")
    monkeypatch.setattr(tracking, "is_wandb_available", lambda: False)
    assert "pip install wandb" in tracker_problem("wandb")
    assert tracking.log_with("none") is None and tracking.log_with("all") == ["all"]
