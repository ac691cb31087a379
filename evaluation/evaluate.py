"""Evaluate a trained Prompt-RIS checkpoint: oIoU, mIoU, P@X, ImgAcc, InstAcc per split.

Usage (one CPU, one GPU or many processes, as ``accelerate config`` describes):

    accelerate launch evaluation/evaluate.py --checkpoint checkpoints/refcoco_combined/best \
        --splits refcoco:val,refcoco:testA,refcoco:testB [--config configs/x.yaml] [key=value ...]
    accelerate launch evaluation/evaluate.py --checkpoint ... --splits refcoco:val --no-mask
    accelerate launch evaluation/evaluate.py --checkpoint ... --splits refcoco:val --prompt-ablation
    accelerate launch evaluation/evaluate.py --checkpoint ... --save-masks --overlays 8 \
        --overlay-order worst --output outputs/run1

The model (architecture, learned weights) comes from the checkpoint; data paths and evaluation
settings come from ``--config`` and ``key=value`` overrides (``data.prepared=...``,
``eval.batch_images=4``); the flags below override ``eval.*``. Every sentence of every reference
of each split is scored for the coarse (CLIP) and the final (SAM) mask, beside the random-object
baseline; metric conventions: evaluation/README.md. Writes ``results.json`` (the schema of
``paper_results.json``; compare with ``evaluation/compare.py``), ``results.md`` (also printed),
``records.jsonl``, and optionally ``masks.jsonl`` (COCO RLE) and ``overlays/``.
``--prompt-ablation`` scores every split again with each prompt type switched off in turn (the
paper's Table 5) in the same process, under ``"ablation"`` in ``results.json`` and as a table.

Before the model is loaded, the checkpoint, its base weights, every split and the output folder
are checked; each problem is printed as one line with its fix (exit status 1; ``-v`` shows
tracebacks). The outputs are written after each split, so an interruption keeps the splits done
(``"complete": false`` in results.json until the end). The default output folder is
``<checkpoint's folder>/eval/<checkpoint name>`` (``checkpoints/run/eval/best`` for
``checkpoints/run/best``): beside the exports, which training replaces, not inside them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the heavy imports happen in main(), after the arguments are parsed
    from accelerate import Accelerator

    from prompt_ris.config import Config, ConfigError
    from prompt_ris.models import PromptRIS

logger = logging.getLogger("evaluate")

PROG = "evaluate.py"
OUTPUT_NAMES = {"coarse": "coarse (CLIP)", "final": "final (SAM)", "random": "random object"}
PROMPT_ABLATION = {  # Table 5: the prompts reaching SAM's decoder -> the switch turned off
    "point + text": "mask",
    "mask + text": "point",
    "mask + point": "text",
}
ALL_PROMPTS = "mask + point + text"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="an export (e.g. checkpoints/<run>/best) or a folder "
        "written by save_pretrained",
    )  # fmt: skip
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
    parser.add_argument(
        "--output", help="output folder (default <checkpoint's folder>/eval/<checkpoint name>)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.prepared=...")
    return parser.parse_intermixed_args(argv)  # overrides may come before and after the flags


def default_output(checkpoint: str | Path) -> Path:
    """``<checkpoint's folder>/eval/<checkpoint name>``: for an export ``<run>/best`` that is
    ``<run>/eval/best``, outside the export folder that training replaces."""
    path = Path(checkpoint)
    if path.suffix == ".safetensors":
        path = path.parent
    path = Path(os.path.normpath(path))
    return path.parent / "eval" / path.name


def resolve_config(args: argparse.Namespace, errors: list[ConfigError] | None = None) -> Config:
    """Defaults <- --config <- overrides <- flags. The model section is replaced later by the
    checkpoint's own config. With ``errors``, problems are collected there instead of raised."""
    from prompt_ris.config import ConfigError, load_config

    cfg = load_config(args.config, args.overrides, errors)
    ev = cfg.eval
    if args.splits:
        ev.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    ev.use_mask, ev.use_point = ev.use_mask and not args.no_mask, ev.use_point and not args.no_point
    ev.use_text = ev.use_text and not args.no_text
    ev.save_masks = ev.save_masks or args.save_masks
    ev.num_overlays = ev.num_overlays if args.overlays is None else args.overlays
    ev.overlay_order = args.overlay_order or ev.overlay_order
    problems = []
    if ev.overlay_order not in ("first", "worst"):
        problems.append(
            f"eval.overlay_order must be 'first' or 'worst', got '{ev.overlay_order}'"
        )
    ev.output_dir = args.output or ev.output_dir or str(default_output(args.checkpoint))
    if args.prompt_ablation and not (ev.use_mask and ev.use_point and ev.use_text):
        problems.append(
            "--prompt-ablation switches each prompt off in turn, starting from all three; "
            "drop --no-mask / --no-point / --no-text (or eval.use_*=false)"
        )
    for problem in problems:
        if errors is None:
            raise ValueError(problem)
        errors.append(ConfigError(problem))
    return cfg


def evaluate_split(
    model: PromptRIS, cfg: Config, split: str, accelerator: Accelerator
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]], Any]:
    """Model metrics (+ the random baseline) and records of one split, and its dataset."""
    from prompt_ris.data.loader import build_eval_loader
    from prompt_ris.data.splits import load_split, parse_split
    from prompt_ris.engine.baseline import (
        dataset_expressions,
        random_object_baseline,
        referred_objects,
    )
    from prompt_ris.engine.evaluator import evaluate
    from prompt_ris.models import PromptSwitches

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
    from prompt_ris.metrics import P_THRESHOLDS

    detail_metrics = (*(f"P@{x}" for x in P_THRESHOLDS), "oIoU", "mIoU", "ImgAcc", "InstAcc")
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
        "| split | output | " + " | ".join(detail_metrics) + " | expressions |",
        "|---|---|" + "---:|" * (len(detail_metrics) + 1),
    ]
    for split in names:
        for output in [o for o in outputs if o in splits[split]]:
            m = splits[split][output]
            cells = [f"{m[k]:.2f}" for k in detail_metrics] + [str(m["num_expressions"])]
            lines.append(f"| {split} | {OUTPUT_NAMES[output]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def save_overlays(
    records: list[dict[str, Any]], dataset: Any, out_dir: Path, count: int, order: str
) -> list[Path]:
    """Prediction (left) and ground truth (right) over the image, for ``count`` expressions of
    one split: the first ones (ref_id, sent_id order) or the worst by final IoU."""
    from prompt_ris.data.rle import decode_rle
    from prompt_ris.data.transforms import load_image
    from prompt_ris.overlays import prediction_and_truth

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


RECORD_IDS = ("split", "ref_id", "sent_id", "image_id")


def start_outputs(out_dir: Path, save_masks: bool) -> None:
    """Empty records.jsonl (and masks.jsonl) of an earlier evaluation into the same folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("records.jsonl", "masks.jsonl", "results.json", "results.md"):
        (out_dir / name).unlink(missing_ok=True)
    (out_dir / "records.jsonl").touch()
    if save_masks:
        (out_dir / "masks.jsonl").touch()


def append_records(out_dir: Path, records: list[dict[str, Any]], save_masks: bool) -> None:
    """One split's records.jsonl lines (and masks.jsonl lines, COCO RLE)."""
    with open(out_dir / "records.jsonl", "a") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if not k.endswith("_rle")}) + "\n")
    if save_masks:
        with open(out_dir / "masks.jsonl", "a") as f:
            for r in records:
                masks = {k: v for k, v in r.items() if k.endswith("_rle")}
                f.write(json.dumps({**{k: r[k] for k in RECORD_IDS}, **masks}) + "\n")


def write_results(out_dir: Path, results: dict[str, Any]) -> None:
    """results.json and results.md as they stand, each replaced atomically."""
    for name, text in (
        ("results.json", json.dumps(results, indent=2) + "\n"),
        ("results.md", format_results(results) + "\n"),
    ):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)


def write_outputs(
    out_dir: Path, results: dict[str, Any], records: list[dict[str, Any]], save_masks: bool
) -> None:
    """results.json, results.md, records.jsonl and (optionally) masks.jsonl, all at once."""
    start_outputs(out_dir, save_masks)
    append_records(out_dir, records, save_masks)
    write_results(out_dir, results)


def report(problems: list[str], preflight: bool = True) -> None:
    """Print each problem on one line (main process only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for problem in problems:
        sys.stderr.write(f"{PROG}: error: {problem}\n")
    if preflight:
        sys.stderr.write(f"{PROG}: {len(problems)} problem(s) found before loading the model\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Check everything, evaluate, write the outputs after each split (main process) and
    return the results dict (exits with 1 on a user error)."""
    args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO,
    )
    from prompt_ris.config import ConfigError
    from prompt_ris.engine.preflight import evaluation_problems, one_line
    from prompt_ris.models.pretrained import CheckpointError

    errors: list[ConfigError] = []
    cfg = resolve_config(args, errors)
    problems = evaluation_problems(
        cfg, args.checkpoint, args.clip_weights, args.sam_weights, config_errors=errors
    )
    if problems:
        report(problems)
        raise SystemExit(1)
    try:
        return run_evaluation(args, cfg)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        if args.verbose:
            raise
        report([f"{one_line(err)} (-v shows the traceback)"], preflight=False)
        raise SystemExit(1) from None


def run_evaluation(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    """Load the model, score every split and write the outputs as each split is done."""
    import torch
    from accelerate import Accelerator

    from prompt_ris.models import PromptRIS

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
        "complete": False,  # true once every split (and the ablation) is in
        "splits": {},
    }
    if accelerator.is_main_process:
        start_outputs(out_dir, ev.save_masks)
    for split in ev.splits:
        metrics, records, dataset = evaluate_split(model, cfg, split, accelerator)
        results["splits"][split] = metrics
        if accelerator.is_main_process:  # written now: a later failure keeps this split
            append_records(out_dir, records, ev.save_masks)
            write_results(out_dir, results)
            if ev.num_overlays > 0:
                folder = out_dir / "overlays" / _safe(split)
                save_overlays(records, dataset, folder, ev.num_overlays, ev.overlay_order)
            logger.info("%s scored; results so far in %s", split, out_dir / "results.json")
    if args.prompt_ablation:
        results["ablation"] = prompt_ablation(model, cfg, accelerator, results["splits"])
    results["complete"] = True
    if accelerator.is_main_process:
        write_results(out_dir, results)
        accelerator.print(format_results(results))
        accelerator.print(f"\nresults written to {out_dir}")
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
