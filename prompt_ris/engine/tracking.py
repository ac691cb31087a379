"""What a training run records: loss meters, ``metrics.jsonl``, tracker scalars and mask overlays.

``metrics.jsonl`` holds one JSON line per log step (``loss/*``, ``lr``, ``expressions_per_s``) and
per validation (``val/*``); a resumed run first cuts it back to what was logged before the
checkpoint it resumes, so the file reads as one uninterrupted run. Overlays (input | ground truth
| coarse | final, in the low-res frame) of a few validation expressions go to the tracker.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from prompt_ris.data.batch import Batch
from prompt_ris.data.transforms import sam_frame_to_rgb
from prompt_ris.engine.checkpointing import TrainerState
from prompt_ris.models import PromptRIS
from prompt_ris.overlays import COARSE_COLOR, GROUND_TRUTH_COLOR, PREDICTION_COLOR, mask_panels

METRICS_FILENAME = "metrics.jsonl"
TRACKER_NAME = "tensorboard"


@dataclass
class LossMeter:
    """Sums of loss terms and expressions since the last log line (this process)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # on the device: no sync per step
    steps: int = 0
    expressions: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, terms: dict[str, torch.Tensor], expressions: int) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.steps += 1
        self.expressions += expressions


def append_metrics(output_dir: Path, record: dict[str, Any]) -> None:
    """One JSON line in ``<output_dir>/metrics.jsonl``."""
    with open(output_dir / METRICS_FILENAME, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def trim_metrics(output_dir: Path, state: TrainerState) -> None:
    """Drop what an interrupted run logged after the checkpoint ``state`` was saved."""
    path = output_dir / METRICS_FILENAME
    if not path.is_file():
        return
    records = [json.loads(line) for line in path.read_text().splitlines()]
    kept = [r for r in records if logged_before_checkpoint(r, state)]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def logged_before_checkpoint(record: dict[str, Any], state: TrainerState) -> bool:
    """Whether a metrics.jsonl record was written before the checkpoint ``state`` was saved:
    training logs up to its step; validations up to its step only if it ends an epoch."""
    if record["step"] != state.global_step:
        return record["step"] < state.global_step
    return "loss/total" in record or state.step_in_epoch == 0


@torch.no_grad()
def overlay_panels(
    model: PromptRIS, batch: Batch, with_sam: bool, count: int
) -> tuple[np.ndarray, list[str]]:
    """Input | ground truth | coarse | final panels in the low-res frame for ``count`` expressions.

    Returns:
        (N, 3, S_s/4, 4 * S_s/4) float images in [0, 1] and the N expressions.
    """
    out = model(batch, with_sam=with_sam, prompt_dropout=False)
    lowres = batch.gt_masks.shape[-1]
    images = sam_frame_to_rgb(batch.sam_images, lowres)  # (I, S_s/4, S_s/4, 3) uint8
    final = out.mask_logits
    panels = []
    for k in range(min(count, batch.num_expressions)):
        masks = [
            batch.gt_masks[k, 0].cpu().numpy() > 0.5,
            out.coarse_lowres[k, 0].cpu().numpy() > 0,
            None if final is None else final[k, 0].float().cpu().numpy() > 0,  # stage 1: none
        ]
        colors = (GROUND_TRUTH_COLOR, COARSE_COLOR, PREDICTION_COLOR)
        panels.append(mask_panels(images[int(batch.image_index[k])], masks, colors))
    stacked = np.stack(panels).transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # (N, 3, h, 4w)
    return stacked, list(batch.texts[: len(panels)])


def log_overlays(
    accelerator: Accelerator, model: PromptRIS, batch: Batch, with_sam: bool, count: int, step: int
) -> None:
    """Overlays of the first ``count`` expressions of ``batch`` to the tracker (main process)."""
    if count <= 0 or not accelerator.is_main_process:
        return
    was_training = model.training
    model.eval()
    with accelerator.autocast():
        images, texts = overlay_panels(model, batch, with_sam, count)
    model.train(was_training)
    tracker = accelerator.get_tracker(TRACKER_NAME)
    tracker.log_images({"val/overlays": images}, step=step, dataformats="NCHW")
    accelerator.log({"val/overlay_texts": " | ".join(texts)}, step=step)
