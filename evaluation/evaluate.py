"""Evaluate a trained Prompt-RIS checkpoint: oIoU, mIoU, P@X, ImgAcc, InstAcc per split.

Usage (one CPU, one GPU or many processes, as ``accelerate config`` describes):

    accelerate launch evaluation/evaluate.py --checkpoint checkpoints/refcoco_combined/best \
        --splits refcoco:val,refcoco:testA,refcoco:testB [--config configs/x.yaml] [key=value ...]
    accelerate launch evaluation/evaluate.py --checkpoint ... --splits refcoco:val --no-mask
    accelerate launch evaluation/evaluate.py --checkpoint ... --switches "mask + text"
    accelerate launch evaluation/evaluate.py --checkpoint ... --splits refcoco:val --prompt-ablation
    accelerate launch evaluation/evaluate.py --checkpoint ... --splits refcoco:val \
        --every-switch-set
    accelerate launch evaluation/evaluate.py --checkpoint ... --save-masks --overlays 8 \
        --overlay-order worst --output outputs/run1

The model (architecture, learned weights, its prompt switches ``model.prompts.switches``) comes
from the checkpoint; so do the data paths and evaluation settings (the ``data`` and ``eval``
sections of its ``config.json``, relative paths found from the checkpoint's folder), unless
``--config`` and ``key=value`` overrides (``data.prepared=...``, ``eval.batch_images=4``) say
otherwise; the flags below override ``eval.*``.
The prompts reaching SAM are the checkpoint's own unless ``--switches`` or ``--no-<prompt>`` says
otherwise. Every sentence of every reference of each split is scored for the coarse (CLIP) and the
final (SAM) mask, beside the random-object baseline, by ``prompt_ris.engine.evaluation.evaluate``;
metric conventions: evaluation/README.md. Writes ``results.json`` (the schema of
``paper_results.json``; compare with ``evaluation/compare.py``), ``results.md`` (also printed),
``records.jsonl``, and optionally ``masks.jsonl`` (COCO RLE) and ``overlays/``. ``--prompt-
ablation`` also scores every split with each prompt type switched off in turn (the paper's Table 5;
SAM's prompt and decoder side only run again), under ``"ablation"`` in ``results.json`` and as a
table.

Before the model is loaded, the checkpoint, its base weights, every split and the output folder
are checked; each problem is printed as one line with its fix (exit status 1; ``-v`` shows
tracebacks). The outputs are written after each split, so an interruption keeps the splits done
(``"complete": false`` in results.json until the end), and an error met while scoring (an
unreadable image) is one line naming the record's ids. Runs into the same folder merge by split
(``prompt_ris.engine.results_folder``): this run's splits replace those of earlier runs, the
others are kept (and logged); a folder holding results of another checkpoint, prompt switch set
or threshold is refused before the model loads. The default output folder is
``<checkpoint's folder>/eval/<checkpoint name>`` (``checkpoints/run/eval/best`` for
``checkpoints/run/best``): beside the exports, which training replaces, not inside them.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prompt_ris.prompt_switches import PROMPT_TYPES

if TYPE_CHECKING:  # the heavy imports happen in main(), after the arguments are parsed
    from prompt_ris.config import Config, ConfigError
    from prompt_ris.engine.evaluation import EvaluationResults

logger = logging.getLogger("evaluate")

PROG = "evaluate.py"


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
    parser.add_argument(
        "--switches",
        help="prompts reaching SAM, e.g. 'mask + text' (default: the checkpoint's "
        "model.prompts.switches)",
    )
    for prompt in PROMPT_TYPES:
        parser.add_argument(f"--no-{prompt}", action="store_true", help=f"no {prompt} prompt")
    parser.add_argument(
        "--prompt-ablation",
        action="store_true",
        help="also score each split with each prompt type switched off in turn",
    )
    parser.add_argument(
        "--every-switch-set",
        action="store_true",
        help="also score each split with every other set of prompts, none included (the eight "
        "rows of Table 5)",
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


def checkpoint_config(checkpoint: str) -> Config | None:
    """The checkpoint's own config (paths resolved from its folder) without its
    ``eval.output_dir``, or None when it cannot be read (the pre-run checks say why)."""
    from prompt_ris.models.pretrained import CheckpointError, read_checkpoint

    try:
        cfg = read_checkpoint(checkpoint).config
    except (FileNotFoundError, CheckpointError):
        return None
    cfg.eval.output_dir = None  # the default folder is beside the checkpoint evaluated now
    return cfg


def resolve_config(
    args: argparse.Namespace, errors: list[ConfigError] | None = None, base: Config | None = None
) -> Config:
    """``base`` (the checkpoint's own config, else the defaults) <- --config <- overrides <-
    flags. The model section is the checkpoint's. With ``errors``, problems are collected there
    instead of raised."""
    from prompt_ris.config import ConfigError, load_config
    from prompt_ris.prompt_switches import PromptSwitches, SwitchesError

    cfg = load_config(args.config, args.overrides, errors, base=base)
    ev = cfg.eval
    if args.splits:
        ev.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    ev.save_masks = ev.save_masks or args.save_masks
    ev.num_overlays = ev.num_overlays if args.overlays is None else args.overlays
    ev.overlay_order = args.overlay_order or ev.overlay_order
    problems = []
    if ev.overlay_order not in ("first", "worst"):
        problems.append(f"eval.overlay_order must be 'first' or 'worst', got '{ev.overlay_order}'")
    if args.switches is not None:
        try:
            PromptSwitches.parse(args.switches)
        except SwitchesError as err:
            problems.append(f"--switches: {err}")
    ev.output_dir = args.output or ev.output_dir or str(default_output(args.checkpoint))
    for problem in problems:
        if errors is None:
            raise ValueError(problem)
        errors.append(ConfigError(problem))
    return cfg


def switch_sets(args: argparse.Namespace, default: Any) -> list[Any]:
    """The switch sets to score: ``--switches`` (else the checkpoint's ``default``) less the
    ``--no-<prompt>`` types, then, with ``--prompt-ablation``, each of its types off in turn,
    and with ``--every-switch-set`` every other set in Table 5's order."""
    from prompt_ris.prompt_switches import PromptSwitches, parse_switch_sets

    base = default if args.switches is None else PromptSwitches.parse(args.switches)
    base = base.without(*(t for t in PROMPT_TYPES if getattr(args, f"no_{t}")))
    sets = base.ablation() if args.prompt_ablation else [base]
    return parse_switch_sets(sets + (PromptSwitches.every() if args.every_switch_set else []))


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
    from prompt_ris.engine.preflight import evaluation_problems, one_line, report
    from prompt_ris.models.pretrained import CheckpointError

    errors: list[ConfigError] = []
    base = checkpoint_config(args.checkpoint)
    cfg = resolve_config(args, errors, base)
    problems = evaluation_problems(
        cfg, args.checkpoint, args.clip_weights, args.sam_weights, config_errors=errors
    )
    if base is not None and not errors:
        problems += merge_problems(args, cfg, base)
    if problems:
        report(PROG, problems, before="loading the model")
        raise SystemExit(1)
    try:
        return run_evaluation(args, cfg)
    except (ConfigError, CheckpointError, OSError) as err:
        if args.verbose:
            raise
        report(PROG, [f"{failure_line(err, Path(cfg.eval.output_dir))} (-v shows the traceback)"])
        raise SystemExit(1) from None


def merge_problems(args: argparse.Namespace, cfg: Config, base: Config) -> list[str]:
    """Why this run's results cannot merge with those already in the output folder."""
    import dataclasses

    from prompt_ris.engine.results_folder import merge_problem
    from prompt_ris.prompt_switches import PromptSwitches

    main_set = switch_sets(args, PromptSwitches.parse(base.model.prompts.switches))[0]
    settings = dataclasses.asdict(cfg.eval)
    problem = merge_problem(cfg.eval.output_dir, str(args.checkpoint), main_set.name, settings)
    return [problem] if problem else []


def failure_line(err: Exception, out_dir: Path) -> str:
    """One line for an error met while evaluating: what failed (for a dataset image, its
    record's ids), what was kept and how to go on."""
    from prompt_ris.data.transforms import ImageLoadError
    from prompt_ris.engine.preflight import one_line
    from prompt_ris.engine.results_folder import RESULTS_NAME, read_results

    text = str(err).strip()
    if "Original Traceback" in text:  # raised in a DataLoader worker: its last line is the error
        text = text.splitlines()[-1].split(": ", 1)[-1]
    line = one_line(text)
    if not isinstance(err, ImageLoadError):
        return line
    try:
        kept = list((read_results(out_dir) or {"splits": {}})["splits"])
    except ValueError:
        kept = []
    scored = f"{', '.join(kept)} kept in '{out_dir / RESULTS_NAME}'" if kept else "no split scored"
    return (
        f"{line} ({scored}); replace the image (or set data.image_dir to a complete copy) and "
        "run again to the same --output: the splits scored are merged, not lost"
    )


def run_evaluation(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    """Load the model, score every split and write the outputs as each split is done."""
    import torch
    from accelerate import Accelerator

    from prompt_ris.engine.evaluation import append_records, evaluate, write_results
    from prompt_ris.engine.results_folder import RESULTS_NAME, start_outputs
    from prompt_ris.models import PromptRIS

    # cpu=True on a machine without CUDA: there, `accelerate launch --multi_gpu` gives gloo DDP.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = PromptRIS.from_pretrained(args.checkpoint, args.clip_weights, args.sam_weights)
    out_dir, ev = Path(cfg.eval.output_dir), cfg.eval
    earlier = None
    if accelerator.is_main_process:  # the splits of earlier runs into this folder are kept
        earlier = start_outputs(out_dir, ev.splits, ev.save_masks)

    def written(split: str, results: EvaluationResults) -> None:
        results.checkpoint = str(args.checkpoint)
        if accelerator.is_main_process:  # written now: a later failure keeps this split
            append_records(out_dir, results.records[split], ev.save_masks)
            write_results(out_dir, results, earlier)
            logger.info("%s scored; results so far in %s", split, out_dir / RESULTS_NAME)

    results = evaluate(
        model, ev.splits, switch_sets(args, model.default_switches), config=cfg,
        accelerator=accelerator, overlay_dir=out_dir / "overlays", on_split=written,
    )  # fmt: skip
    results.checkpoint = str(args.checkpoint)
    if accelerator.is_main_process:
        write_results(out_dir, results, earlier)
        accelerator.print(results.table())
        accelerator.print(f"\nresults written to {out_dir}")
    accelerator.wait_for_everyone()
    return results.to_dict()


if __name__ == "__main__":
    main()
