"""Cost model of Prompt-RIS: FLOPs and activation memory of training steps and of one request,
and what they imply for a GPU and for the paper's 50-epoch run.

Usage (everything runs on the meta device: shapes only, no memory, no arithmetic, so the full
model takes seconds on a laptop):

    python scripts/cost_model.py --out outputs/cost_model/vit_b.json          # the paper's model
    python scripts/cost_model.py --peak-tflops 312 --out outputs/cost_model/a100.json   # A100
    python scripts/cost_model.py --preset tiny --images 2 --expressions 2     # the test's size

What it counts, with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products,
convolutions and attention; 2 FLOPs per multiply-add; element-wise work, the optimizer and data
loading are not counted). On the meta device attention is decomposed into the two batched matrix
products the counter sees; on a CPU PyTorch's fused attention kernel would run instead and go
uncounted, which is one reason the script uses only the meta device:

- ``stage1``: one training step of ``--images`` x ``--expressions`` (paper: 16 x 4) as the
  trainer runs it: forward without SAM, ``stage_loss`` (eq. 9), backward;
- ``stage2``: the same end to end, SAM's frozen image encoder once per image without gradient
  (``sam_image_encoder`` says how much of it a ``train.sam_embed_cache`` would save), all three
  prompts kept (prompt dropout only removes tokens: an upper bound);
- ``inference``: one request, one new image and one expression, eval mode.

Per expression: step FLOPs / B. Activation memory: the bytes of the distinct tensors autograd
saves for the backward pass (``torch.autograd.graph.saved_tensors_hooks``), parameters
excluded, in the model's dtype (float32; bf16 autocast roughly halves it), per expression.

From those: the **upper bound** on expressions/s of a GPU that sustains ``--peak-tflops`` (dense
bf16; default 989, an H100/H200 SXM) for these FLOPs, i.e. at 100 % utilisation, and the same at
``--utilization`` (an assumption, not a measurement), and the hours of the paper's run (20
epochs of stage 1 + 30 of stage 2 of 16 x 4 steps) for each ``train.epoch_unit`` and for the
smallest and the largest combined training set that the published split sizes allow
(``data.schedule.combined_train_size_bounds``). Writes ``--out`` (JSON) and the same stem
``.md`` (the table, also printed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prompt_ris.config import MODEL_PRESETS, Config, load_config
from prompt_ris.data.batch import Batch, random_batch
from prompt_ris.data.schedule import EPOCH_UNITS, combined_train_size_bounds
from prompt_ris.losses import Stage, stage_loss
from prompt_ris.models import PromptRIS

H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 / H200 SXM (989.4 TFLOP/s)
PAPER_BATCH = (16, 4)  # I images x b expressions per step
PAPER_EPOCHS = (20, 30)  # stage 1, stage 2
DEVICE = "meta"
PARTS = ("clip", "decoder", "sam", "text_prompter")  # top-level modules of PromptRIS


@dataclass
class Count:
    """FLOPs and saved activations of one measured computation."""

    flops: int  # forward (+ loss + backward for training steps)
    saved_bytes: int  # distinct tensors saved for backward, parameters and buffers excluded
    expressions: int
    images: int
    flops_by_part: dict[str, int]  # clip, decoder, sam, text_prompter, sam_image_encoder, other

    @property
    def flops_per_expression(self) -> float:
        return self.flops / self.expressions

    @property
    def saved_bytes_per_expression(self) -> float:
        return self.saved_bytes / self.expressions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit_b", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--images", type=int, default=PAPER_BATCH[0], help="I per step (16)")
    parser.add_argument("--expressions", type=int, default=PAPER_BATCH[1], help="b (4)")
    parser.add_argument(
        "--peak-tflops", type=float, default=H100_BF16_TFLOPS,
        help="GPU peak dense bf16 TFLOP/s (default 989: H100/H200 SXM)",
    )  # fmt: skip
    parser.add_argument(
        "--utilization", type=float, default=0.4,
        help="share of the peak assumed reachable, for the second set of estimates (0.4)",
    )  # fmt: skip
    parser.add_argument("--out", default="outputs/cost_model/cost_model.json", help="JSON file")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. model.cmp.num_prompts=4"
    )
    args = parser.parse_args(argv)
    if min(args.images, args.expressions) < 1 or args.peak_tflops <= 0:
        parser.error("--images and --expressions must be >= 1, --peak-tflops > 0")
    if not 0 < args.utilization <= 1:
        parser.error("--utilization must be in (0, 1]")
    return args


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------
def build_model(cfg: Config) -> PromptRIS:
    """The model on the meta device: shapes without weights (costs do not depend on them); the
    config's weight files are not read."""
    cfg.model.clip.pretrained = None
    cfg.model.sam.checkpoint = None
    with torch.device(DEVICE):
        return PromptRIS.from_config(cfg.model)


def count_flops(run: Callable[[], Any], root: str = "") -> tuple[int, dict[str, int]]:
    """FLOPs of ``run()`` in all, and per module (fully qualified names under the root module's
    class name, e.g. ``PromptRIS.sam.image_encoder``; "Global" is the total)."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


@contextlib.contextmanager
def saved_tensor_bytes(model: nn.Module) -> Iterator[dict[str, int]]:
    """Count the bytes of the distinct storages autograd saves for backward inside the block.

    Parameters and buffers are left out (they exist anyway); a storage saved twice (a tensor
    and its view) counts once.
    """
    own = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    seen: set[int] = set()
    result = {"bytes": 0}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in own and key not in seen:
            seen.add(key)
            result["bytes"] += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield result


@contextlib.contextmanager
def autocast_accepts_meta() -> Iterator[None]:
    """Let ``torch.autocast("meta", ...)`` (the losses switch autocast off around ICL) be a no-op:
    autocast has no meta implementation, and there is nothing to cast where nothing runs."""
    real = torch.autocast

    def autocast(device_type: str, *args: Any, **kwargs: Any) -> Any:
        if device_type == "meta":
            return contextlib.nullcontext()
        return real(device_type, *args, **kwargs)

    with mock.patch.object(torch, "autocast", autocast):
        yield


def _storage_key(tensor: torch.Tensor) -> int:
    """An identity of the storage behind a tensor (meta storages have no data pointer)."""
    return tensor.untyped_storage()._cdata


def _by_part(total: int, per_module: dict[str, int]) -> dict[str, int]:
    """FLOPs of the parts of PromptRIS, SAM's image encoder on its own, and the rest."""
    parts = {part: per_module.get(f"PromptRIS.{part}", 0) for part in PARTS}
    parts["sam_image_encoder"] = per_module.get("PromptRIS.sam.image_encoder", 0)
    parts["other"] = total - sum(parts[p] for p in PARTS)  # the losses
    return parts


def count_training_step(model: PromptRIS, batch: Batch, stage: Stage) -> Count:
    """Forward, the stage's loss (eq. 9) and backward of one step, as the trainer runs it."""
    model.train()
    full = stage == Stage.FULL

    def step() -> None:
        out = model(batch, with_sam=full, prompt_dropout=False)  # all prompts: the upper bound
        loss, _ = stage_loss(out, batch, stage, icl_weight=1.0)
        loss.backward()

    with saved_tensor_bytes(model) as saved, autocast_accepts_meta():
        total, per_module = count_flops(step)
    model.zero_grad(set_to_none=True)
    return Count(
        total, saved["bytes"], batch.num_expressions, batch.num_images,
        _by_part(total, per_module),
    )  # fmt: skip


def count_inference(model: PromptRIS, batch: Batch) -> Count:
    """One request: a new image (SAM encoder included) and one expression, eval mode.

    Without ``torch.no_grad()``, which the counter's module tracker does not support: the
    forward's FLOPs are the same, and no backward runs.
    """
    model.eval()
    total, per_module = count_flops(lambda: model(batch, with_sam=True))
    return Count(total, 0, batch.num_expressions, batch.num_images, _by_part(total, per_module))


# --------------------------------------------------------------------------------------------
# What the counts imply
# --------------------------------------------------------------------------------------------
def expressions_per_second(count: Count, peak_tflops: float) -> float:
    """Expressions/s a GPU of ``peak_tflops`` sustains at full utilization for these FLOPs (an
    upper bound)."""
    return peak_tflops * 1e12 / count.flops_per_expression


def paper_run_hours(
    stage1: Count, stage2: Count, peak_tflops: float, utilization: float = 1.0
) -> dict[str, dict[str, list[float]]]:
    """Hours of the 20 + 30 epoch run of 16 x 4 steps, per epoch unit, for the smallest and the
    largest combined training set ([low, high] of the step range each).

    A step of the paper's batch costs (its expressions) x (FLOPs per expression of the counted
    steps): the costs are linear in the batch.
    """
    images, b = PAPER_BATCH
    step_flops = [c.flops_per_expression * images * b for c in (stage1, stage2)]
    rate = peak_tflops * 1e12 * utilization
    hours: dict[str, dict[str, list[float]]] = {}
    for unit in EPOCH_UNITS:
        hours[unit] = {}
        for size in combined_train_size_bounds():
            low, high = size.steps_range(b, images, unit)
            hours[unit][size.name] = [
                sum(e * steps * f for e, f in zip(PAPER_EPOCHS, step_flops)) / rate / 3600
                for steps in (low, high)
            ]
    return hours


def run_steps() -> dict[str, dict[str, Any]]:
    """Steps per epoch and of the whole run, per epoch unit and combined-set bound."""
    images, b = PAPER_BATCH
    table: dict[str, dict[str, Any]] = {}
    for unit in EPOCH_UNITS:
        table[unit] = {}
        for size in combined_train_size_bounds():
            low, high = size.steps_range(b, images, unit)
            table[unit][size.name] = {
                "images": size.images, "expressions": size.expressions,
                "steps_per_epoch": [low, high],
                "steps_total": [sum(PAPER_EPOCHS) * low, sum(PAPER_EPOCHS) * high],
            }  # fmt: skip
    return table


def _tflop(flops: float) -> str:
    return f"{flops / 1e12:.3f}"


def _span(values: list[float], fmt: str) -> str:
    low, high = values
    if round(low, 1) == round(high, 1):
        return fmt.format(low)
    return f"{fmt.format(low)}-{fmt.format(high)}"


def markdown(report: dict[str, Any]) -> str:
    """The tables of a report."""
    counts, peak, util = report["counts"], report["peak_tflops"], report["utilization"]
    batch = f"{report['images']} x {report['expressions']}"
    lines = [
        f"| {batch} per step, {report['preset']} | TFLOP per step | GFLOP per expression | "
        f"saved activations per expression | expressions/s at {peak:g} TFLOP/s (upper bound) | "
        f"at {util:.0%} of it |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("stage1", "stage-1 step"), ("stage2", "stage-2 step"),
                        ("inference", "inference, 1 image + 1 expression")):  # fmt: skip
        c = counts[name]
        saved = f"{c['saved_bytes_per_expression'] / 2**20:.0f} MiB" if name != "inference" else "-"
        lines.append(
            f"| {label} | {_tflop(c['flops'])} | {c['flops_per_expression'] / 1e9:.1f} | {saved} "
            f"| {c['expressions_per_s_upper_bound']:.0f} | "
            f"{c['expressions_per_s_upper_bound'] * util:.0f} |"
        )
    stage2 = counts["stage2"]
    encoder = stage2["flops_by_part"]["sam_image_encoder"]
    how = "forward only: frozen" if report["sam_image_encoder_frozen"] else "trained"
    lines += [
        "",
        f"SAM's image encoder: {encoder / stage2['images'] / 1e9:.1f} GFLOP per image ({how}), "
        f"{encoder / stage2['flops']:.0%} of a stage-2 step (what `train.sam_embed_cache` saves "
        "after the first epoch when it is frozen).",
        "",
        "| epoch unit | combined set | images | expressions | steps per epoch | "
        f"hours of 20 + 30 epochs at {peak:g} TFLOP/s | at {util:.0%} |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for unit, sizes in report["paper_run"]["steps"].items():
        for name, size in sizes.items():
            lines.append(
                f"| {unit} | {name} | {size['images']:,} | {size['expressions']:,} | "
                f"{_span(size['steps_per_epoch'], '{:,.0f}')} | "
                f"{_span(report['paper_run']['hours_at_peak'][unit][name], '{:.1f}')} | "
                f"{_span(report['paper_run']['hours_at_utilization'][unit][name], '{:.1f}')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = load_config({"model": {"preset": args.preset}}, args.overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = random_batch(cfg, args.images, args.expressions).to(DEVICE)
    request = random_batch(cfg, 1, 1, seed=1).to(DEVICE)
    counts = {
        "stage1": count_training_step(model, batch, stage=Stage.COARSE),
        "stage2": count_training_step(model, batch, stage=Stage.FULL),
        "inference": count_inference(model, request),
    }
    report: dict[str, Any] = {
        "command": shlex.join(["scripts/cost_model.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}",
        "torch": torch.__version__,
        "preset": args.preset, "device": DEVICE,
        "sam_image_encoder_frozen": cfg.model.sam.freeze_image_encoder,
        "images": args.images, "expressions": args.expressions,
        "peak_tflops": args.peak_tflops, "utilization": args.utilization,
        "counts": {
            name: {
                **asdict(c), "flops_per_expression": c.flops_per_expression,
                "saved_bytes_per_expression": c.saved_bytes_per_expression,
                "expressions_per_s_upper_bound": expressions_per_second(c, args.peak_tflops),
            }
            for name, c in counts.items()
        },
        "paper_run": {
            "epochs": list(PAPER_EPOCHS), "batch": list(PAPER_BATCH), "steps": run_steps(),
            "hours_at_peak": paper_run_hours(counts["stage1"], counts["stage2"], args.peak_tflops),
            "hours_at_utilization": paper_run_hours(
                counts["stage1"], counts["stage2"], args.peak_tflops, args.utilization
            ),
        },
    }  # fmt: skip
    table = markdown(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"written {out} and {out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
