"""The global batch over any launch and the two epoch readings (data/schedule.py, the sampler)."""

from __future__ import annotations

import math

import pytest

from prompt_ris.config import ConfigError, DataConfig, config_from_dict, load_config
from prompt_ris.data.loader import ImageGroup, TrainBatchSampler
from prompt_ris.data.schedule import (
    StepPlan,
    TrainSetSize,
    combined_train_size_bounds,
    draws_per_image,
    plan_steps,
    steps_per_epoch,
)


def _plan(processes: int, images: int = 16, micro: int | None = None) -> StepPlan:
    return plan_steps(DataConfig(images_per_step=images, images_per_process=micro), processes)


# --------------------------------------------------------------------------------------------
# The step plan
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("processes", "micro", "expected"),
    [(1, None, (16, 1)), (2, None, (8, 1)), (8, None, (2, 1)), (16, None, (1, 1)),
     (1, 8, (8, 2)), (1, 1, (1, 16)), (2, 4, (4, 2)), (4, 2, (2, 2))],
)  # fmt: skip
def test_plan_spreads_the_papers_16_images_over_the_launch(
    processes: int, micro: int | None, expected: tuple[int, int]
) -> None:
    plan = _plan(processes, micro=micro)
    assert (plan.images_per_process, plan.accumulation) == expected
    assert plan.num_processes * plan.images_per_process * plan.accumulation == 16
    assert plan.expressions_per_step == 64  # B = 16 x 4 on any launch
    assert plan.describe().startswith("16 images x 4 expressions per optimizer step = ")


def test_plan_refuses_what_does_not_divide_in_one_line_that_names_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        _plan(3)
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        "data.images_per_step=16 does not split over 3 processes; launch 1, 2, 4, 8 or 16 "
        "processes, or set data.images_per_step to a multiple of 3"
    )
    with pytest.raises(ConfigError, match=r"choose data.images_per_process from 1, 2, 4 or 8$"):
        _plan(2, micro=3)
    with pytest.raises(ConfigError, match="must be >= 1"):
        _plan(1, images=0)


def test_the_batch_is_set_by_images_per_step_and_images_per_process_only() -> None:
    # Any other batch key is an unknown key, named with the nearest one.
    nearest = r"^unknown config key 'data.images_per_batch'; did you mean 'data.images_per_step'\?$"
    with pytest.raises(ConfigError, match=nearest):
        load_config(overrides=["data.images_per_batch=8"])
    no_hint = r"^unknown config key 'train.gradient_accumulation_steps'$"
    with pytest.raises(ConfigError, match=no_hint):
        load_config(overrides=["train.gradient_accumulation_steps=2"])
    # A saved config (an export's config.json) holding them loads, warning, with the defaults.
    saved = {"data": {"images_per_batch": 8}, "train": {"gradient_accumulation_steps": 2}}
    with pytest.warns(UserWarning) as caught:
        cfg = config_from_dict(saved)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "unknown config key 'data.images_per_batch'" in messages[0]
    assert "unknown config key 'train.gradient_accumulation_steps'; ignored" in messages[1]
    assert cfg.data.images_per_step == 16 and cfg.data.images_per_process is None


# --------------------------------------------------------------------------------------------
# The sampler: the same images in the same steps on any launch
# --------------------------------------------------------------------------------------------
def _groups(counts: list[int]) -> list[ImageGroup]:
    """Image k with counts[k] expressions, each in its own row."""
    return [
        ImageGroup(f"img{k}.png", [k], [(k, s) for s in range(n)]) for k, n in enumerate(counts)
    ]


def _steps(groups: list[ImageGroup], processes: int, micro: int, **kwargs: object) -> list:
    """Per optimizer step, the sorted requests of all processes together."""
    samplers = [
        TrainBatchSampler(
            groups,
            images_per_batch=micro,
            expressions_per_image=4,
            num_replicas=processes,
            rank=rank,
            seed=3,
            images_per_step=16,
            **kwargs,
        )  # fmt: skip
        for rank in range(processes)
    ]
    for sampler in samplers:
        sampler.set_epoch(2)
    accumulation = samplers[0].accumulation
    assert all(len(s) == samplers[0].steps_per_epoch * accumulation for s in samplers)
    per_rank = [list(s) for s in samplers]
    steps = []
    for step in range(samplers[0].steps_per_epoch):
        requests = [
            request
            for batches in per_rank
            for batch in batches[step * accumulation : (step + 1) * accumulation]
            for request in batch
        ]
        assert len(requests) == 16
        steps.append(sorted(requests, key=repr))
    return steps


@pytest.mark.parametrize("unit", ["images", "expressions"])
def test_steps_hold_the_same_draws_whatever_the_processes_and_micro_batches(unit: str) -> None:
    counts = [1 + (7 * k) % 9 for k in range(37)]  # 37 images of 1..9 expressions
    groups = _groups(counts)
    reference = _steps(groups, processes=1, micro=16, epoch_unit=unit)
    draws = 37 if unit == "images" else sum(math.ceil(n / 4) for n in counts)  # 37 or 61
    assert len(reference) == draws // 16 == 2 + (unit == "expressions")
    for processes, micro in ((2, 8), (1, 8), (2, 4), (4, 1), (8, 2)):
        assert _steps(groups, processes, micro, epoch_unit=unit) == reference, (processes, micro)
    ranks = [  # the processes' draws are disjoint
        {(r.group, r.expressions) for batch in sampler for r in batch}
        for sampler in (
            TrainBatchSampler(
                groups,
                images_per_batch=8,
                expressions_per_image=4,
                num_replicas=2,
                rank=rank,
                seed=3,
                epoch_unit=unit,
            )  # fmt: skip
            for rank in range(2)
        )
    ]
    assert not ranks[0] & ranks[1]


# --------------------------------------------------------------------------------------------
# Epoch readings
# --------------------------------------------------------------------------------------------
def test_draws_per_image_under_each_reading() -> None:
    assert [draws_per_image(n, 4, "images") for n in (1, 4, 5, 12)] == [1, 1, 1, 1]
    assert [draws_per_image(n, 4, "expressions") for n in (1, 4, 5, 8, 9, 12)] == [1, 1, 2, 2, 3, 3]
    assert steps_per_epoch([1, 4, 5, 9], 4, 2, "images") == 2  # 4 draws // 2
    assert steps_per_epoch([1, 4, 5, 9], 4, 2, "expressions") == 3  # 1 + 1 + 2 + 3 = 7 // 2
    with pytest.raises(ConfigError, match="choose one of"):
        draws_per_image(3, 4, "sentences")


def test_an_expression_epoch_draws_every_expression_and_draw_0_is_the_image_epochs() -> None:
    counts = [2, 4, 5, 9, 12, 3, 7, 1, 8, 6, 10, 4, 5, 11, 2, 9, 1, 3]
    groups = _groups(counts)
    kwargs = {"images_per_batch": 3, "expressions_per_image": 4, "seed": 1, "images_per_step": 3}
    by_images = TrainBatchSampler(groups, **kwargs)
    by_exprs = TrainBatchSampler(groups, epoch_unit="expressions", **kwargs)
    draws = sum(math.ceil(n / 4) for n in counts)
    assert draws == 33 and len(by_exprs.draws) == 33 and by_exprs.steps_per_epoch == 11
    assert by_images.steps_per_epoch == 18 // 3
    for epoch in (0, 5):
        by_exprs.set_epoch(epoch)
        by_images.set_epoch(epoch)
        for group, n in enumerate(counts):
            picks = [by_exprs._request(group, k) for k in range(math.ceil(n / 4))]
            drawn = [(e.row, e.sentence) for p in picks for e in p.expressions]
            for request in picks:  # b per draw, no expression twice in a draw
                real = [e for e in request.expressions if e.mask_seed is None]
                assert len(request.expressions) == 4 and len(set(real)) == len(real)
            assert set(drawn) == set(groups[group].expressions)  # every expression drawn ...
            assert len(drawn) - len(set(drawn)) == (-n) % 4  # ... and only the fill repeats one
            assert picks[0] == by_images._request(group)  # draw 0 is the images reading's draw
        # A whole epoch (33 draws = 11 steps of 3, nothing left over) draws every expression,
        # each image ceil(n / b) times.
        requests = [r for batch in by_exprs for r in batch]
        seen = {(e.row, e.sentence) for r in requests for e in r.expressions}
        assert seen == {e for g in groups for e in g.expressions}
        times = [sum(r.group == group for r in requests) for group in range(len(counts))]
        assert times == [math.ceil(n / 4) for n in counts]


# --------------------------------------------------------------------------------------------
# The combined training set from the published sizes (docs/design.md, "Training")
# --------------------------------------------------------------------------------------------
def test_combined_set_bounds_from_the_published_split_sizes() -> None:
    smallest, largest = combined_train_size_bounds()
    assert (largest.images, largest.expressions) == (16994 + 21899, 120624 + 120191 + 80512)
    assert smallest.images == 21899 - 3000 - 4650 == 14249
    kept_coco = 16994 - 3900 - 4650  # 8,444 RefCOCO/+ train images outside G-Ref val/test
    expected = 120624 * kept_coco / 16994 + 120191 * kept_coco / 16992 + 80512 * 14249 / 21899
    assert smallest.expressions == round(expected) == 172050
    # Steps per epoch of 16 images x 4 expressions.
    assert largest.steps_range(4, 16, "images") == (38893 // 16,) * 2 == (2430, 2430)
    assert smallest.steps_range(4, 16, "images") == (890, 890)
    assert largest.steps_range(4, 16, "expressions") == (80332 // 16, 109501 // 16)
    assert largest.draws_range(4, "expressions") == (
        math.ceil(321327 / 4),
        (321327 + 3 * 38893) // 4,
    )
    assert TrainSetSize("x", images=10, expressions=10).draws_range(4, "expressions") == (10, 10)
