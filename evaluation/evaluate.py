"""Evaluate a trained Prompt-RIS checkpoint: oIoU, mIoU, P@X, ImgAcc, InstAcc per split.

Usage (one CPU, one GPU or many processes, as ``accelerate config`` describes):

    accelerate launch evaluation/evaluate.py --checkpoint checkpoints/run1 \
        --splits refcoco:val,refcoco:testA,refcoco:testB [--config configs/x.yaml] [key=value ...]
    accelerate launch evaluation/evaluate.py --checkpoint ... --splits refcoco:val --no-mask
    accelerate launch evaluation/evaluate.py --checkpoint ... --splits refcoco:val --prompt-ablation
    accelerate launch evaluation/evaluate.py --checkpoint ... --save-masks --overlays 8 \
        --overlay-order worst --output results/run1

The model (architecture, learned weights) comes from the checkpoint; data paths and evaluation
settings come from ``--config`` and ``key=value`` overrides (``data.prepared=...``,
``eval.batch_images=4``); the flags below override ``eval.*``. Every sentence of every reference
of each split is scored for the coarse (CLIP) and the final (SAM) mask, beside the random-object
baseline; metric conventions: evaluation/README.md. Writes ``results.json`` (the schema of
``paper_results.json``; compare with ``evaluation/compare.py``), ``results.md`` (also printed),
``records.jsonl``, and optionally ``masks.jsonl`` (COCO RLE) and ``overlays/``.
``--prompt-ablation`` scores every split again with each prompt type switched off in turn (the
paper's Table 5) in the same process, under ``"ablation"`` in ``results.json`` and as a table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from prompt_ris.config import Config, load_config
from prompt_ris.data.loader import build_eval_loader
from prompt_ris.data.rle import decode_rle
from prompt_ris.data.splits import load_split, parse_split
from prompt_ris.data.transforms import load_image
from prompt_ris.engine.baseline import dataset_expressions, random_object_baseline, referred_objects
from prompt_ris.engine.evaluator import evaluate
from prompt_ris.metrics import P_THRESHOLDS
from prompt_ris.models import PromptRIS, PromptSwitches
from prompt_ris.overlays import prediction_and_truth

logger = logging.getLogger("evaluate")

OUTPUT_NAMES = {"coarse": "coarse (CLIP)", "final": "final (SAM)", "random": "random object"}
DETAIL_METRICS = (*(f"P@{x}" for x in P_THRESHOLDS), "oIoU", "mIoU", "ImgAcc", "InstAcc")
PROMPT_ABLATION = {  # Table 5: the prompts reaching SAM's decoder -> the switch turned off
    "point + text": "mask",
    "mask + text": "point",
    "mask + point": "text",
}
ALL_PROMPTS = "mask + point + text"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="folder written by save_pretrained")
    parser.add_argument("--splits", help="comma-separated split names (eval.splits)")
    parser.add_argument("--config", help="YAML of differences from the defaults (data, eval)")
    parser.add_argument("--clip-weights", help="CLIP base weights (default: as the checkpoint)")
    parser.add_argument("--sam-weights", help="SAM base weights (default: as the checkpoint)")
    for prompt in ("mask", "point", "text"):
        parser.add_argument(f"--no-{prompt}", action="store_true", help=f"no {prompt} prompt")
    parser.add_argument(
        "--prompt-ablation",
        action="store_true",
        help="also score each split with each prompt type switched off in turn (Table 5)",
    )
    parser.add_argument("--save-masks", action="store_true", help="write masks.jsonl (RLE)")
    parser.add_argument("--overlays", type=int, help="overlay images per split (eval.num_overlays)")
    parser.add_argument("--overlay-order", choices=("first", "worst"), help="which expressions")
    parser.add_argument("--output", help="output folder (default <checkpoint>/eval)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.prepared=...")
    return parser.parse_intermixed_args(argv)  # overrides may come before and after the flags


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults <- --config <- overrides <- flags. The model section is replaced later by the
    checkpoint's own config."""
    cfg = load_config(args.config, args.overrides)
    ev = cfg.eval
    if args.splits:
        ev.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    ev.use_mask, ev.use_point = ev.use_mask and not args.no_mask, ev.use_point and not args.no_point
    ev.use_text = ev.use_text and not args.no_text
    ev.save_masks = ev.save_masks or args.save_masks
    ev.num_overlays = ev.num_overlays if args.overlays is None else args.overlays
    ev.overlay_order = args.overlay_order or ev.overlay_order
    if ev.overlay_order not in ("first", "worst"):
        raise ValueError(f"eval.overlay_order must be 'first' or 'worst', got '{ev.overlay_order}'")
    ev.output_dir = args.output or ev.output_dir or str(Path(args.checkpoint) / "eval")
    if args.prompt_ablation and not (ev.use_mask and ev.use_point and ev.use_text):
        raise ValueError(
            "--prompt-ablation switches each prompt off in turn, starting from all three; "
            "drop --no-mask / --no-point / --no-text (or eval.use_*=false)"
        )
    return cfg


def evaluate_split(
    model: PromptRIS, cfg: Config, split: str, accelerator: Accelerator
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]], Any]:
    """Model metrics (+ the random baseline) and records of one split, and its dataset."""
    ev = cfg.eval
    loader = build_eval_loader(
        cfg,
        split,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        limit=ev.max_expressions,
    )
    switches = PromptSwitches(mask=ev.use_mask, point=ev.use_point, text=ev.use_text)
    keep_masks = ev.save_masks or ev.num_overlays > 0
    metrics, records = evaluate(
        model, loader, accelerator, switches, split, ev.threshold, keep_masks=keep_masks
    )
    if ev.random_baseline:
        # Cheap (no model, no images): every process computes it and gets the same result.
        spec = parse_split(split)
        candidates: Any = ()
        if spec.categories is not None:  # test_unseen: the image's other objects count too
            whole = dataclasses.replace(spec, categories=None).name
            candidates = referred_objects(load_split(cfg.data.prepared, whole))
        base, base_records = random_object_baseline(
            dataset_expressions(loader.dataset), split, ev.baseline_seed, candidates
        )
        metrics["random"] = base
        by_key = {(r["ref_id"], r["sent_id"]): r for r in base_records}
        for record in records:
            drawn = by_key[record["ref_id"], record["sent_id"]]
            record.update({k: v for k, v in drawn.items() if k.startswith("random_")})
    return metrics, records, loader.dataset


def prompt_ablation(
    model: PromptRIS, cfg: Config, accelerator: Accelerator, full: dict[str, dict[str, dict]]
) -> dict[str, dict[str, dict[str, float]]]:
    """Final-mask metrics per prompt set and split: ``full`` (all prompts), then each split
    evaluated again with one prompt type off (no baseline, overlays or saved masks)."""
    ablation = {ALL_PROMPTS: {split: metrics["final"] for split, metrics in full.items()}}
    for name, off in PROMPT_ABLATION.items():
        sub = copy.deepcopy(cfg)
        setattr(sub.eval, f"use_{off}", False)
        sub.eval.random_baseline, sub.eval.save_masks, sub.eval.num_overlays = False, False, 0
        ablation[name] = {
            split: evaluate_split(model, sub, split, accelerator)[0]["final"] for split in full
        }
    return ablation


def format_ablation(ablation: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown in the layout of the paper's Table 5 (final mask)."""
    lines = [
        "| prompts to SAM | split | oIoU | mIoU | P@0.5 | P@0.7 | P@0.9 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, splits in ablation.items():
        for split, m in splits.items():
            cells = " | ".join(f"{m[k]:.2f}" for k in ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9"))
            lines.append(f"| {name} | {split} | {cells} |")
    return "\n".join(lines)


def format_results(results: dict[str, Any]) -> str:
    """results.md: the split tables, then the prompt ablation when it was run."""
    tables = format_tables(results["splits"])
    if "ablation" in results:
        tables += "\n\n" + format_ablation(results["ablation"])
    return tables


def format_tables(splits: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: oIoU / mIoU by split (Tables 1-2 layout), then P@X etc. (Tables 3-5 layout)."""
    names = list(splits)
    outputs = [o for o in OUTPUT_NAMES if any(o in splits[s] for s in names)]
    lines = ["| metric | output | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for metric in ("oIoU", "mIoU"):
        for output in outputs:
            cells = [
                f"{splits[s][output][metric]:.2f}" if output in splits[s] else "-" for s in names
            ]
            lines.append(f"| {metric} | {OUTPUT_NAMES[output]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| split | output | " + " | ".join(DETAIL_METRICS) + " | expressions |",
        "|---|---|" + "---:|" * (len(DETAIL_METRICS) + 1),
    ]
    for split in names:
        for output in [o for o in outputs if o in splits[split]]:
            m = splits[split][output]
            cells = [f"{m[k]:.2f}" for k in DETAIL_METRICS] + [str(m["num_expressions"])]
            lines.append(f"| {split} | {OUTPUT_NAMES[output]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def save_overlays(
    records: list[dict[str, Any]], dataset: Any, out_dir: Path, count: int, order: str
) -> list[Path]:
    """Prediction (left) and ground truth (right) over the image, for ``count`` expressions of
    one split: the first ones (ref_id, sent_id order) or the worst by final IoU."""
    chosen = sorted(records, key=lambda r: r["final_iou"]) if order == "worst" else records
    rows = {int(ref): row for row, ref in enumerate(dataset.table["ref_id"][:])}
    paths = []
    for rank, record in enumerate(chosen[:count]):
        ref = dataset.table[rows[record["ref_id"]]]
        image = load_image(dataset.image_path(ref), (int(ref["height"]), int(ref["width"])))
        gt = decode_rle({"size": ref["mask_size"], "counts": ref["mask_counts"]})
        text = f"{record['text']} (IoU {record['final_iou']:.2f})"
        canvas = prediction_and_truth(image, decode_rle(record["final_rle"]), gt, text)
        paths.append(out_dir / f"{rank:03d}_ref{record['ref_id']}_sent{record['sent_id']}.png")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        canvas.save(paths[-1])
    return paths


def write_outputs(
    out_dir: Path, results: dict[str, Any], records: list[dict[str, Any]], save_masks: bool
) -> None:
    """results.json, results.md, records.jsonl and (optionally) masks.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(format_results(results) + "\n")
    ids = ("split", "ref_id", "sent_id", "image_id")
    with open(out_dir / "records.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if not k.endswith("_rle")}) + "\n")
    if save_masks:
        with open(out_dir / "masks.jsonl", "w") as f:
            for r in records:
                masks = {k: v for k, v in r.items() if k.endswith("_rle")}
                f.write(json.dumps({**{k: r[k] for k in ids}, **masks}) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate, write the outputs (main process) and return the results dict."""
    args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO,
    )
    cfg = resolve_config(args)
    # cpu=True on a machine without CUDA: there, `accelerate launch --multi_gpu` gives gloo DDP.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = PromptRIS.from_pretrained(args.checkpoint, args.clip_weights, args.sam_weights)
    # The data frames (480 / 1024, text length) follow the model's own config.
    cfg.model = model.config.model
    model.to(accelerator.device).eval()
    out_dir, ev = Path(cfg.eval.output_dir), cfg.eval
    results: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "switches": {"mask": ev.use_mask, "point": ev.use_point, "text": ev.use_text},
        "eval": dataclasses.asdict(ev),
        "splits": {},
    }
    all_records = []
    for split in ev.splits:
        metrics, records, dataset = evaluate_split(model, cfg, split, accelerator)
        results["splits"][split] = metrics
        all_records.extend(records)
        if accelerator.is_main_process and ev.num_overlays > 0:
            folder = out_dir / "overlays" / _safe(split)
            save_overlays(records, dataset, folder, ev.num_overlays, ev.overlay_order)
    if args.prompt_ablation:
        results["ablation"] = prompt_ablation(model, cfg, accelerator, results["splits"])
    if accelerator.is_main_process:
        write_outputs(out_dir, results, all_records, ev.save_masks)
        accelerator.print(format_results(results))
        accelerator.print(f"\nresults written to {out_dir}")
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
