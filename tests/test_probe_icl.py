"""scripts/probe_icl.py: what ICL acts on (pairs' O), confusions and the mask, two exports side
by side."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from repo_scripts import load_script
from tiny_random import TINY_RANDOM_ARGS

from prompt_ris import evaluate
from prompt_ris.config import load_config
from prompt_ris.data.prepare import prepare_refer
from prompt_ris.data.splits import load_split
from prompt_ris.losses import ICL_EPS, hard_iou, instance_contrastive_loss
from prompt_ris.miniature.synthetic import (
    COLOURS,
    SYNTHETIC_DATASET,
    SYNTHETIC_SPLIT_BY,
    generate_synthetic,
    synthetic_scene,
)
from prompt_ris.models import PromptRIS

probe = load_script("scripts/probe_icl.py")
pytestmark = pytest.mark.usefixtures("one_thread")


def box(top: int, left: int, size: int = 3, side: int = 8) -> torch.Tensor:
    """(side, side) float mask with a size x size box."""
    mask = torch.zeros(side, side)
    mask[top : top + size, left : left + size] = 1.0
    return mask


def test_pairs_are_the_losses_pairs_and_a_confusion_is_counted() -> None:
    # One image, objects A (red circle) and B (red square); expressions 0 and 2 refer to A, 1 to
    # B. Expression 0's mask lies on B: a confusion onto a same-colour object.
    a_mask, b_mask = box(0, 0), box(4, 4)
    gt = torch.stack([a_mask, b_mask, a_mask])[:, None]  # (3, 1, 8, 8)
    logits = torch.stack([8 * b_mask - 4, 6 * b_mask - 3, 8 * a_mask - 4])[:, None]
    batch = SimpleNamespace(
        object_ids=torch.tensor([10, 11, 10]), image_index=torch.zeros(3, dtype=torch.long),
        gt_masks=gt,
    )  # fmt: skip
    a = probe.SceneObject(10, a_mask.bool().numpy(), "red", "circle")
    b = probe.SceneObject(11, b_mask.bool().numpy(), "red", "square")
    rows = [probe.expression_row(logits[k, 0], obj, [other], 0.5)
            for k, (obj, other) in enumerate([(a, b), (b, a), (a, b)])]  # fmt: skip
    assert rows[0]["confused_onto"] == 11 and rows[0]["confused_relation"] == "same colour"
    assert rows[0]["iou"] == 0.0 and rows[1]["confused_onto"] is None and rows[1]["iou"] == 1.0
    probs = logits.sigmoid()[:, 0]  # (3, 8, 8)
    assert rows[0]["leak"] == pytest.approx(float((probs[0] * b_mask).sum() / probs[0].sum()))
    pairs = probe.pair_rows(logits, batch, [a, b, a], [r["confused_onto"] for r in rows])
    assert [r["group"] for r in pairs] == ["same colour", probe.SAME_OBJECT, "same colour"]
    # The pair (0, 1) alone: eq. (8) over b = 2 is its two terms and the two clamped diagonal
    # ones, over b^2 = 4; O by hand is eq. (7).
    first = pairs[0]
    p0, p1 = probs[0].flatten(), probs[1].flatten()
    assert first["overlap"] == pytest.approx(
        float(2 * (p0 * p1).sum() / (p0.square().sum() + p1.square().sum())), rel=1e-6
    )
    weights = hard_iou(logits[:2], gt[:2])
    loss = instance_contrastive_loss(
        logits[:2], batch.object_ids[:2], batch.image_index[:2], gt[:2]
    )
    diagonal = -float(weights.sum()) * math.log(1 - ICL_EPS)
    assert 4 * float(loss) == pytest.approx(first["terms"] + diagonal, rel=1e-5)
    assert first["w_confused"] == pytest.approx(0.0) and first["w_other"] == pytest.approx(1.0)
    # The pair alone, as training's b = 2 draws it: lowering O (eq. 7) makes the two masks
    # unequal, so the step raises the louder, wrong mask 0 on B and lowers the right mask 1 on
    # B, its own referent; the regions split the whole gradient.
    alone = SimpleNamespace(
        object_ids=batch.object_ids[:2], image_index=batch.image_index[:2], gt_masks=gt[:2]
    )
    down, up = probe.icl_push(logits[:2], alone)  # (2, 3)
    other, own = probe.REGIONS.index("other objects"), probe.REGIONS.index("referent")
    assert up[0, other] > down[0, other] and down[1, own] > up[1, own]
    assert first["raises_wrong"] and first["lowers_right"]
    x = logits[:2].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(
        instance_contrastive_loss(x, batch.object_ids[:2], batch.image_index[:2], gt[:2]), x
    )
    assert float((down - up).sum()) == pytest.approx(float(grad.sum()), abs=1e-6)
    assert float((down + up).sum()) == pytest.approx(float(grad.abs().sum()), rel=1e-5)
    summary = probe.overlap_summary(pairs)
    assert summary["all"]["pairs"] == 2 and summary[probe.SAME_OBJECT]["pairs"] == 1
    assert summary["same colour"]["term_share"] == pytest.approx(100.0)
    assert summary["confused_pairs"]["pairs"] == 1
    assert summary["confused_pairs"]["raises_wrong"] == 100.0
    for row, form in zip(rows, ["shape", "colour + shape", "shape"]):
        row["form"] = form
    confusions = probe.confusion_summary(rows)
    assert confusions["all"]["confused"] == pytest.approx(100 / 3)
    assert confusions["shape"]["confused"] == 50.0
    assert confusions["shape"]["onto"]["same colour"] == 50.0
    assert confusions["colour + shape"]["confused"] == 0.0


def test_object_colour_reads_the_synthetic_colours() -> None:
    named = 0
    for seed in range(5):
        pixels, truths = synthetic_scene(seed)
        for text, mask in truths.items():
            colour = next((w for w in text.split() if w in COLOURS), None)
            if colour is not None:
                assert probe.object_colour(pixels, mask) == colour
                named += 1
    assert named > 5


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probe_icl")
    generate_synthetic(root, num_images=16, seed=0, kinds=("attribute",))
    prepare_refer(
        root, root / "prepared", [(SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY)], check_images="none"
    )
    cfg = load_config(overrides=TINY_RANDOM_ARGS)
    for seed in (0, 1):
        torch.manual_seed(seed)
        PromptRIS.from_config(cfg.model).save_pretrained(root / f"ckpt{seed}")
    return {"root": root, "with": root / "ckpt0", "without": root / "ckpt1"}


def test_probe_reports_two_exports_on_a_split(exports: dict[str, Path]) -> None:
    out = exports["root"] / "out"
    prepared = f"data.prepared={exports['root'] / 'prepared'}"
    assert probe.main([
        "--with", str(exports["with"]), "--without", str(exports["without"]), "--out", str(out),
        prepared, "data.num_workers=0",
    ]) == 0  # fmt: skip
    report = json.loads((out / "icl.json").read_text())
    assert report["split"] == "synthetic:val" and list(report["runs"]) == [
        "with ICL",
        "without ICL",
    ]
    assert (out / "icl.md").read_text().startswith("# ICL probe on synthetic:val")
    table = load_split(exports["root"] / "prepared", "synthetic:val")
    expressions = [  # (image, object) of every expression of the split
        (int(image), int(ann))
        for image, ann, sents in zip(table["image_id"], table["ann_id"], table["sentences"])
        for _ in sents
    ]
    different = sum(
        a[0] == b[0] and a[1] != b[1] for a, b in combinations(expressions, 2)
    )  # pairs of one image about different objects
    for name, export in (("with ICL", exports["with"]), ("without ICL", exports["without"])):
        run = report["runs"][name]
        assert run["checkpoint"] == str(export) and run["expressions"] == len(expressions)
        model = PromptRIS.from_pretrained(export)
        cfg = load_config(base=model.config, overrides=[prepared, "data.num_workers=0"])
        evaluated = evaluate(model, "synthetic:val", config=cfg).splits["synthetic:val"]
        for output in probe.OUTPUTS:
            measured = run[output]
            for metric in probe.METRICS:
                assert measured["metrics"][metric] == pytest.approx(evaluated[output][metric])
            assert measured["overlap"]["all"]["pairs"] == different > 0
            groups = sum(measured["overlap"][g]["pairs"] for g in probe.RELATIONS)
            assert groups == different
            assert 0.0 <= measured["overlap"]["all"]["mean"] <= 1.0
            assert measured["confusions"]["all"]["expressions"] == len(expressions)
            assert measured["icl_loss"] > 0
            for way in ("down", "up"):
                assert sum(measured["push"][way].values()) == pytest.approx(100.0)
            assert {"seen", "unseen"} >= set(measured["categories"]) and measured["categories"]


def test_a_missing_checkpoint_is_one_line(
    exports: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = exports["root"] / "missing"
    assert probe.main([
        "--with", str(exports["root"] / "nothing"), "--without", str(exports["without"]),
        "--out", str(out),
    ]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.startswith("probe_icl.py: ") and "\n" not in err
    assert not (out / "icl.json").exists()
