"""Benchmark Prompt-RIS: training and inference throughput, single-request latency, peak memory.

Usage (speed does not depend on the weights, so the model has random weights; nothing is read):

    python scripts/benchmark.py --out outputs/bench/h100.json --reference          # vit_b, GPU
    python scripts/benchmark.py --preset tiny --device cpu --steps 2 --warmup 1 --reference

Measured on synthetic batches of ``--images`` x ``--expressions`` (16 x 4 for vit_b, 2 x 2 for
tiny by default):

- ``train_stage1`` / ``train_stage2``: expressions/s of one optimizer step (forward, the
  ``stage_loss`` of eq. 9, backward, AdamW), stage 1 without SAM;
- ``train_stage2_cached``: stage 2 with F_IS read from a ``SamEmbeddingCache`` (fast path only);
- ``inference``: expressions/s of a batched eval forward with original-size masks;
- ``latency``: one new image + one expression, end to end from letterboxed tensors on the device
  (SAM encoder included) to the thresholded original-size mask; median over the repeats.

The fast path is SDPA in the SAM image encoder, ``--dtype`` autocast (bf16 on CUDA), the
SAM encoder once per image, and optionally ``--compile``. ``--reference`` also runs, in the same
process and with the same weights, the straightforward path: fp32, the libraries' own attention,
the SAM encoder once per expression. Every figure then has its speed-up ratio. Warm-up steps are
excluded; a timed training step never waits for the device except for the final synchronize
(``host_syncs_per_step`` counts the waits the model and the losses themselves cause, on CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import logging
import math
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prompt_ris.config import Config, load_config
from prompt_ris.data.batch import Batch, ModelInputs, random_batch
from prompt_ris.losses import Stage, stage_loss
from prompt_ris.models import PromptRIS, PromptRISOutput
from prompt_ris.models.embedding_cache import SamEmbeddingCache
from prompt_ris.models.fast_attention import use_sdpa_in_sam_encoder

logger = logging.getLogger("benchmark")

GIB = 2**30
SEED = 0
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BATCH_DEFAULTS = {"vit_b": (16, 4), "tiny": (2, 2)}  # (I, b): the paper's batch; a CPU smoke run
TARGET_NOTE = "targets are for --preset vit_b on an H100 at 16 x 4"


@dataclass(frozen=True)
class Target:
    """A goal for one figure: ``value <op> bound``."""

    measurement: str
    metric: str
    op: str  # ">=" or "<"
    bound: float
    needs_16x4: bool


TARGETS = (
    Target("train_stage2", "expr_per_s", ">=", 300.0, True),
    Target("train_stage1", "expr_per_s", ">=", 450.0, True),
    Target("inference", "expr_per_s", ">=", 200.0, False),
    Target("latency", "ms", "<", 25.0, False),
    Target("train_stage2", "peak_mem_gib", "<", 40.0, True),
)


@dataclass(frozen=True)
class Variant:
    """One way of running the model: the fast path or the straightforward reference."""

    name: str  # "fast" or "reference"
    sdpa: bool  # SDPA in the SAM image encoder (else segment_anything's own attention)
    dtype: torch.dtype  # autocast dtype; float32 = no autocast
    sam_per_expression: bool  # SAM encoder once per expression (else once per image)
    compile: bool


@dataclass
class Context:
    """What every measurement needs."""

    cfg: Config
    args: argparse.Namespace
    device: torch.device
    meta: dict[str, Any]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="vit_b", choices=sorted(BATCH_DEFAULTS))
    parser.add_argument("--images", type=int, help="I images per batch (vit_b 16, tiny 2)")
    parser.add_argument("--expressions", type=int, help="b per image (vit_b 4, tiny 2)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="fast path autocast (default bf16 on CUDA, else "
        "fp32: CPUs without native bf16 run it many times slower)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    parser.add_argument("--reference", action="store_true", help="also time the plain path")
    parser.add_argument("--profile", action="store_true", help="write torch.profiler tables")
    parser.add_argument("--out", default="outputs/benchmark/benchmark.json", help="JSON file")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. model.cmp.num_prompts=8"
    )
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    images, expressions = BATCH_DEFAULTS[args.preset]
    args.images = images if args.images is None else args.images
    args.expressions = expressions if args.expressions is None else args.expressions
    if min(args.images, args.expressions, args.steps) < 1 or args.warmup < 0:
        parser.error("--images, --expressions and --steps must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def slice_images(batch: Batch, images: int, expressions: int) -> Batch:
    """The first ``images`` images with their first ``expressions`` expressions each."""
    per_image = int((batch.image_index == 0).sum())
    rows = torch.cat([torch.arange(expressions) + i * per_image for i in range(images)])
    rows = rows.to(batch.image_index.device)
    per_expression = {
        name: getattr(batch, name)[rows]
        for name in ("text_tokens", "image_index", "object_ids", "gt_masks", "ref_ids",
                     "sent_ids", "image_ids", "category_ids", "word_masked")
    }  # fmt: skip
    per_image_fields = {
        name: getattr(batch, name)[:images]
        for name in ("clip_images", "sam_images", "input_sizes", "orig_sizes")
    }
    texts = [batch.texts[k] for k in rows.tolist()]
    return Batch(**per_expression, **per_image_fields, texts=texts)


# --------------------------------------------------------------------------------------------
# The two paths
# --------------------------------------------------------------------------------------------
def build_model(cfg: Config, variant: Variant, device: torch.device) -> PromptRIS:
    torch.manual_seed(SEED)  # the same weights for both variants
    model = PromptRIS.from_config(cfg.model)
    use_sdpa_in_sam_encoder(model, enabled=variant.sdpa)
    return model.to(device)


def autocast(variant: Variant, device: torch.device) -> contextlib.AbstractContextManager:
    if variant.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=variant.dtype)


def run_model(
    model: Callable[..., PromptRISOutput],
    raw: PromptRIS,
    batch: Batch,
    variant: Variant,
    with_sam: bool,
    sam_img_embed: torch.Tensor | None = None,
) -> PromptRISOutput:
    """One forward. The reference encodes the SAM image once per expression, image by image."""
    if not (variant.sam_per_expression and with_sam):
        return model(batch, with_sam=with_sam, sam_img_embed=sam_img_embed)
    index = batch.image_index
    per_expression = torch.cat(  # (B, D_S, h_s, w_s): upstream attention holds (nh, N, N) maps
        [raw.encode_sam(batch.sam_images[i : i + 1]) for i in index.tolist()]
    )
    inputs = ModelInputs(  # every expression with its own copy of its image
        clip_images=batch.clip_images[index],
        sam_images=batch.sam_images[index],
        text_tokens=batch.text_tokens,
        image_index=torch.arange(index.numel(), device=index.device),
    )
    return model(inputs, with_sam=True, sam_img_embed=per_expression)


class Runner:
    """Calls the model, compiled when asked; falls back to eager (with a warning) on failure."""

    def __init__(
        self, model: PromptRIS, compile_model: bool, backend: str | Callable = "inductor"
    ) -> None:
        self.model = model
        self.compiled = False
        self._call: Callable[..., PromptRISOutput] = model
        if compile_model:
            try:
                self._call = torch.compile(model, backend=backend)
                self.compiled = True
            except Exception as err:  # a platform or backend without compiler support
                logger.warning("torch.compile failed (%s); running eagerly", err)

    def __call__(self, *args: Any, **kwargs: Any) -> PromptRISOutput:
        return self._call(*args, **kwargs)

    def first_step(self, step: Callable[[], Any]) -> None:
        """Run ``step`` once; if compiling breaks it, warn and go on eagerly."""
        if not self.compiled:
            step()
            return
        try:
            step()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # dynamo / inductor errors surface at the first call
            logger.warning("torch.compile failed at the first step (%s); running eagerly", err)
            self._call, self.compiled = self.model, False
            step()


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def count_host_syncs(step: Callable[[], Any], device: torch.device) -> int | None:
    """Synchronising CUDA calls made by one (untimed) step, from torch's sync debug mode."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def time_steps(
    step: Callable[[], Any], runner: Runner, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """Warm up (compiling, if asked, in the first call), then time ``args.steps`` calls between
    two device synchronisations, with the peak memory of the timed calls."""
    for i in range(max(args.warmup, 1 if runner.compiled else 0)):
        runner.first_step(step) if i == 0 else step()
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "ms_per_step": 1e3 * seconds / args.steps,
        "peak_mem_gib": peak_gib(device),
        "compiled": runner.compiled,
    }


def write_profile(step: Callable[[], Any], steps: int, device: torch.device, out: Path) -> None:
    """Top ops by self device time (CUDA) and by self CPU time over ``steps`` calls."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    averages = prof.key_averages()
    parts = []
    if device.type == "cuda":
        parts += [
            "# top ops by self CUDA time",
            averages.table("self_device_time_total", row_limit=30),
        ]
    parts += ["# top ops by self CPU time", averages.table("self_cpu_time_total", row_limit=30)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(parts) + "\n")
    logger.info("profile written to %s", out)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
def measure_training(
    runner: Runner,
    batch: Batch,
    variant: Variant,
    ctx: Context,
    stage: Stage,
    cache: SamEmbeddingCache | None = None,
) -> dict[str, Any]:
    """Expressions/s of full optimizer steps (forward, eq. 9 loss, backward, AdamW)."""
    model = runner.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=ctx.cfg.train.lr,
        weight_decay=ctx.cfg.train.weight_decay,
        fused=ctx.device.type == "cuda" and variant.name == "fast",
    )
    keys = [str(i) for i in range(batch.num_images)]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        embed = None if cache is None else cache.get(keys, ctx.device, variant.dtype)
        with autocast(variant, ctx.device):
            full = stage == Stage.FULL
            out = run_model(runner, model, batch, variant, with_sam=full, sam_img_embed=embed)
        loss, _ = stage_loss(out, batch, stage, ctx.cfg.train.icl_weight)
        loss.backward()
        optimizer.step()

    result = time_steps(step, runner, ctx.args, ctx.device)
    result["expr_per_s"] = ctx.args.steps * batch.num_expressions / result["seconds"]
    result["host_syncs_per_step"] = count_host_syncs(step, ctx.device)
    return result | {"_step": step}


def inference_step(runner: Runner, batch: Batch, variant: Variant, ctx: Context) -> Callable:
    """An eval forward down to thresholded original-size masks, B x (H, W) bool."""
    model = runner.model.eval()

    def step() -> list[torch.Tensor]:
        with torch.inference_mode(), autocast(variant, ctx.device):
            out = run_model(runner, model, batch, variant, with_sam=True)
            logits = model.original_logits(
                out, batch.input_sizes, batch.orig_sizes, batch.image_index, ("final",)
            )["final"]  # B x (H, W)
            return [mask > 0 for mask in logits]

    return step


def measure_inference(
    runner: Runner, batch: Batch, variant: Variant, ctx: Context
) -> dict[str, Any]:
    """Expressions/s of batched eval forwards (I images x b expressions per call)."""
    step = inference_step(runner, batch, variant, ctx)
    result = time_steps(step, runner, ctx.args, ctx.device)
    result["expr_per_s"] = ctx.args.steps * batch.num_expressions / result["seconds"]
    return result | {"_step": step}


def measure_latency(runner: Runner, batch: Batch, variant: Variant, ctx: Context) -> dict[str, Any]:
    """Milliseconds for one new image + one expression, each request timed on its own."""
    step = inference_step(runner, slice_images(batch, 1, 1), variant, ctx)
    for i in range(max(ctx.args.warmup, 1 if runner.compiled else 0)):
        runner.first_step(step) if i == 0 else step()
    reset_peak(ctx.device)
    times = []
    for _ in range(ctx.args.steps):
        synchronize(ctx.device)
        start = time.perf_counter()
        step()
        synchronize(ctx.device)
        times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    median = statistics.median(times)
    return {
        "ms": median,
        "ms_p90": times[math.ceil(0.9 * len(times)) - 1],
        "ms_mean": statistics.fmean(times),
        "expr_per_s": 1e3 / median,
        "peak_mem_gib": peak_gib(ctx.device),
        "compiled": runner.compiled,
        "_step": step,
    }


def measure_cached_training(runner: Runner, batch: Batch, variant: Variant, ctx: Context) -> dict:
    """Stage 2 with F_IS read from a filled SamEmbeddingCache (as from the second epoch on)."""
    model = runner.model
    if not model.sam.freeze_image_encoder:
        return {"skipped": "the SAM image encoder is trainable (model.sam.freeze_image_encoder)"}
    keys = [str(i) for i in range(batch.num_images)]
    with tempfile.TemporaryDirectory() as folder:
        cache = SamEmbeddingCache(folder, "benchmark", max_memory_items=len(keys))
        with torch.no_grad(), autocast(variant, ctx.device):
            cache.encode(keys, batch.sam_images, model.encode_sam)
        return measure_training(runner, batch, variant, ctx, Stage.FULL, cache)


# --------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------
UNITS = {
    "train_stage1": "expr/s",
    "train_stage2": "expr/s",
    "train_stage2_cached": "expr/s",
    "inference": "expr/s",
    "latency": "ms",
}
COMPARED_WITH = {"train_stage2_cached": "train_stage2"}  # the reference has no cache


MEASURES: dict[str, Callable[..., dict[str, Any]]] = {
    "train_stage1": functools.partial(measure_training, stage=Stage.COARSE),
    "train_stage2": functools.partial(measure_training, stage=Stage.FULL),
    "train_stage2_cached": measure_cached_training,
    "inference": measure_inference,
    "latency": measure_latency,
}


def run_variant(variant: Variant, batch: Batch, ctx: Context) -> dict[str, dict[str, Any]]:
    """All measurements of one variant; the model is freed before the next variant is built."""
    runner = Runner(build_model(ctx.cfg, variant, ctx.device), variant.compile)
    results = {}
    for name, measure in MEASURES.items():
        if name == "train_stage2_cached" and variant.name != "fast":
            continue  # the straightforward path has no cache
        results[name] = run_guarded(name, measure, runner, batch, variant, ctx)
    del runner
    reset_peak(ctx.device)
    return results


def run_guarded(
    name: str,
    measure: Callable[..., dict[str, Any]],
    runner: Runner,
    batch: Batch,
    variant: Variant,
    ctx: Context,
) -> dict[str, Any]:
    """One measurement; running out of device memory is recorded, not raised."""
    logger.info("%s path: %s", variant.name, name)
    try:
        result = measure(runner, batch, variant, ctx)
    except torch.cuda.OutOfMemoryError as err:
        logger.warning("%s path: %s ran out of device memory", variant.name, name)
        result = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        reset_peak(ctx.device)
    step = result.pop("_step", None)
    if ctx.args.profile and step is not None and variant.name == "fast":
        out = Path(ctx.args.out).parent / f"profile_{name}.txt"
        write_profile(step, min(3, ctx.args.steps), ctx.device, out)
    dtype = "bf16" if variant.dtype == torch.bfloat16 else "fp32"
    return result | {
        "dtype": dtype,
        "sdpa_sam_encoder": variant.sdpa,
        "sam_encoder_per": "expression" if variant.sam_per_expression else "image",
        "command": ctx.meta["command"],
        "device_name": ctx.meta["device_name"],
        "torch_version": ctx.meta["torch_version"],
        "date": now(),
    }


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def compare(fast: dict[str, dict], reference: dict[str, dict] | None) -> dict[str, dict]:
    """Per measurement: both records, the speed-up (fast / reference throughput) and the
    memory ratio (reference / fast peak)."""
    table = {}
    for name, unit in UNITS.items():
        ref = None if reference is None else reference.get(COMPARED_WITH.get(name, name))
        row = {"unit": unit, "fast": fast[name], "reference": ref, "speedup": None}
        row["memory_ratio"] = None
        if ref is not None and fast[name].get("expr_per_s") and ref.get("expr_per_s"):
            row["speedup"] = fast[name]["expr_per_s"] / ref["expr_per_s"]
        if ref is not None and fast[name].get("peak_mem_gib") and ref.get("peak_mem_gib"):
            row["memory_ratio"] = ref["peak_mem_gib"] / fast[name]["peak_mem_gib"]
        table[name] = row
    return table


def check_targets(table: dict[str, dict], args: argparse.Namespace, device: torch.device) -> list:
    """Met / missed per target, on the fast path; ``applies`` says whether the run is the one
    the targets were set for (vit_b on CUDA, 16 x 4 for the training figures)."""
    out = []
    for target in TARGETS:
        value = table[target.measurement]["fast"].get(target.metric)
        met = None
        if value is not None:
            met = value >= target.bound if target.op == ">=" else value < target.bound
        applies = args.preset == "vit_b" and device.type == "cuda"
        if target.needs_16x4:
            applies = applies and (args.images, args.expressions) == (16, 4)
        name = f"{target.measurement}.{target.metric} {target.op} {target.bound:g}"
        out.append({"target": name, "value": value, "met": met, "applies": applies})
    return out


def markdown(report: dict[str, Any]) -> str:
    """The short tables printed at the end."""
    lines = [
        f"{report['meta']['device_name']}, torch {report['meta']['torch_version']}, "
        f"preset {report['meta']['preset']}, {report['meta']['images']} x "
        f"{report['meta']['expressions']}, fast dtype {report['meta']['dtype']}",
        "",
        "| measurement | fast | reference | speed-up | peak GiB fast / reference |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["measurements"].items():
        key = "ms" if row["unit"] == "ms" else "expr_per_s"
        cells = [_fmt(rec, key) for rec in (row["fast"], row["reference"])]
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
        mems = [_fmt(rec, "peak_mem_gib") for rec in (row["fast"], row["reference"])]
        lines.append(
            f"| {name} ({row['unit']}) | {cells[0]} | {cells[1]} | {speedup} | "
            f"{mems[0]} / {mems[1]} |"
        )
    lines += ["", "| target | value | result |", "|---|---|---|"]
    for target in report["targets"]:
        result = {True: "met", False: "missed", None: "n/a"}[target["met"]]
        if not target["applies"]:
            result += f" ({TARGET_NOTE})"
        value = "-" if target["value"] is None else f"{target['value']:.2f}"
        lines.append(f"| {target['target']} | {value} | {result} |")
    return "\n".join(lines)


def _fmt(record: dict[str, Any] | None, key: str) -> str:
    if record is None:
        return "-"
    if "error" in record or "skipped" in record:
        return record.get("error") or "skipped"
    value = record.get(key)
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
    )
    device = torch.device(args.device)
    overrides = [
        f"model.preset={args.preset}",
        "model.clip.pretrained=null",
        "model.sam.checkpoint=null",
        "model.sam.freeze_image_encoder=true",  # the paper's setting, in every preset
        *args.overrides,
    ]
    cfg = load_config(overrides=overrides)
    command = sys.argv[1:] if argv is None else argv
    meta = {
        "command": shlex.join(["python", "scripts/benchmark.py", *command]),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "date": now(),
        "preset": args.preset,
        "images": args.images,
        "expressions": args.expressions,
        "steps": args.steps,
        "warmup": args.warmup,
        "dtype": args.dtype,
        "compile": args.compile,
        "overrides": overrides,
    }
    ctx = Context(cfg=cfg, args=args, device=device, meta=meta)
    batch = random_batch(cfg, args.images, args.expressions, seed=SEED).to(device)
    fast = Variant("fast", True, DTYPES[args.dtype], False, args.compile)
    reference = Variant("reference", False, torch.float32, True, False)
    fast_results = run_variant(fast, batch, ctx)
    reference_results = run_variant(reference, batch, ctx) if args.reference else None
    table = compare(fast_results, reference_results)
    report = {"meta": meta, "measurements": table, "targets": check_targets(table, args, device)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\nwritten to {out}")
    return report


if __name__ == "__main__":
    main()
