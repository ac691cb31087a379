"""What a training run records: loss meters, ``metrics.jsonl``, tracker scalars, mask overlays and
the progress bar.

``metrics.jsonl`` holds one JSON line per log step (``loss/*``, ``lr``, ``expressions_per_s``) and
per validation (``val/*``); a resumed run first cuts it back to what was logged before the
checkpoint it resumes, so the file reads as one uninterrupted run. ``expressions_per_s`` counts
training time only: the meter is paused during validations, exports and checkpoints.

Trackers are accelerate's (``train.tracker``: ``tensorboard``, ``wandb``, ``all`` installed ones,
or ``none``), project ``prompt-ris``; TensorBoard writes under ``<output_dir>/tensorboard/``, wandb
names the run after the run folder. Overlays (input | ground truth | coarse | final, in the
low-res frame) of a few validation expressions go to TensorBoard when it is one of them.

The progress bar (``StageProgress``, a tqdm) counts optimizer steps; its ETA weights the steps
left in each stage by that stage's measured cost per step (a stage-2 step also runs SAM and its
prompts), estimated as ``STAGE2_STEP_COST`` stage-1 steps until stage 2 has run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available
from tqdm.auto import tqdm

from prompt_ris.data.batch import Batch
from prompt_ris.data.transforms import sam_frame_to_rgb
from prompt_ris.engine.checkpointing import TrainerState
from prompt_ris.losses import Stage
from prompt_ris.models import PromptRIS
from prompt_ris.overlays import COARSE_COLOR, GROUND_TRUTH_COLOR, PREDICTION_COLOR, mask_panels

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD = "tensorboard"
TRACKERS = (TENSORBOARD, "wandb", "all", "none")  # train.tracker choices (accelerate's names)
PROJECT_NAME = "prompt-ris"  # the trackers' project
TENSORBOARD_DIRNAME = "tensorboard"  # <output_dir>/tensorboard/<PROJECT_NAME>/events...
# Cost of a stage-2 optimizer step in stage-1 steps, for the ETA until stage 2 has been measured
# (a stage-2 step also runs SAM's encoder, prompts and decoder: about twice a stage-1 step); the
# measured cost replaces it as soon as a stage-2 step has run.
STAGE2_STEP_COST = 2.0


def _clock() -> float:
    return time.perf_counter()


@dataclass
class LossMeter:
    """Sums of loss terms and expressions since the last log line (this process), and the
    training time they took: ``pause()`` / ``resume()`` leave validations and saves out."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # on the device: no sync per step
    steps: int = 0
    expressions: int = 0
    seconds: float = 0.0  # training time of the finished running intervals
    started: float | None = field(default_factory=lambda: _clock())  # None while paused

    def add(self, terms: dict[str, torch.Tensor], expressions: int) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.steps += 1
        self.expressions += expressions

    def pause(self) -> bool:
        """Stop counting time; returns whether the meter was running."""
        if self.started is None:
            return False
        self.seconds += _clock() - self.started
        self.started = None
        return True

    def resume(self) -> None:
        """Count time again (no-op when running)."""
        if self.started is None:
            self.started = _clock()

    @property
    def elapsed(self) -> float:
        """Training seconds since the meter was made, pauses excluded."""
        running = _clock() - self.started if self.started is not None else 0.0
        return self.seconds + running

    @property
    def expressions_per_s(self) -> float:
        return self.expressions / max(self.elapsed, 1e-9)


# --------------------------------------------------------------------------------------------
# Trackers
# --------------------------------------------------------------------------------------------
def tracker_problem(setting: str) -> str | None:
    """Why ``train.tracker`` cannot be used here (with the fix), or None."""
    if setting not in TRACKERS:
        return f"train.tracker={setting!r} is unknown; choose one of {list(TRACKERS)}"
    available = {TENSORBOARD: is_tensorboard_available(), "wandb": is_wandb_available()}
    if setting in available and not available[setting]:
        return (
            f"train.tracker={setting} needs the {setting} package, which is not installed: "
            f"`pip install {setting}`, or choose another train.tracker ({list(TRACKERS)})"
        )
    return None


def log_with(setting: str) -> list[str] | None:
    """``Accelerator(log_with=...)`` for a ``train.tracker`` value (None: no tracker)."""
    problem = tracker_problem(setting)
    if problem is not None:
        raise ValueError(problem)
    return None if setting == "none" else [setting]


def project_config(output_dir: str | Path) -> ProjectConfiguration:
    """The run folder, with TensorBoard logs in ``<output_dir>/tensorboard``."""
    output_dir = Path(output_dir)
    return ProjectConfiguration(
        project_dir=str(output_dir), logging_dir=str(output_dir / TENSORBOARD_DIRNAME)
    )


def init_trackers(accelerator: Accelerator, output_dir: Path) -> None:
    """Start the configured trackers: project ``prompt-ris``, a wandb run named after the run
    folder and kept in it."""
    wandb = {"name": output_dir.resolve().name, "dir": str(output_dir)}
    accelerator.init_trackers(PROJECT_NAME, init_kwargs={"wandb": wandb})


def tensorboard_active(accelerator: Accelerator) -> bool:
    """Whether TensorBoard is one of the run's trackers (on this process)."""
    return any(tracker.name == TENSORBOARD for tracker in accelerator.trackers)


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
    if count <= 0 or not accelerator.is_main_process or not tensorboard_active(accelerator):
        return
    was_training = model.training
    model.eval()
    with accelerator.autocast():
        images, texts = overlay_panels(model, batch, with_sam, count)
    model.train(was_training)
    tracker = accelerator.get_tracker(TENSORBOARD)
    tracker.log_images({"val/overlays": images}, step=step, dataformats="NCHW")
    accelerator.log({"val/overlay_texts": " | ".join(texts)}, step=step)


# --------------------------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------------------------
def remaining_seconds(
    done: int, total: int, stage1_steps: int, seconds: dict[Stage, float], steps: dict[Stage, int]
) -> float | None:
    """Time left: the steps left in each stage times that stage's cost per step.

    Args:
        done: optimizer steps done (global).
        total: optimizer steps of the run.
        stage1_steps: global steps that belong to stage 1.
        seconds: measured training seconds per stage.
        steps: steps measured per stage.

    Returns:
        Seconds, or None before any step has been measured.
    """
    cost = {stage: seconds[stage] / steps[stage] for stage in Stage if steps[stage]}
    if Stage.FULL not in cost and Stage.COARSE in cost:
        cost[Stage.FULL] = STAGE2_STEP_COST * cost[Stage.COARSE]
    left = {
        Stage.COARSE: max(stage1_steps - done, 0),
        Stage.FULL: total - max(done, stage1_steps),
    }
    if any(left[stage] and stage not in cost for stage in Stage):
        return None
    return sum(left[stage] * cost[stage] for stage in Stage if left[stage])


class StageProgress(tqdm):
    """tqdm over optimizer steps whose ETA (``{eta}``) weights each stage by its cost per step.

    Args:
        stage1_steps: the run's global steps that belong to stage 1; later steps are stage 2.
        clock: time source (tests).
        *args, **kwargs: tqdm's.
    """

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{eta}, {rate_fmt}{postfix}]"

    def __init__(
        self,
        *args: Any,
        stage1_steps: int,
        clock: Callable[[], float] = _clock,
        **kwargs: Any,
    ) -> None:
        self.stage1_steps = stage1_steps
        self._clock = clock
        self.measured_seconds = dict.fromkeys(Stage, 0.0)
        self.measured_steps = dict.fromkeys(Stage, 0)
        self._last = clock()
        kwargs.setdefault("bar_format", self.BAR_FORMAT)
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        now = self._clock()
        stage = Stage.COARSE if self.n < self.stage1_steps else Stage.FULL  # the step just done
        self.measured_seconds[stage] += now - self._last
        self.measured_steps[stage] += int(n or 0)
        self._last = now
        return super().update(n)

    def unpause(self) -> None:
        """Leave the time since the last step (a validation, a save) out of the step costs."""
        self._last = self._clock()
        super().unpause()

    @property
    def eta_seconds(self) -> float | None:
        return remaining_seconds(
            int(self.n), int(self.total or 0), self.stage1_steps, self.measured_seconds,
            self.measured_steps,
        )  # fmt: skip

    @property
    def format_dict(self) -> dict[str, Any]:
        fields = super().format_dict
        eta = self.eta_seconds
        fields["eta"] = "?" if eta is None else self.format_interval(eta)
        return fields
