"""The paper's batch on any launch, and what an epoch is (docs/design.md, "Training").

**Batch.** The paper trains with 16 images x b = 4 expressions (B = 64) per optimizer step. The
config states that *global* batch: ``data.images_per_step`` (I) images of
``data.expressions_per_image`` (b) expressions per optimizer step, whatever the number of
processes P. Each process runs micro-batches of ``data.images_per_process`` (m) images, by
default I / P, and accumulates the gradients of a = I / (P x m) of them before a step.
:func:`plan_steps` is the one place where (I, P, m) become (m, a); it refuses, in one line that
names the fix, a launch the batch does not divide over. The number of optimizer steps, the lr
schedule and the images of every step are then the same on 1 process or on 8.

**Epoch.** The paper trains "50 epochs" without saying of what. ``train.epoch_unit`` chooses:

- ``images`` (default): every training image is drawn once per epoch, with b of its
  expressions (a random b when it has more; all of them plus word-masked resamples when fewer).
- ``expressions``: every expression is drawn at least once per epoch. The expressions of an image
  with n of them are shuffled once per epoch and cut into ceil(n / b) draws of b; a short last
  draw is completed with the first expressions of the shuffled order (so a draw never holds the
  same expression twice); an image with n <= b gives one draw, exactly as under ``images``.
  Draw 0 of an image is always the ``images`` reading's draw.

The draws of an epoch (one per image, or ceil(n / b) per image) are permuted with the
(seed, epoch) generator and cut into steps of I draws; the last draws that do not fill a step
(fewer than I) sit that epoch out, so every step has exactly I images on any launch. Steps per
epoch = floor(draws / I).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from prompt_ris.config import ConfigError, DataConfig
from prompt_ris.data.splits import PAPER_HELDOUT_SPLITS, PAPER_TRAIN_SOURCES, PUBLISHED_COUNTS

EPOCH_UNITS = ("images", "expressions")


@dataclass(frozen=True)
class StepPlan:
    """How one optimizer step of I images x b expressions is spread over the launch."""

    images_per_step: int  # I, over all processes
    expressions_per_image: int  # b
    num_processes: int  # P
    images_per_process: int  # m, per process and forward (micro-batch)
    accumulation: int  # a = I / (P x m) micro-batches per process and optimizer step

    @property
    def expressions_per_step(self) -> int:
        """B = I x b."""
        return self.images_per_step * self.expressions_per_image

    def describe(self) -> str:
        """One log line, e.g. ``16 images x 4 expressions per step = 2 processes x 8 images x 1
        accumulated``."""
        return (
            f"{self.images_per_step} images x {self.expressions_per_image} expressions per "
            f"optimizer step = {self.num_processes} process(es) x {self.images_per_process} "
            f"images per micro-batch x {self.accumulation} accumulated"
        )


def _divisors(n: int) -> str:
    """The divisors of n as words: ``1, 2, 4, 8 or 16``."""
    found = [str(d) for d in range(1, n + 1) if n % d == 0]
    return found[0] if len(found) == 1 else f"{', '.join(found[:-1])} or {found[-1]}"


def plan_steps(data: DataConfig, num_processes: int) -> StepPlan:
    """Spread ``data.images_per_step`` over ``num_processes`` (module docstring).

    Args:
        data: the data section (``images_per_step``, ``images_per_process``,
            ``expressions_per_image``).
        num_processes: P, as launched (``accelerator.num_processes``).

    Returns:
        The plan: micro-batch m per process and accumulation a, with P x m x a = I.

    Raises:
        ConfigError: I does not split over P processes, or not into micro-batches of m.
    """
    images, micro, b = data.images_per_step, data.images_per_process, data.expressions_per_image
    if images < 1 or b < 1 or (micro is not None and micro < 1):
        raise ConfigError(
            f"data.images_per_step={images}, data.images_per_process={micro} and "
            f"data.expressions_per_image={b} must be >= 1 (paper: 16, null and 4)"
        )
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1")
    if images % num_processes:
        fits = _divisors(images)
        raise ConfigError(
            f"data.images_per_step={images} does not split over {num_processes} processes; "
            f"launch {fits} processes, or set data.images_per_step to a multiple of "
            f"{num_processes}"
        )
    share = images // num_processes  # images per process and step
    if micro is None:
        micro = share
    if share % micro:
        fits = _divisors(share)
        raise ConfigError(
            f"data.images_per_process={micro} does not divide the {share} images each of "
            f"{num_processes} process(es) gets per step (data.images_per_step={images}); "
            f"choose data.images_per_process from {fits}"
        )
    return StepPlan(images, b, num_processes, micro, share // micro)


def check_epoch_unit(unit: str) -> None:
    """Refuse an unknown ``train.epoch_unit``."""
    if unit not in EPOCH_UNITS:
        raise ConfigError(f"train.epoch_unit={unit!r}; choose one of {list(EPOCH_UNITS)}")


def draws_per_image(num_expressions: int, expressions_per_image: int, unit: str) -> int:
    """How often an image with ``num_expressions`` (>= 1) is drawn per epoch.

    1 under ``images``; ceil(n / b) under ``expressions``.
    """
    check_epoch_unit(unit)
    if unit == "images":
        return 1
    return max(1, math.ceil(num_expressions / expressions_per_image))


def steps_per_epoch(
    expression_counts: Sequence[int], expressions_per_image: int, images_per_step: int, unit: str
) -> int:
    """Optimizer steps of one epoch: floor(draws / I) for images with these expression counts."""
    draws = sum(draws_per_image(n, expressions_per_image, unit) for n in expression_counts)
    return draws // images_per_step


# --------------------------------------------------------------------------------------------
# The combined training set from the published split sizes (docs/design.md, "Training")
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSetSize:
    """Images and expressions of a training set, and what an epoch of it is in steps."""

    name: str
    images: int
    expressions: int

    def draws_range(self, expressions_per_image: int, unit: str) -> tuple[int, int]:
        """Bounds on the draws of an epoch when only the totals are known.

        Under ``expressions`` an image with n expressions gives ceil(n / b) draws, between n / b
        and (n + b - 1) / b, so the epoch has between ceil(S / b) and floor((S + (b - 1) N) / b)
        draws for N images and S expressions.
        """
        check_epoch_unit(unit)
        if unit == "images":
            return self.images, self.images
        b = expressions_per_image
        low = max(-(-self.expressions // b), self.images)  # and at least one per image
        high = (self.expressions + (b - 1) * self.images) // b
        return low, min(high, self.expressions)

    def steps_range(
        self, expressions_per_image: int, images_per_step: int, unit: str
    ) -> tuple[int, int]:
        """Bounds on the optimizer steps of one epoch (``draws_range`` // I)."""
        low, high = self.draws_range(expressions_per_image, unit)
        return low // images_per_step, high // images_per_step


def combined_train_size_bounds() -> tuple[TrainSetSize, TrainSetSize]:
    """The smallest and largest combined training set the published split sizes allow.

    The union of the three datasets' train images, minus every val/test image, is not
    published. Assumption: RefCOCO and RefCOCO+ (unc) share their images and their partition
    (16,994 vs 16,992 train images; 1,500 / 750 / 750 in val / testA / testB for both), so their
    train images count once. Then:

    - **largest**: no G-Ref (umd) train image is a RefCOCO image and none of either is in
      another dataset's val/test split: 16,994 + 21,899 images, every train expression kept.
    - **smallest**: every held-out image of the others (RefCOCO/+ val and test, G-Ref google
      val) is a G-Ref (umd) train image and removed from it, and every RefCOCO/+ train image
      left is a G-Ref image too: 21,899 - 3,000 - 4,650 images. Expressions: the kept share of
      each dataset's train images times its train expressions (removed images taken to carry
      the average number).

    Returns:
        (smallest, largest).
    """
    (refcoco, refcoco_plus, gref), counts = PAPER_TRAIN_SOURCES, PUBLISHED_COUNTS
    coco_images = counts[refcoco]["train"][1]  # RefCOCO and RefCOCO+ share their images
    gref_images = counts[gref]["train"][1]
    sentences = {key: counts[key]["train"][2] for key in PAPER_TRAIN_SOURCES}
    largest = TrainSetSize("largest", coco_images + gref_images, sum(sentences.values()))

    def heldout_images(key: tuple[str, str]) -> int:
        return sum(counts[key][split][1] for split in PAPER_HELDOUT_SPLITS[key])

    coco_heldout = heldout_images(refcoco)  # the same 3,000 images as RefCOCO+'s
    gref_heldout = heldout_images(gref) + heldout_images(("refcocog", "google"))
    gref_kept = gref_images - coco_heldout - heldout_images(("refcocog", "google"))
    coco_kept = coco_images - gref_heldout
    kept_sentences = (
        sentences[refcoco] * coco_kept / counts[refcoco]["train"][1]
        + sentences[refcoco_plus] * coco_kept / counts[refcoco_plus]["train"][1]
        + sentences[gref] * gref_kept / gref_images
    )
    smallest = TrainSetSize("smallest", max(gref_kept, coco_kept), round(kept_sentences))
    return smallest, largest
