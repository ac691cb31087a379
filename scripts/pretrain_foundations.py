"""Pretrain the demo's miniature foundations: a tiny CLIP and a tiny SAM on synthetic scenes.

Usage:

    python scripts/pretrain_foundations.py                 # both, the committed settings
    python scripts/pretrain_foundations.py --only sam      # one of them
    python scripts/pretrain_foundations.py --quick --out /tmp/foundations   # seconds (tests)
    python scripts/pretrain_foundations.py model.clip.vision_layers=4 --clip-steps 500
    python scripts/pretrain_foundations.py --only sam --world ambiguous --sam-multimask

The model sizes are the ``tiny`` preset's (``prompt_ris/config.py``), changed by ``model.*``
overrides. Writes into ``--out`` (default ``checkpoints/tiny_synthetic``):

- ``clip_tiny_synthetic.pt``: open_clip ``CLIP`` state dict (the format of
  ``scripts/download_weights.py``'s ``clip_vit_b16_openai.pt``), for ``model.clip.pretrained``;
- ``sam_tiny_synthetic.pth``: segment_anything ``Sam`` state dict (the format of
  ``sam_vit_b_01ec64.pth``), for ``model.sam.checkpoint``;
- ``report.json`` and ``report.md``: settings, wall time and what each model learnt, measured
  on held-out scenes (``prompt_ris/miniature/*_probes.py``).

``--world ambiguous`` pretrains the SAM on the referring data's ambiguous world (shapes inside
shapes, same-coloured shapes overlapping) and measures it on both worlds; ``--sam-multimask``
trains a lone click as SAM does, on its three multimask outputs with the lowest of their losses
(``prompt_ris/miniature/sam_pretrain.py``). ``--evaluate --world ambiguous`` measures weight
files on both worlds.

Tensors are stored in fp16 unless ``--fp32``. The run is a function of ``--seed`` (and of the
thread count only through floating-point summation order): it runs single-threaded by default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIP
from segment_anything.modeling import Sam

from prompt_ris.config import MODEL_PRESETS, load_config
from prompt_ris.miniature import clip_probes, sam_probes
from prompt_ris.miniature.clip_pretrain import ClipPretrainConfig, pretrain_clip
from prompt_ris.miniature.sam_pretrain import SamPretrainConfig, pretrain_sam
from prompt_ris.miniature.synthetic import WORLDS
from prompt_ris.models.build import build_clip, build_sam

logger = logging.getLogger("pretrain_foundations")

# The files the tiny preset loads (model.clip.pretrained, model.sam.checkpoint), in one folder.
_TINY = MODEL_PRESETS["tiny"]
CLIP_PATH, SAM_PATH = Path(_TINY["clip"]["pretrained"]), Path(_TINY["sam"]["checkpoint"])
FOLDER, CLIP_FILE, SAM_FILE = CLIP_PATH.parent, CLIP_PATH.name, SAM_PATH.name
TEST_SEED_OFFSET = 2000  # held-out measurement scenes: their own random streams
VALIDATION_SEED_OFFSET = 1000  # scenes for choosing settings (--eval-split val)


@dataclass
class EvalSizes:
    """How many held-out scenes each measurement uses."""

    retrieval_queries: int = 1024
    retrieval_k: int = 16
    hard_pairs: int = 300
    word_auc_images: int = 700
    probe_train_scenes: int = 300
    probe_test_scenes: int = 150
    sam_scenes: int = 200


QUICK_EVAL = EvalSizes(32, 8, 8, 28, 6, 4, 3)


@dataclass
class FoundationsResult:
    """What ``main`` made: the models (fp32, in memory), the files and the report."""

    clip: CLIP | None = None
    sam: Sam | None = None
    files: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(FOLDER), help="output folder")
    parser.add_argument("--only", choices=("clip", "sam"), default=None, help="train one model")
    parser.add_argument("--quick", action="store_true", help="a few steps and tiny evaluations")
    parser.add_argument("--clip-low-steps", type=int, default=None, help="CLIP phase 1 (64 px)")
    parser.add_argument("--clip-steps", type=int, default=None, help="CLIP phase 2 (full size)")
    parser.add_argument("--clip-batch", type=int, default=None)
    parser.add_argument("--sam-steps", type=int, default=None)
    parser.add_argument("--sam-images", type=int, default=None, help="scenes per SAM step")
    parser.add_argument(
        "--world",
        choices=WORLDS,
        default="flat",
        help="the SAM's scenes; 'ambiguous' is also measured on the flat world",
    )
    parser.add_argument(
        "--sam-multimask",
        action="store_true",
        help="a lone click trains SAM's three multimask outputs (the lowest loss)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-eval", action="store_true", help="skip the measurements")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="no training: measure the weight files in --out (loaded by build_clip / build_sam)",
    )
    parser.add_argument(
        "--eval-split",
        choices=("test", "val"),
        default="test",
        help="held-out scenes to measure on: 'val' to compare settings, 'test' for the report",
    )
    parser.add_argument("--fp32", action="store_true", help="store fp32 tensors (default fp16)")
    parser.add_argument(
        "overrides", nargs="*", help="model.* overrides, e.g. model.sam.encoder_depth=3"
    )
    return parser.parse_intermixed_args(argv)


def _settings(args: argparse.Namespace) -> tuple[ClipPretrainConfig, SamPretrainConfig]:
    clip_cfg = ClipPretrainConfig(seed=args.seed)
    sam_cfg = SamPretrainConfig(seed=args.seed, world=args.world, multimask=args.sam_multimask)
    low, full = clip_cfg.phases
    if args.quick:
        low.steps, full.steps, clip_cfg.batch_size, clip_cfg.warmup_steps = 2, 2, 16, 1
        sam_cfg.steps, sam_cfg.images_per_step, sam_cfg.warmup_steps = 3, 2, 1
        clip_cfg.log_every = sam_cfg.log_every = 1
    for value, target, name in (
        (args.clip_low_steps, low, "steps"),
        (args.clip_steps, full, "steps"),
        (args.clip_batch, clip_cfg, "batch_size"),
        (args.sam_steps, sam_cfg, "steps"),
        (args.sam_images, sam_cfg, "images_per_step"),
    ):
        if value is not None:
            setattr(target, name, value)
    return clip_cfg, sam_cfg


def _save(state_dict: dict[str, torch.Tensor], path: Path, fp32: bool) -> None:
    if not fp32:
        state_dict = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    torch.save(state_dict, partial)
    partial.replace(path)
    logger.info("saved %s (%.1f MB)", path, path.stat().st_size / 1e6)


# The preset's weight files and freezing are how Prompt-RIS uses these models, not how they are
# pretrained (from random weights, every parameter trained): the report leaves them out.
PROMPT_RIS_ONLY = {"pretrained", "checkpoint", "freeze"}


def _architecture(fields: Any) -> dict[str, Any]:
    """A model config section without the fields that only Prompt-RIS reads."""
    return {k: v for k, v in asdict(fields).items() if k.split("_")[0] not in PROMPT_RIS_ONLY}


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_clip(
    model_cfg: Any, cfg: ClipPretrainConfig, sizes: EvalSizes | None, eval_seed: int
) -> tuple[CLIP, dict[str, Any]]:
    """Build the tiny CLIP, pretrain it and measure it."""
    model, training = pretrain_clip(model_cfg, cfg)
    report: dict[str, Any] = {
        "settings": asdict(cfg),
        "parameters": _num_params(model),
        "training": training,
    }
    if sizes is not None:
        report.update(measure_clip(model, sizes, eval_seed, cfg.text_length))
    return model, report


def measure_clip(model: CLIP, sizes: EvalSizes, eval_seed: int, length: int) -> dict[str, Any]:
    """Every CLIP measurement of ``clip_probes`` on held-out scenes."""
    start = time.time()
    report: dict[str, Any] = {
        "retrieval": clip_probes.retrieval(
            model, random.Random(eval_seed + 1), length, sizes.retrieval_queries, sizes.retrieval_k
        ),
        "hard_pairs": clip_probes.hard_pairs(
            model, random.Random(eval_seed + 2), length, sizes.hard_pairs
        ),
        "word_auc": clip_probes.word_auc(
            model, random.Random(eval_seed + 3), length, sizes.word_auc_images
        ),
        "patch_probe": clip_probes.patch_probe(
            model, random.Random(eval_seed + 4), sizes.probe_train_scenes, sizes.probe_test_scenes
        ),
    }
    report["eval_seconds"] = time.time() - start
    return report


def run_sam(
    model_cfg: Any, cfg: SamPretrainConfig, sizes: EvalSizes | None, eval_seed: int
) -> tuple[Sam, dict[str, Any]]:
    """Build the tiny SAM, pretrain it and measure it."""
    torch.manual_seed(cfg.seed)
    sam = build_sam(model_cfg, None)
    report: dict[str, Any] = {
        "settings": asdict(cfg),
        "parameters": _num_params(sam),
        "training": pretrain_sam(sam, cfg),
    }
    if sizes is not None:
        report.update(measure_sam(sam, sizes, eval_seed, cfg.world))
    return sam, report


def measure_sam(sam: Sam, sizes: EvalSizes, eval_seed: int, world: str = "flat") -> dict[str, Any]:
    """mIoU per prompt kind on held-out scenes of the flat world (``miou``), and of ``world`` too
    (``miou_<world>``, with figures per situation) when it is another."""
    start = time.time()
    report: dict[str, Any] = {
        "miou": sam_probes.prompt_miou(sam, random.Random(eval_seed + 5), sizes.sam_scenes)
    }
    if world != "flat":
        report[f"miou_{world}"] = sam_probes.prompt_miou(
            sam, random.Random(eval_seed + 5), sizes.sam_scenes, world
        )
    report["eval_seconds"] = time.time() - start
    return report


def evaluate_files(
    model_cfg: Any,
    out: Path,
    sizes: EvalSizes,
    eval_seed: int,
    report: dict[str, Any],
    world: str = "flat",
) -> FoundationsResult:
    """Load the weight files in ``out`` through ``build_clip`` / ``build_sam`` and measure them;
    training details come from the reports a training run left in ``out``."""
    result = FoundationsResult()
    for name in ("report.json", "report_clip.json", "report_sam.json"):
        if (out / name).is_file():
            earlier = json.loads((out / name).read_text())
            report.update({k: earlier[k] for k in ("clip", "sam") if k in earlier})
    if (out / CLIP_FILE).is_file():
        result.clip = build_clip(model_cfg.clip, str(out / CLIP_FILE)).eval()
        length = report.get("clip", {}).get("settings", {}).get("text_length", 32)
        report.setdefault("clip", {}).update(measure_clip(result.clip, sizes, eval_seed, length))
        report["clip"]["parameters"] = _num_params(result.clip)
        result.files["clip"] = str(out / CLIP_FILE)
    if (out / SAM_FILE).is_file():
        result.sam = build_sam(model_cfg.sam, str(out / SAM_FILE)).eval()
        measured = measure_sam(result.sam, sizes, eval_seed, world)
        report.setdefault("sam", {}).update(measured)
        report["sam"]["parameters"] = _num_params(result.sam)
        result.files["sam"] = str(out / SAM_FILE)
    report["measured_files"] = True
    result.report = report
    return result


def _row_table(title: str, values: dict[str, float], fmt: str = "{:.1f}") -> list[str]:
    """A blank line and a one-row markdown table: ``title`` then one column per key."""
    return [
        "",
        f"| {title} | " + " | ".join(values) + " |",
        "|---" * (len(values) + 1) + "|",
        "| | " + " | ".join(fmt.format(v) for v in values.values()) + " |",
    ]


def _situation_table(miou: dict[str, float]) -> list[str]:
    """Prompts as rows, all objects and each situation as columns (- where none)."""
    situations = [k.split("/")[1] for k in miou if k.startswith("objects/")]
    lines = ["| prompt | all | " + " | ".join(situations) + " |"]
    lines.append("|---" * (len(situations) + 2) + "|")
    for name, value in miou.items():
        if "/" in name or name == "objects":
            continue
        cells = [f"{miou[f'{name}/{s}']:.1f}" if f"{name}/{s}" in miou else "-" for s in situations]
        lines.append(f"| {name} | {value:.1f} | " + " | ".join(cells) + " |")
    counts = [str(miou["objects"]), *(str(miou[f"objects/{s}"]) for s in situations)]
    lines.append("| objects | " + " | ".join(counts) + " |")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    lines = ["# Miniature foundations: what they learnt", ""]
    lines.append(
        f"Held-out scenes: {report['eval_split']} seeds; threads: {report['threads']}; "
        f"torch {report['torch']}."
    )
    clip = report.get("clip")
    if clip:
        t = clip["training"]
        phases = " + ".join(f"{p['steps']} at {p['image_size']} px" for p in t["phases"])
        title = (
            f"## CLIP ({clip['parameters']:,} parameters; {phases}, batches of "
            f"{clip['settings']['batch_size']} captions; {t['seconds'] / 60:.1f} min)"
        )
        lines += ["", title, ""]
        if "retrieval" in clip:
            lines += ["| retrieval | top-1 (%) |", "|---|---|"]
            lines += [f"| {k} | {v:.1f} |" for k, v in clip["retrieval"].items()]
            lines += ["", "| one-word hard pairs (chance 50) | text->image | image->text |"]
            lines += ["|---|---|---|"]
            for k, v in clip["hard_pairs"].items():
                if "text_to_image" in v:
                    lines.append(f"| {k} | {v['text_to_image']:.1f} | {v['image_to_text']:.1f} |")
            for key in ("shape/per_word", "colour/per_word"):
                lines += _row_table(f"{key} (hard-pair accuracy, %)", clip["hard_pairs"][key])
            for key in ("shape_auc", "shape_top1", "colour_auc", "colour_top1"):
                fmt = "{:.3f}" if "auc" in key else "{:.1f}"
                lines += _row_table(f"single objects: {key}", clip["word_auc"][key], fmt)
            for key, recall in clip["patch_probe"].items():
                lines += _row_table(f"patch probe {key} (%)", recall)
    sam = report.get("sam")
    if sam:
        t = sam["training"]
        settings = sam["settings"]
        world, multimask = settings.get("world", "flat"), settings.get("multimask", False)
        title = (
            f"## SAM ({sam['parameters']:,} parameters; {t['steps']} steps of "
            f"{settings['images_per_step']} scenes of the {world} world"
            f"{', lone clicks on three outputs (multimask)' if multimask else ''}; "
            f"{t['seconds'] / 60:.1f} min)"
        )
        lines += ["", title, ""]
        if "miou" in sam:
            lines += ["| prompt | mIoU (%) |", "|---|---|"]
            lines += [f"| {k} | {v:.1f} |" for k, v in sam["miou"].items() if k != "objects"]
            lines += ["", f"{sam['miou']['objects']} objects."]
        for key in sorted(k for k in sam if k.startswith("miou_")):
            lines += ["", f"### {key[len('miou_') :]} world: mIoU (%) per situation", ""]
            lines += _situation_table(sam[key])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> FoundationsResult:
    args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO,
    )
    torch.set_num_threads(args.threads)
    overrides = ["model.preset=tiny", *args.overrides]
    bad = [o for o in args.overrides if not o.startswith("model.")]
    if bad:
        raise SystemExit(f"only model.* overrides apply here, got {bad}")
    model_cfg = load_config(None, overrides).model
    clip_cfg, sam_cfg = _settings(args)
    sizes = None if args.no_eval else (QUICK_EVAL if args.quick else EvalSizes())
    offset = TEST_SEED_OFFSET if args.eval_split == "test" else VALIDATION_SEED_OFFSET
    eval_seed = args.seed + offset
    out = Path(args.out)
    report: dict[str, Any] = {
        "command": " ".join(
            ["python scripts/pretrain_foundations.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "eval_split": args.eval_split,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "model": {"clip": _architecture(model_cfg.clip), "sam": _architecture(model_cfg.sam)},
    }
    if args.evaluate:
        result = evaluate_files(model_cfg, out, sizes or EvalSizes(), eval_seed, report, args.world)
        _write_report(report, out, "report")
        return result
    result = FoundationsResult()
    if args.only in (None, "clip"):
        result.clip, report["clip"] = run_clip(model_cfg.clip, clip_cfg, sizes, eval_seed)
        path = out / CLIP_FILE
        _save(result.clip.state_dict(), path, args.fp32)
        result.files["clip"] = str(path)
    if args.only in (None, "sam"):
        result.sam, report["sam"] = run_sam(model_cfg.sam, sam_cfg, sizes, eval_seed)
        path = out / SAM_FILE
        _save(result.sam.state_dict(), path, args.fp32)
        result.files["sam"] = str(path)
    _write_report(report, out, "report" if args.only is None else f"report_{args.only}")
    result.report = report
    logger.info("wrote %s", ", ".join(result.files.values()))
    return result


def _write_report(report: dict[str, Any], out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(format_report(report))
    logger.info("wrote %s", out / f"{stem}.md")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
