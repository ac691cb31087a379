"""Miniature SAM in the ambiguous world: scenes, click targets, the multimask loss and decode."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from prompt_ris.config import load_config
from prompt_ris.miniature.captions import ShapeSpec, paint_scene, sample_scene
from prompt_ris.miniature.sam_pretrain import (
    PROMPT_KINDS,
    SamPretrainConfig,
    bce_dice,
    bce_dice_each,
    click_targets,
    decode,
    decode_tokens,
    encode_prompts,
    make_sample,
    multimask_loss,
    pad_clicks,
    pretrain_sam,
    random_pixel,
)
from prompt_ris.miniature.synthetic import MIN_VISIBLE, SITUATIONS, shape_polygon
from prompt_ris.models.build import build_sam
from prompt_ris.models.frozen_sam import MULTIMASK_TOKENS
from repo_scripts import load_script

# sha256 of the first 30 flat specs of random.Random(11) and the first 3 paintings, and the loss
# of a 2-step pretraining (2 scenes a step), both from the code before the ambiguous world.
FLAT_SPECS_SHA256 = "6d691b92a9331c312f8123102f71c65ba9968db1ae7d41b803611256472db27c"
TWO_STEP_LOSS = 1.716426134109497


def _tiny_sam():
    torch.manual_seed(0)
    return build_sam(load_config({"model": {"preset": "tiny"}}).model.sam, None)


def _whole(obj: ShapeSpec, width: int, height: int) -> np.ndarray:
    """An object's whole (H, W) bool mask, hidden parts included."""
    poly = shape_polygon(obj.shape, obj.cx, obj.cy, obj.r)
    return mask_utils.decode(mask_utils.frPyObjects([poly], height, width))[..., 0] > 0


def test_flat_world_draws_the_same_scenes_as_before() -> None:
    rng, digest = random.Random(11), hashlib.sha256()
    for i in range(30):
        spec = sample_scene(rng)
        fields = [(o.shape, o.colour, o.cx, o.cy, o.r, o.tint) for o in spec.objects]
        digest.update(repr((spec.width, spec.height, spec.grey, spec.noise_seed, fields)).encode())
        assert all(o.situation == "apart" and o.group == -1 for o in spec.objects)
        if i < 3:
            pixels, masks = paint_scene(spec)
            digest.update(pixels.tobytes())
            for mask in masks:
                digest.update(mask.tobytes())
    assert digest.hexdigest() == FLAT_SPECS_SHA256


def test_single_mask_pretraining_is_unchanged() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference loss was summed on one thread
    cfg = SamPretrainConfig(steps=2, images_per_step=2, warmup_steps=1, log_every=1)
    assert cfg.world == "flat" and not cfg.multimask
    try:
        out = pretrain_sam(_tiny_sam(), cfg)
    finally:
        torch.set_num_threads(threads)
    assert abs(out["final_loss"] - TWO_STEP_LOSS) < 1e-4


def test_ambiguous_scenes_carry_situations_and_groups() -> None:
    rng = random.Random(5)
    seen: set[str] = set()
    for _ in range(40):
        spec = sample_scene(rng, world="ambiguous")
        _, masks = paint_scene(spec)
        situations = [o.situation for o in spec.objects]
        seen.update(situations)
        for obj, mask in zip(spec.objects, masks):
            raster = _whole(obj, spec.width, spec.height)
            assert mask.sum() >= MIN_VISIBLE * raster.sum() - 1
            assert (obj.group == -1) == (obj.situation == "apart")
        for group in {o.group for o in spec.objects} - {-1}:
            members = [o for o in spec.objects if o.group == group]
            assert len(members) == 2
            kinds = sorted(o.situation for o in members)
            assert kinds in (["touching", "touching"], ["inner", "outer"])
            if kinds == ["touching", "touching"]:
                assert members[0].colour == members[1].colour
                assert members[0].shape != members[1].shape
    assert seen == set(SITUATIONS)


def test_click_targets_contain_the_click_part_and_whole() -> None:
    rng = random.Random(6)
    grouped = 0
    for _ in range(15):
        sample = make_sample(sample_scene(rng, world="ambiguous"), 64)
        for k, mask in enumerate(sample.masks):
            for _ in range(5):
                pixel = random_pixel(mask, rng)
                targets = click_targets(sample, k, pixel)
                assert all(t[pixel[1], pixel[0]] for t in targets)
                assert targets[0] is mask
                if sample.groups[k] == -1:
                    assert len(targets) == 1
                    continue
                grouped += 1
                (whole,) = targets[1:]
                members = [m for m, g in zip(sample.masks, sample.groups) if g == sample.groups[k]]
                assert len(members) == 2
                np.testing.assert_array_equal(whole, members[0] | members[1])
                assert whole.sum() > mask.sum()
    assert grouped > 0


def test_multimask_loss_is_the_lowest_of_the_three_outputs() -> None:
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()  # (N, 1, h, w)
    logits = torch.randn(2, 3, 8, 8)
    logits[0, 1] = 6.0 * (2 * target[0, 0] - 1)  # row 0: output 1 fits
    logits[1, 2] = 6.0 * (2 * target[1, 0] - 1)  # row 1: output 2 fits
    logits.requires_grad_(True)
    each = torch.tensor(
        [[bce_dice(logits[n : n + 1, m : m + 1], target[n : n + 1]).item() for m in range(3)]
         for n in range(2)]
    )  # fmt: skip
    torch.testing.assert_close(bce_dice_each(logits, target).detach(), each)
    assert each[0].argmin() == 1 and each[1].argmin() == 2
    loss = multimask_loss(logits, target)
    torch.testing.assert_close(loss.detach(), (each[0, 1] + each[1, 2]) / 2)
    loss.backward()
    touched = logits.grad.abs().sum((2, 3)) > 0  # (N, 3): only the chosen outputs learn
    assert touched.tolist() == [[False, True, False], [False, False, True]]


def test_multimask_decode_equals_sam_mask_decoder() -> None:
    sam = _tiny_sam().eval()
    size = sam.image_encoder.img_size
    points = torch.tensor([[10.0, 20.0], [100.0, 50.0]])
    boxes = torch.tensor([[5.0, 5.0, 60.0, 80.0]]).expand(2, 4)
    masks = torch.randn(2, 1, size // 4, size // 4)
    clicks = pad_clicks([[(1.0, 2.0, 1)], [(3.0, 4.0, 1), (5.0, 6.0, 0)]])
    with torch.no_grad():
        embedding = sam.image_encoder(torch.randn(1, 3, size, size))  # (1, C, h, w)
        for kind in PROMPT_KINDS:
            sparse, dense = encode_prompts(sam, kind, points, boxes, masks, clicks)
            embeddings = embedding.expand(2, -1, -1, -1)
            ours = decode_tokens(sam, embeddings, sparse, dense)
            upstream = sam.mask_decoder(
                embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, True
            )
            assert ours[0].shape == (2, len(MULTIMASK_TOKENS), size // 4, size // 4)
            for a, b in zip(ours, upstream):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            first = decode_tokens(sam, embeddings, sparse, dense, (0,))
            for a, b in zip(first, decode(sam, embeddings, sparse, dense)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_quick_ambiguous_multimask_run_writes_loadable_files(tmp_path: Path) -> None:
    script = load_script("scripts/pretrain_foundations.py")
    argv = ["--quick", "--only", "sam", "--world", "ambiguous", "--sam-multimask"]
    result = script.main([*argv, "--out", str(tmp_path)])
    sam = build_sam(
        load_config({"model": {"preset": "tiny"}}).model.sam,
        str(tmp_path / "sam_tiny_synthetic.pth"),
    )
    for key, value in result.sam.state_dict().items():
        torch.testing.assert_close(sam.state_dict()[key], value.half().float(), rtol=0, atol=0)
    report = json.loads((tmp_path / "report_sam.json").read_text())["sam"]
    assert report["settings"]["world"] == "ambiguous" and report["settings"]["multimask"]
    assert {"point", "point_best_of_3", "box"} <= set(report["miou"])
    ambiguous = report["miou_ambiguous"]
    assert {"point/apart", "point_best_of_3/apart", "objects/apart"} <= set(ambiguous)
    assert "ambiguous world" in (tmp_path / "report_sam.md").read_text()
