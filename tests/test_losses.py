"""Losses against values worked out by hand on 2x2 / 4x4 masks (eqs. 7-9)."""

from __future__ import annotations

import math

import pytest
import torch

from prompt_ris.data.batch import Batch
from prompt_ris.losses import (
    ICL_EPS,
    Stage,
    bce_dice_loss,
    dice_loss,
    hard_iou,
    instance_contrastive_loss,
    stage_loss,
    text_grounding_loss,
)
from prompt_ris.models import PromptRISOutput

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25
BIG = 200.0  # sigmoid(+-200) is exactly 1 / 0 in float32


def _masks(*rows: list[float]) -> torch.Tensor:
    """Flat 4-value rows -> (B, 1, 2, 2)."""
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 1, 2, 2)


def test_bce_dice_matches_hand_values() -> None:
    logits = _masks([0.0, LN3, -LN3, 0.0])  # p = .5, .75, .25, .5
    target = _masks([1.0, 1.0, 0.0, 0.0])
    bce = -(math.log(0.5) + math.log(0.75) + math.log(0.75) + math.log(0.5)) / 4
    inter = 0.5 + 0.75
    denom = 0.25 + 0.5625 + 0.0625 + 0.25 + 2.0
    dice = 1 - (2 * inter + 1) / (denom + 1)
    assert bce_dice_loss(logits, target).item() == pytest.approx(bce + dice, abs=1e-6)


def test_dice_plain_sums_form_matches_hand_values() -> None:
    logits = _masks([0.0, LN3, -LN3, 0.0], [BIG, BIG, -BIG, -BIG])  # p = .5 .75 .25 .5; 1 1 0 0
    target = _masks([1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0])
    first = 1 - (2 * (0.5 + 0.75) + 1) / ((0.5 + 0.75 + 0.25 + 0.5) + 2.0 + 1)
    perfect = 1 - (2 * 2 + 1) / (2 + 2 + 1)  # 0
    plain = dice_loss(logits, target, squared=False).item()
    assert plain == pytest.approx((first + perfect) / 2, abs=1e-6)
    squared = 1 - (2 * (0.5 + 0.75) + 1) / ((0.25 + 0.5625 + 0.0625 + 0.25) + 2.0 + 1)
    assert dice_loss(logits, target).item() == pytest.approx((squared + perfect) / 2, abs=1e-6)


def test_bce_dice_resizes_target_by_area() -> None:
    logits = _masks([0.3, -1.0, 2.0, 0.0])
    big = torch.zeros(1, 1, 4, 4)
    big[0, 0, 0, 0] = 1.0  # top-left block mean 0.25
    big[0, 0, 2:, 2:] = 1.0  # bottom-right block mean 1
    small = _masks([0.25, 0.0, 0.0, 1.0])
    assert bce_dice_loss(logits, big).item() == pytest.approx(
        bce_dice_loss(logits, small).item(), abs=1e-6
    )


def test_bce_dice_mean_over_masks() -> None:
    a, b = _masks([0.0, LN3, -LN3, 0.0]), _masks([1.0, -2.0, 0.5, 3.0])
    ta, tb = _masks([1.0, 1.0, 0.0, 0.0]), _masks([0.0, 1.0, 1.0, 0.0])
    both = bce_dice_loss(torch.cat([a, b]), torch.cat([ta, tb])).item()
    assert both == pytest.approx((bce_dice_loss(a, ta).item() + bce_dice_loss(b, tb).item()) / 2)


def test_hard_iou_values() -> None:
    logits = _masks([1.0, 1.0, -1.0, -1.0], [-1.0, -1.0, 1.0, 1.0], [-1.0] * 4, [0.0] * 4)
    target = _masks([1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0], [0.0] * 4, [0.6, 0.4, 0, 0])
    # 1; I=2, U=3; empty vs empty = 1; logit 0 is probability 0.5, not foreground -> I=0, U=1
    expected = torch.tensor([1.0, 2.0 / 3.0, 1.0, 0.0])
    assert torch.allclose(hard_iou(logits, target), expected)


# Two masks of one image: S1 = (.75,.75,.25,.25), S2 = (.25,.25,.75,.75).
# sum S^2 = 1.25 each, S1.S2 = .75, so O12 = 1.5 / 2.5 = 0.6 and O11 = O22 = 1 -> 1 - eps.
S1 = [LN3, LN3, -LN3, -LN3]
S2 = [-LN3, -LN3, LN3, LN3]
LOG_DIAG = math.log(1 - ICL_EPS)


@pytest.mark.parametrize(
    "ids, gt2, expected",
    [
        ([7, 8], [0, 0, 1, 1], -(2 * LOG_DIAG + 2 * math.log(0.4)) / 4),  # different objects
        ([7, 7], [0, 0, 1, 1], -(2 * LOG_DIAG + 2 * math.log(0.6)) / 4),  # same object
        ([7, 8], [1, 1, 0, 0], -(LOG_DIAG + math.log(0.4)) / 4),  # mask 2 wrong: w2 = 0
        ([7, 8], [0, 1, 1, 1], -(1 + 2 / 3) * (LOG_DIAG + math.log(0.4)) / 4),  # w2 = 2/3
    ],
)
def test_icl_loss_matches_eq7_by_hand(ids: list[int], gt2: list[float], expected: float) -> None:
    loss = instance_contrastive_loss(
        _masks(S1, S2), torch.tensor(ids), torch.tensor([0, 0]), _masks([1, 1, 0, 0], gt2)
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_icl_averages_over_images_of_different_b() -> None:
    # Image 0: three masks (S1, S2, S1), ids (1, 2, 1); all predictions exact -> w = 1.
    # O = [[1, .6, 1], [.6, 1, .6], [1, .6, 1]], Y = [[1,0,1],[0,1,0],[1,0,1]].
    # Image 1: one mask, loss = -log(1 - eps) (its diagonal).
    logits = _masks(S1, S2, S1, S1)
    target = _masks([1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0])
    loss = instance_contrastive_loss(
        logits, torch.tensor([1, 2, 1, 5]), torch.tensor([0, 0, 0, 1]), target
    )
    image0 = -(5 * LOG_DIAG + 4 * math.log(0.4)) / 9
    image1 = -LOG_DIAG
    assert loss.item() == pytest.approx((image0 + image1) / 2, abs=1e-6)


def test_icl_clamps_disjoint_and_empty_masks() -> None:
    # Exact binary masks: O12 = 0 is clamped to eps; mask 3 is all zeros (0/0 overlap -> eps).
    a = [BIG, BIG, -BIG, -BIG]
    b = [-BIG, -BIG, BIG, BIG]
    logits = _masks(a, b, [-BIG] * 4).requires_grad_()
    target = _masks([1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0])
    loss = instance_contrastive_loss(
        logits, torch.tensor([3, 3, 4]), torch.tensor([0, 0, 0]), target
    )
    # Y = [[1,1,0],[1,1,0],[0,0,1]], w = 1 (mask 3 empty vs empty).
    # O: diag 1,1 (-> 1-eps) and O33 = 0/0 (-> eps); O12 = 0 (-> eps); O13 = O23 = 0 (-> eps).
    log_eps, log_1m = math.log(ICL_EPS), LOG_DIAG
    expected = -(2 * log_1m + 2 * log_eps + log_eps + 4 * log_1m) / 9
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_icl_gradient_treats_w_as_constant() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 2, 2, requires_grad=True)
    target = (torch.rand(3, 1, 2, 2) > 0.5).float()
    ids = torch.tensor([0, 0, 1])
    instance_contrastive_loss(logits, ids, torch.zeros(3, dtype=torch.long), target).backward()

    # Independent eq. (8) with w given as plain numbers computed by hand from the same masks.
    x = logits.detach().clone().requires_grad_()
    pred, gt = (x.detach() > 0).flatten(1), target.flatten(1) > 0.5
    w = [
        float((pred[i] & gt[i]).sum()) / max(float((pred[i] | gt[i]).sum()), 1.0)
        if (pred[i] | gt[i]).any()
        else 1.0
        for i in range(3)
    ]
    s = x.sigmoid().flatten(1)
    total = 0.0
    for i in range(3):
        for j in range(3):
            o = 2 * (s[i] * s[j]).sum() / (s[i].pow(2).sum() + s[j].pow(2).sum())
            o = o.clamp(ICL_EPS, 1 - ICL_EPS)
            y = float(ids[i] == ids[j])
            total = total - w[i] * (y * o.log() + (1 - y) * (1 - o).log())
    (total / 9).backward()
    assert torch.allclose(logits.grad, x.grad, atol=1e-6)


def test_icl_is_float32_under_bf16_autocast() -> None:
    torch.manual_seed(1)
    logits, target = torch.randn(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.5).float()
    args = (torch.tensor([0, 1, 0, 2]), torch.tensor([0, 0, 1, 1]), target)
    reference = instance_contrastive_loss(logits, *args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = instance_contrastive_loss(logits.bfloat16(), *args)
    expected = instance_contrastive_loss(logits.bfloat16().float(), *args)  # same rounded input
    assert mixed.dtype == torch.float32 and torch.equal(mixed, expected)
    assert mixed.item() == pytest.approx(reference.item(), rel=1e-2)


def test_icl_weight_has_no_gradient() -> None:
    logits = torch.randn(2, 1, 2, 2, requires_grad=True)
    assert not hard_iou(logits, torch.ones(2, 1, 2, 2)).requires_grad


def _stage_inputs(with_sam: bool) -> tuple[PromptRISOutput, Batch]:
    gt = torch.zeros(2, 1, 4, 4)
    gt[:, :, :2] = 1.0  # top half, the same object region for both expressions
    out = PromptRISOutput(
        coarse_logits=torch.full((2, 1, 1, 1), LN3),  # S'_C on a 1 x 1 CLIP grid
        coarse_lowres=torch.full((2, 1, 4, 4), LN3),  # S_C: p = .75 everywhere
        mask_logits=(gt * 2 - 1) * BIG if with_sam else None,  # perfect final masks
        text_global=torch.zeros(2, 8),
    )
    batch = Batch(
        clip_images=torch.zeros(1, 3, 4, 4),
        sam_images=torch.zeros(1, 3, 16, 16),
        text_tokens=torch.zeros(2, 5, dtype=torch.long),
        image_index=torch.tensor([0, 0]),
        object_ids=torch.tensor([1, 2]),
        gt_masks=gt,
        input_sizes=torch.tensor([[16, 16]]),
        orig_sizes=torch.tensor([[16, 16]]),
        texts=["a", "b"],
        ref_ids=torch.tensor([1, 2]),
        sent_ids=torch.tensor([1, 2]),
        image_ids=torch.tensor([0, 0]),
        category_ids=torch.tensor([1, 1]),
        word_masked=torch.zeros(2, dtype=torch.bool),
    )
    return out, batch


def test_stage1_loss_by_hand() -> None:
    out, batch = _stage_inputs(with_sam=False)
    total, terms = stage_loss(out, batch, stage=Stage.COARSE, icl_weight=0.5)
    clipseg = -(math.log(0.75) + math.log(0.25)) / 2 + 1 - (2 * 6 + 1) / (16 * 0.5625 + 8 + 1)
    # Both coarse masks are uniform .75: O = 1 -> 1 - eps everywhere; w = IoU(all, half) = .5.
    icl = -(2 * 0.5 * LOG_DIAG + 2 * 0.5 * math.log(ICL_EPS)) / 4
    assert set(terms) == {"clipseg", "icl_coarse", "total"}
    assert float(terms["clipseg"]) == pytest.approx(clipseg, abs=1e-6)
    assert float(terms["icl_coarse"]) == pytest.approx(0.5 * icl, rel=1e-5)
    assert total.item() == pytest.approx(clipseg + 0.5 * icl, rel=1e-5)


def test_stage2_loss_adds_sam_terms() -> None:
    out, batch = _stage_inputs(with_sam=True)
    total, terms = stage_loss(out, batch, stage=Stage.FULL)
    assert set(terms) == {"clipseg", "icl_coarse", "samseg", "icl_final", "total"}
    assert float(terms["samseg"]) == pytest.approx(0.0, abs=1e-6)  # perfect final masks
    # Final masks identical and exact, ids differ: O12 = 1 -> 1 - eps with Y = 0; w = 1.
    icl_final = -(2 * LOG_DIAG + 2 * math.log(ICL_EPS)) / 4
    assert float(terms["icl_final"]) == pytest.approx(icl_final, rel=1e-5)
    assert total.item() == pytest.approx(
        float(terms["clipseg"] + terms["icl_coarse"] + terms["samseg"] + terms["icl_final"]),
        rel=1e-6,
    )


def test_coarse_terms_read_the_lowres_coarse_mask() -> None:
    """The coarse terms use S_C (``coarse_lowres``); the CLIP-grid logits are not read."""
    out, batch = _stage_inputs(with_sam=False)
    total, terms = stage_loss(out, batch, stage=Stage.COARSE)
    out.coarse_logits = torch.full((2, 1, 1, 1), -BIG)  # changes nothing
    again, _ = stage_loss(out, batch, stage=Stage.COARSE)
    assert torch.equal(total, again)
    out.coarse_lowres = (batch.gt_masks * 2 - 1) * BIG  # a perfect S_C: no segmentation loss
    _, perfect = stage_loss(out, batch, stage=Stage.COARSE)
    assert float(perfect["clipseg"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["clipseg"]) > 0.5


def test_stage2_without_sam_output_says_how_to_fix() -> None:
    out, batch = _stage_inputs(with_sam=False)
    with pytest.raises(ValueError, match="with_sam=True"):
        stage_loss(out, batch, stage=Stage.FULL)


def test_text_grounding_loss_by_hand() -> None:
    """On a 2 x 2 grid with the referent in one cell: a token looking only there costs 0, an even
    look log 4; padded tokens are left out whatever they look at."""
    gt = torch.zeros(1, 1, 4, 4)
    gt[..., :2, :2] = 1.0  # the top-left cell of the 2 x 2 grid
    on, even, elsewhere = [1.0, 0.0, 0.0, 0.0], [0.25] * 4, [0.0, 1.0, 0.0, 0.0]
    attention = torch.tensor([[[on, even, elsewhere]]])  # (B=1, blocks=1, L=3, hw=4)
    pad = torch.tensor([[False, False, True]])
    loss = text_grounding_loss(attention, pad, gt)
    assert float(loss) == pytest.approx(math.log(4) / 2, rel=1e-6)  # (0 + log 4) / 2 tokens
    two_blocks = torch.cat([attention, torch.tensor([[[on, on, on]]])], 1)  # (1, 2, 3, 4)
    assert float(text_grounding_loss(two_blocks, pad, gt)) == pytest.approx(math.log(4) / 4)
    with pytest.raises(ValueError, match="square grid"):
        text_grounding_loss(torch.full((1, 1, 3, 6), 1 / 6), pad, gt)


def test_stage2_adds_the_text_grounding_term_only_when_weighted() -> None:
    out, batch = _stage_inputs(with_sam=True)
    with pytest.raises(ValueError, match="text_attention=True"):
        stage_loss(out, batch, stage=Stage.FULL, text_grounding_weight=1.0)
    out.text_attention = torch.full((2, 2, 5, 4), 0.25)  # (B, blocks, L, 2 x 2 grid), even
    out.text_pad_mask = torch.zeros(2, 5, dtype=torch.bool)
    plain, terms = stage_loss(out, batch, stage=Stage.FULL)
    assert "text_grounding" not in terms
    total, terms = stage_loss(out, batch, stage=Stage.FULL, text_grounding_weight=0.5)
    # The referent is the top half: share .5 on each top cell; even weights cost log 4.
    assert float(terms["text_grounding"]) == pytest.approx(0.5 * math.log(4), rel=1e-6)
    assert total.item() == pytest.approx(plain.item() + 0.5 * math.log(4), rel=1e-6)
