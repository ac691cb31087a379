"""Evaluator: oracle masks through the real postprocess, shard/merge equality, baseline, CLIs."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image

from prompt_ris.config import load_config
from prompt_ris.data.prepare import prepare_refer
from prompt_ris.data.splits import load_split
from prompt_ris.data.synthetic import SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY, generate_synthetic
from prompt_ris.data.text import tokenize
from prompt_ris.data.transforms import letterbox_image, letterbox_mask, lowres_mask
from prompt_ris.engine.evaluator import (
    decode_rle,
    encode_rle,
    evaluate,
    iter_expressions,
    random_object_baseline,
    score_batch,
)
from prompt_ris.metrics import deduplicate, summarize
from prompt_ris.models import PromptSwitches, build_prompt_ris

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(37, 90), (120, 64), (96, 96), (333, 500)]  # (H, W): wide, tall, square, large


def _load_cli(name: str) -> ModuleType:
    """evaluation/<name>.py as a module (the folder is a set of scripts, not a package)."""
    path = ROOT / "evaluation" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"evaluation_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = _load_cli("compare")


@pytest.fixture(scope="module")
def eval_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = load_config(overrides=["model.preset=tiny"])
    return build_prompt_ris(cfg.model).eval()


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy + 0.5 - cy * h) / (ry * h)) ** 2 + ((xx + 0.5 - cx * w) / (rx * w)) ** 2 <= 1


def _objects(h: int, w: int) -> list[np.ndarray]:
    """Two disjoint objects: an ellipse left, a rectangle right."""
    rect = np.zeros((h, w), dtype=bool)
    rect[h // 4 : 3 * h // 4, int(0.6 * w) : int(0.95 * w)] = True
    return [_ellipse(h, w, 0.5, 0.28, 0.35, 0.22), rect]


def _batch(model: torch.nn.Module, image_ids: list[int]) -> dict:
    """A collated evaluation batch (CONTRIBUTING.md contract) of synthetic images.

    Image ``i`` has size SIZES[i % 4] and two objects; object 0 has two sentences, object 1 one.
    """
    cfg = model.config.model
    keys = ("clip_images", "sam_images", "input_sizes", "orig_sizes")
    batch: dict = {k: [] for k in keys}
    per_expr: dict = {
        k: []
        for k in (
            "image_index",
            "object_ids",
            "ref_ids",
            "sent_ids",
            "image_ids",
            "category_ids",
            "texts",
            "gt_masks_orig",
        )
    }
    for row, image_id in enumerate(image_ids):
        h, w = SIZES[image_id % len(SIZES)]
        pixels = np.random.default_rng(image_id).integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(pixels)  # the same image whatever batch it is put in
        boxed = letterbox_image(img, cfg.clip.image_size, cfg.sam.image_size)
        batch["clip_images"].append(boxed.clip_image)
        batch["sam_images"].append(boxed.sam_image)
        batch["input_sizes"].append(torch.tensor(boxed.input_size))
        batch["orig_sizes"].append(torch.tensor(boxed.orig_size))
        objects = _objects(h, w)
        for obj, sent, text in ((0, 0, "the left blob"), (0, 1, "round thing"), (1, 2, "box")):
            ref_id = 10 * image_id + obj
            values = (
                row,
                100 * image_id + obj,
                ref_id,
                10 * ref_id + sent,
                image_id,
                1 + obj,
                text,
                objects[obj],
            )
            for key, value in zip(per_expr, values):
                per_expr[key].append(value)
    out = {k: torch.stack(v) for k, v in batch.items()}
    for key, values in per_expr.items():
        out[key] = values if key in ("texts", "gt_masks_orig") else torch.tensor(values)
    out["text_tokens"] = tokenize(out["texts"], cfg.clip.text_length)
    out["gt_masks"] = torch.stack(
        [lowres_mask(m, cfg.sam.image_size) for m in out["gt_masks_orig"]]
    )[:, None]
    return out


def test_rle_roundtrip() -> None:
    mask = _objects(37, 90)[0]
    rle = encode_rle(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [37, 90]
    assert np.array_equal(decode_rle(json.loads(json.dumps(rle))), mask)


def test_oracle_prediction_scores_iou_near_one(eval_model: torch.nn.Module) -> None:
    """Ground truth letterboxed to the low-res frame (final) or to the CLIP grid (coarse), mapped
    back by the model's real upsample/postprocess, matches the original-size ground truth."""
    model = eval_model
    batch = _batch(model, [0, 1, 2, 3])
    # Logits p - 0.5: a linear map, so bilinear resampling then "> 0" equals resampling p, "> .5".
    final = batch["gt_masks"] - 0.5  # (B, 1, S_s/4, S_s/4)
    grid = model.config.model.clip.image_size // model.config.model.clip.patch_size
    clip_frame = torch.stack(
        [letterbox_mask(m, model.config.model.clip.image_size) for m in batch["gt_masks_orig"]]
    )[:, None]
    coarse = F.adaptive_avg_pool2d(clip_frame, grid) - 0.5  # (B, 1, h_c, w_c)
    frame = (batch["input_sizes"], batch["orig_sizes"], batch["image_index"])
    logits = {
        "final": model.postprocess_masks(final, *frame),
        "coarse": model.postprocess_masks(model.upsample_coarse(coarse), *frame),
    }
    records = score_batch(logits, batch, "synthetic:val")
    final_ious = [r["final_iou"] for r in records]
    coarse_ious = [r["coarse_iou"] for r in records]
    assert min(final_ious) > 0.93, final_ious
    assert min(coarse_ious) > 0.8, coarse_ious
    # The wrong object scores 0: the masks are aligned, not merely blurred everywhere.
    swapped = list(logits["final"])
    swapped[0], swapped[2] = swapped[2], swapped[0]  # image 0: object 1's mask for object 0
    assert score_batch({"final": swapped}, batch, "x")[0]["final_iou"] == 0.0


def test_shards_merge_to_single_process_result(eval_model: torch.nn.Module) -> None:
    """Two processes each seeing half the images (plus a padded repeat) give, after the gather
    and deduplication, exactly the single-process records and metrics."""
    model, accelerator = eval_model, Accelerator(cpu=True)
    switches = PromptSwitches()
    full_loader = [_batch(model, [0]), _batch(model, [1])]
    metrics, records = evaluate(model, full_loader, accelerator, switches, "synthetic:val")
    shard_a = evaluate(model, [_batch(model, [1])], accelerator, switches, "synthetic:val")
    shard_b = evaluate(model, [_batch(model, [0, 1])], accelerator, switches, "synthetic:val")
    merged = deduplicate(shard_a[1] + shard_b[1])
    assert merged == records
    assert {o: summarize(merged, o) for o in ("coarse", "final")} == metrics
    assert metrics["final"]["num_expressions"] == 6 and metrics["final"]["num_images"] == 2
    assert not model.training


def test_evaluate_restores_mode_and_scores_coarse_only(eval_model: torch.nn.Module) -> None:
    model = eval_model.train()
    metrics, records = evaluate(
        model, [_batch(model, [1])], Accelerator(cpu=True), PromptSwitches(), "s", with_sam=False
    )
    assert model.training
    model.eval()
    assert set(metrics) == {"coarse"} and "final_iou" not in records[0]
    assert 0.0 <= metrics["coarse"]["mIoU"] <= 100.0


def test_random_object_baseline(eval_model: torch.nn.Module) -> None:
    batches = [_batch(eval_model, [0, 1, 2]), _batch(eval_model, [3])]
    metrics, records = random_object_baseline(iter_expressions(batches), "s", seed=3)
    assert len(records) == 12
    for r in records:
        # Two disjoint objects per image: a hit scores exactly 1, a miss exactly 0.
        assert r["random_iou"] == float(r["random_object_id"] == r["object_id"])
    hits = sum(r["random_object_id"] == r["object_id"] for r in records)
    assert metrics["mIoU"] == pytest.approx(100 * hits / 12)
    # Draws are seeded per image: another batching gives the same records.
    again = random_object_baseline(iter_expressions([_batch(eval_model, [3, 2, 1, 0])]), "s", 3)
    assert again[1] == records


def test_random_baseline_single_object_is_perfect() -> None:
    gt = _objects(20, 30)[1]
    exprs = [
        {
            "split": "",
            "ref_id": 1,
            "sent_id": s,
            "image_id": 5,
            "object_id": 9,
            "category_id": 1,
            "text": "t",
            "gt_mask": gt,
        }
        for s in range(3)
    ]
    metrics, _ = random_object_baseline(exprs, "s")
    assert metrics["mIoU"] == 100.0 and metrics["oIoU"] == 100.0


def test_compare_prints_differences(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = {"splits": {"refcoco:val": {"final": {"oIoU": 76.36, "mIoU": 78.10}}}}
    b = {
        "splits": {
            "refcoco:val": {"final": {"oIoU": 70.00, "mIoU": 80.00, "P@0.5": 90.0}},
            "refcoco:testA": {"final": {"mIoU": 1.0}},
        }
    }
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    text = compare.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert "| refcoco:val | final | oIoU | 76.36 | 70.00 | -6.36 |" in text
    assert "| refcoco:val | final | mIoU | 78.10 | 80.00 | +1.90 |" in text
    assert "P@0.5 |" not in text  # only in B
    assert "only in b.json: refcoco:testA/final" in text
    assert text in capsys.readouterr().out


def test_paper_results_entries_compare() -> None:
    paper = ROOT / "evaluation" / "paper_results.json"
    text = compare.main(
        [
            str(paper),
            str(paper),
            "--a-entry",
            "table5/point+text",
            "--b-entry",
            "table5/mask+point+text",
        ]
    )
    assert "| refcoco:val | final | mIoU | 76.75 | 78.10 | +1.35 |" in text  # Sec. 4.4 text
    with pytest.raises(SystemExit, match="no entry"):
        compare.main([str(paper), str(paper), "--a-entry", "table9"])


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic refer data (prepared) and a saved tiny checkpoint."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, num_images=20, seed=0)
    prepare_refer(
        root, root / "prepared", [(SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY)], check_images="none"
    )
    torch.manual_seed(0)
    model = build_prompt_ris(load_config(overrides=["model.preset=tiny"]).model)
    model.save_pretrained(root / "ckpt")
    return {"prepared": root / "prepared", "checkpoint": root / "ckpt", "out": root / "eval"}



def test_random_baseline_draws_from_the_unfiltered_split() -> None:
    """For test_unseen the image's seen objects are still there to be picked by chance."""
    target, other = _objects(20, 30)
    expr = {
        "split": "", "ref_id": 1, "sent_id": 0, "image_id": 5, "object_id": 9, "category_id": 1,
        "text": "t", "gt_mask": target,
    }  # fmt: skip
    alone, _ = random_object_baseline([expr], "s_unseen")
    assert alone["mIoU"] == 100.0  # only the filtered split's object: chance looks perfect
    pool = [
        {"image_id": 5, "object_id": 9, "gt_rle": encode_rle(target)},
        {"image_id": 5, "object_id": 10, "gt_rle": encode_rle(other)},
        {"image_id": 6, "object_id": 11, "gt_rle": encode_rle(other)},  # another image: unused
    ]
    drawn = set()
    for seed in range(20):
        _, records = random_object_baseline([expr], "s_unseen", seed, candidates=pool)
        drawn.add(records[0]["random_object_id"])
    assert drawn == {9, 10}

def test_evaluate_cli_writes_tables_masks_and_overlays(synthetic_run: dict[str, Path]) -> None:
    evaluate_cli = _load_cli("evaluate")
    splits = ["synthetic:val", "synthetic:testB"]
    out = synthetic_run["out"]
    results = evaluate_cli.main(
        [
            "--checkpoint",
            str(synthetic_run["checkpoint"]),
            "--splits",
            ",".join(splits),
            "--no-point",
            "--save-masks",
            "--overlays",
            "2",
            "--overlay-order",
            "worst",
            "--output",
            str(out),
            f"data.prepared={synthetic_run['prepared']}",
            "eval.max_expressions=8",
            "data.num_workers=0",
        ]
    )
    assert results["switches"] == {"mask": True, "point": False, "text": True}
    assert list(results["splits"]) == splits
    saved = json.loads((out / "results.json").read_text())
    assert saved["splits"] == results["splits"]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    masks = [json.loads(line) for line in (out / "masks.jsonl").read_text().splitlines()]
    for split in splits:
        table = load_split(synthetic_run["prepared"], split)
        mine = [r for r in records if r["split"] == split]
        assert {"coarse", "final", "random"} == set(results["splits"][split])
        assert results["splits"][split]["final"]["num_expressions"] == len(mine)
        # Every sentence of every reference of the evaluated images, each once.
        images = {r["image_id"] for r in mine}
        expected = {
            (int(ref), int(s))
            for ref, img, sents in zip(
                table["ref_id"][:], table["image_id"][:], table["sent_ids"][:]
            )
            if img in images
            for s in sents
        }
        assert {(r["ref_id"], r["sent_id"]) for r in mine} == expected
        assert summarize(mine, "final")["mIoU"] == results["splits"][split]["final"]["mIoU"]
        assert len(list((out / "overlays" / split.replace(":", "_")).glob("*.png"))) == 2
    first = masks[0]
    h, w = decode_rle(first["final_rle"]).shape
    assert decode_rle(first["coarse_rle"]).shape == (h, w) and len(masks) == len(records)
    assert "| mIoU | final (SAM) |" in (out / "results.md").read_text()
    # The results file compares with the paper's (no shared split here: nothing in common).
    assert "no metric is reported by both" in compare.main(
        [str(out / "results.json"), str(ROOT / "evaluation" / "paper_results.json")]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    os.environ.get("PROMPT_RIS_SLOW") != "1",
    reason="real 2-process gloo run (about a minute on 2 cores); set PROMPT_RIS_SLOW=1",
)
def test_two_process_launch_equals_one_process(synthetic_run: dict[str, Path]) -> None:
    common = [
        "--checkpoint",
        str(synthetic_run["checkpoint"]),
        "--splits",
        "synthetic:val,synthetic:testA",
        f"data.prepared={synthetic_run['prepared']}",
        "data.num_workers=0",
        "eval.random_baseline=false",
    ]
    one, two = synthetic_run["out"].with_name("one"), synthetic_run["out"].with_name("two")
    _load_cli("evaluate").main([*common, "--output", str(one), "eval.batch_images=3"])
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(ROOT / "evaluation" / "evaluate.py"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [*launch, *common, "--output", str(two), "eval.batch_images=2"],
        check=True,
        env=env,
        cwd=ROOT,
    )
    assert (two / "records.jsonl").read_text() == (one / "records.jsonl").read_text()
    splits = [json.loads((d / "results.json").read_text())["splits"] for d in (one, two)]
    assert splits[0] == splits[1]


def test_prompt_ablation_scores_each_prompt_off_in_one_run(
    synthetic_run: dict[str, Path], tmp_path: Path
) -> None:
    evaluate_cli = _load_cli("evaluate")
    common = [
        "--checkpoint", str(synthetic_run["checkpoint"]), "--splits", "synthetic:val",
        "--output", str(tmp_path), f"data.prepared={synthetic_run['prepared']}",
        "eval.max_expressions=6", "data.num_workers=0",
    ]  # fmt: skip
    results = evaluate_cli.main([*common, "--prompt-ablation"])
    ablation = results["ablation"]
    assert list(ablation) == ["mask + point + text", "point + text", "mask + text", "mask + point"]
    final = results["splits"]["synthetic:val"]["final"]
    assert ablation["mask + point + text"]["synthetic:val"] == final
    # Each row is what a separate run with that prompt switched off reports.
    alone = evaluate_cli.main([*common, "--no-mask", "--output", str(tmp_path / "no_mask")])
    assert ablation["point + text"]["synthetic:val"] == alone["splits"]["synthetic:val"]["final"]
    assert "| mask + point | synthetic:val |" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="drop --no-mask"):
        evaluate_cli.main([*common, "--prompt-ablation", "--no-mask"])
