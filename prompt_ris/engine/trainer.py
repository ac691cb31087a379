"""Training (Sec. 4.2): two stages, AdamW, polynomial lr decay, HuggingFace Accelerate.

One run trains ``train.stage1_epochs`` epochs of stage 1 and then ``train.stage2_epochs`` epochs
of stage 2 (paper: 20 + 30):

- **Stage 1** (CLIP + CMP + ICL): ``model(..., with_sam=False)``, only the coarse mask S_C;
  loss ``L_clipseg + L_icl(coarse)``. SAM and its prompt makers get no gradient and do not move
  (AdamW skips parameters whose gradient is None; under DDP, parameters unused on every process
  keep a None gradient).
- **Stage 2** (end to end): ``model(..., with_sam=True, prompt_dropout=True)``; loss
  ``L_clipseg + L_samseg + L_icl(coarse) + L_icl(final)`` (eq. 9).

AdamW over the parameters with ``requires_grad``; ``lr = lr0 * (1 - step / total) ** 0.9`` per
optimizer step over the whole run (both stages). An optimizer step is ``data.images_per_step``
images x ``data.expressions_per_image`` expressions over all processes (paper: 16 x 4); the
per-process micro-batch and the gradient accumulation follow from the launch
(``data.schedule.plan_steps``), so the steps, the schedule and the images of each step are the
same on any number of processes. Accelerate provides devices, processes, mixed
precision and gradient accumulation, so the same code runs on a CPU, one GPU, several GPUs or
several machines, whatever ``accelerate launch`` is told.

**Validation** runs every ``train.val_every`` epochs (and at the end of each stage) on
``data.val`` (never a test split). The best model (``train.best_metric``, oIoU by default) is
exported to ``<output_dir>/best``: in stage 1 by the coarse mask, from the first stage-2
validation on by the final mask. A stage-2 score always replaces a stage-1 one, because a stage-1
model's SAM path is untrained and its final masks are not what the export is used for.

**Exact resume.** A checkpoint is taken at optimizer-step boundaries and restores model,
optimizer, lr schedule and RNG states; the sampler is deterministic per (seed, epoch), so the
epoch is re-entered by skipping the batches already done. The random draws of the model (prompt
dropout, Gumbel noise) come from torch's generator seeded at every micro-batch from (seed,
process, epoch, micro-batch), so a resumed run draws exactly what an uninterrupted one does,
independently of whatever else (data loader workers, validation) consumed random numbers.

Outputs in ``train.output_dir``: ``config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON
line per log step and validation), ``tensorboard/``, ``checkpoints/`` (resume states, see
``checkpointing``), and the exports ``stage1/``, ``best/`` and ``final/``.

**Launcher choices.** Mixed precision and ``torch.compile`` are what ``accelerate launch`` says
(``--mixed_precision``, ``--dynamo_backend`` or ``accelerate config``) unless the config sets
them: ``train.mixed_precision: auto`` (the default) defers to the launcher when launched by it
and is bf16 where supported otherwise; ``train.compile: null`` (the default) defers to it too.
fp16 on CPU is refused before anything is built (accelerate runs it in float32 there: use bf16 or
no). The log's first line (``launch as applied: ...``) reads back what the prepared run uses:
processes and device, the autocast dtype, ``torch.compile`` and its dynamo backend, the batch
split; a launch asked for several processes that started one says so in a warning.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator, PartialState, skip_first_batches
from accelerate.utils import (
    DistributedDataParallelKwargs,
    parse_flag_from_env,
    send_to_device,
    set_seed,
)
from accelerate.utils.other import is_compiled_module  # not in accelerate.utils at the 1.1.0 floor
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from prompt_ris.config import Config, ConfigError, TrainConfig, config_to_dict, save_config
from prompt_ris.data.batch import Batch
from prompt_ris.data.loader import build_eval_loader, build_train_loader
from prompt_ris.data.schedule import StepPlan, check_epoch_unit, plan_steps
from prompt_ris.engine import checkpointing
from prompt_ris.engine.checkpointing import SaveRequest, TrainerState
from prompt_ris.engine.evaluation import score_loader, summarize_outputs
from prompt_ris.engine.tracking import (
    LossMeter,
    StageProgress,
    append_metrics,
    init_trackers,
    log_overlays,
    log_with,
    project_config,
    trim_metrics,
)
from prompt_ris.losses import Stage, stage_loss
from prompt_ris.models import PromptRIS
from prompt_ris.models.embedding_cache import SamEmbeddingCache, batch_image_keys, sam_cache_prefix
from prompt_ris.models.pretrained import WEIGHTS_NAME

logger = logging.getLogger(__name__)

MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")
BEST_METRICS = ("oIoU", "mIoU")  # train.best_metric choices (metrics.summarize names)
RESUME_NEUTRAL_KEYS = (  # settings a resumed run may change without changing the trajectory
    "output_dir", "log_every", "num_overlays", "save_every_steps", "keep_checkpoints",
    "stop_at_step", "num_workers", "tracker",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Pieces with no state: precision, accelerator, schedule, stage
# --------------------------------------------------------------------------------------------
LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch`
LAUNCHER_DYNAMO_ENV = "ACCELERATE_DYNAMO_BACKEND"
LAUNCHER_CPU_ENV = "ACCELERATE_USE_CPU"  # accelerate launch --cpu
FP16_ON_CPU = "accelerate turns fp16 autocast on only on a GPU"
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp8": "fp8"}


def runs_on_cpu() -> bool:
    """Whether the run's Accelerator is a CPU one: no CUDA, or ``accelerate launch --cpu``."""
    return not torch.cuda.is_available() or parse_flag_from_env(LAUNCHER_CPU_ENV)


def resolve_mixed_precision(setting: str) -> str | None:
    """``train.mixed_precision`` -> accelerate's value; None leaves it to ``accelerate launch``.

    ``auto`` is the launcher's choice (``--mixed_precision`` or ``accelerate config``, which
    ``accelerate launch`` passes on as ``ACCELERATE_MIXED_PRECISION``) when launched by it, else
    bf16 where CUDA supports it. Any other value overrides the launcher, with a warning when
    the launcher said something else. fp16 on CPU is refused, whoever asks for it: accelerate
    turns no autocast on there, so the run would be float32 while reported as fp16.
    """
    if setting not in MIXED_PRECISION_CHOICES:
        raise ConfigError(
            f"train.mixed_precision={setting!r}; choose one of {list(MIXED_PRECISION_CHOICES)}"
        )
    launcher = os.environ.get(LAUNCHER_PRECISION_ENV)
    if setting == "auto":
        if launcher:
            if launcher.lower() == "fp16" and runs_on_cpu():
                raise ConfigError(
                    f"accelerate launch's mixed precision fp16 (--mixed_precision or accelerate "
                    f"config) would run in float32 on CPU: {FP16_ON_CPU}; launch with "
                    "--mixed_precision bf16 or no"
                )
            return None  # Accelerator reads the launcher's choice itself
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if setting == "fp16" and runs_on_cpu():
        raise ConfigError(
            f"train.mixed_precision=fp16 would run in float32 on CPU: {FP16_ON_CPU}; set "
            "train.mixed_precision to bf16, no or auto"
        )
    if launcher and launcher.lower() != setting:
        logger.warning(
            "train.mixed_precision=%s overrides accelerate launch's %s (set it to auto to follow "
            "the launcher)", setting, launcher,
        )  # fmt: skip
    return setting


def resolve_dynamo_backend(compile_: bool | None) -> str | None:
    """``train.compile`` -> accelerate's ``dynamo_backend``; None leaves it to the launcher's
    ``--dynamo_backend`` (``ACCELERATE_DYNAMO_BACKEND``), true is inductor, false no compile."""
    if compile_ is None:
        return None  # Accelerator reads the launcher's choice ("no" without one)
    backend = "inductor" if compile_ else "no"
    launcher = os.environ.get(LAUNCHER_DYNAMO_ENV)
    if launcher and launcher.lower() != backend:
        logger.warning(
            "train.compile=%s overrides accelerate launch's --dynamo_backend %s (set it to null "
            "to follow the launcher)", compile_, launcher.lower(),
        )  # fmt: skip
    return backend


def launch_plan(cfg: Config) -> StepPlan:
    """The step plan for the processes ``accelerate launch`` started (``schedule.plan_steps``):
    checked before anything is built, so a batch that does not divide fails at once."""
    check_epoch_unit(cfg.train.epoch_unit)
    return plan_steps(cfg.data, PartialState(cpu=not torch.cuda.is_available()).num_processes)


def build_accelerator(cfg: Config, accumulation: int = 1) -> Accelerator:
    """The run's Accelerator; processes and devices come from ``accelerate launch``.

    Without CUDA it is a CPU accelerator (``--multi_gpu --num_processes N`` then gives N gloo
    DDP processes). DDP looks for unused parameters because stage 1 leaves SAM's side of the
    model without gradients (and prompt dropout may drop a prompt for a whole batch).
    ``accumulation`` is ``launch_plan(cfg).accumulation``.
    """
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=accumulation,
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, below
        log_with=log_with(cfg.train.tracker),
        project_config=project_config(cfg.train.output_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        dynamo_backend=resolve_dynamo_backend(cfg.train.compile),
    )


def describe_launch(accelerator: Accelerator, model: nn.Module, plan: StepPlan) -> str:
    """What the launch applied, read back from the prepared run: processes and device, the dtype
    autocast computes in, ``torch.compile`` (with its dynamo backend) and the batch split."""
    precision = accelerator.mixed_precision
    if accelerator.native_amp:
        precision = f"{precision} (autocast to {AUTOCAST_DTYPES.get(precision, precision)})"
    else:
        precision = "no (float32)"
    dynamo = accelerator.state.dynamo_plugin
    if any(is_compiled_module(module) for module in model.modules()):  # whole or in regions
        compiled = (
            f"torch.compile with dynamo backend {dynamo.backend.value.lower()} "
            f"(mode {dynamo.mode or 'default'})"
        )
    elif dynamo.backend.value == "NO":
        compiled = "no torch.compile (dynamo backend no)"
    else:
        compiled = f"no torch.compile (dynamo backend {dynamo.backend.value.lower()} not applied)"
    return (
        f"{accelerator.num_processes} process(es) on {accelerator.device}; mixed precision "
        f"{precision}; {compiled}; {plan.describe()}"
    )


def single_process_warning(num_processes: int) -> str | None:
    """A line when ``accelerate launch`` was asked for several processes but started one (with
    ``--cpu``, or without ``--multi_gpu``, it sets ``MASTER_ADDR`` for them but no
    ``WORLD_SIZE``, and runs the script once); None otherwise."""
    env = os.environ
    asked = LAUNCHER_PRECISION_ENV in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env
    if num_processes != 1 or not asked:
        return None
    return (
        "accelerate launch was asked for more than one process (--num_processes) but started 1: "
        "with --cpu, or without --multi_gpu, it runs the script once; this run trains in 1 "
        "process with the same batch. For N processes on this machine, launch with --multi_gpu "
        "--num_processes N and without --cpu (without a GPU they are CPU processes)"
    )


def poly_decay(total_steps: int, power: float) -> Callable[[int], float]:
    """LambdaLR factor ``(1 - step / total_steps) ** power`` (0 from ``total_steps`` on)."""

    def factor(step: int) -> float:
        return (1.0 - min(step, total_steps) / total_steps) ** power

    return factor


def parameter_groups(model: PromptRIS, train_cfg: TrainConfig) -> list[dict[str, Any]]:
    """The trained parameters as AdamW's groups: one at ``train.lr``, or, with
    ``train.text_prompter_lr``, the text prompter's in a second group at that lr."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train_cfg.text_prompter_lr is None:
        return [{"params": params}]
    prompter = {id(p) for p in model.text_prompter.parameters()}
    return [
        {"params": [p for p in params if id(p) not in prompter]},
        {"params": [p for p in params if id(p) in prompter], "lr": train_cfg.text_prompter_lr},
    ]


def stage_of_epoch(epoch: int, cfg: Config) -> Stage:
    """``Stage.COARSE`` for the first ``train.stage1_epochs`` epochs (0-based ``epoch``), then
    ``Stage.FULL``."""
    return Stage.COARSE if epoch < cfg.train.stage1_epochs else Stage.FULL


def check_val_split(name: str) -> None:
    """Refuse model selection on a test split (docs/design.md, "Validation and model selection")."""
    if "test" in name.lower():
        raise ConfigError(
            f"data.val={name!r} is a test split; validation during training picks the best "
            "model and must not see test data. Use a validation split, e.g. data.val=refcoco:val"
        )


def seed_micro_step(seed: int, process_index: int, epoch: int, micro_step: int) -> None:
    """Seed torch (CPU and CUDA) for one micro-batch from (seed, process, epoch, micro-step)."""
    state = np.random.SeedSequence([seed, process_index, epoch, micro_step]).generate_state(2)
    torch.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


# --------------------------------------------------------------------------------------------
# Run state shared by the phases
# --------------------------------------------------------------------------------------------
@dataclass
class TrainRun:
    """Everything the phases of a run share."""

    cfg: Config
    accelerator: Accelerator
    model: nn.Module  # prepared (possibly DDP-wrapped)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    val_loader: Any
    state: TrainerState
    steps_per_epoch: int
    total_steps: int
    output_dir: Path
    plan: StepPlan
    save_request: SaveRequest = field(default_factory=SaveRequest)
    sam_cache: SamEmbeddingCache | None = None  # frozen F_IS on disk (train.sam_embed_cache)
    meter: LossMeter = field(default_factory=LossMeter)
    progress: Any = None

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def num_epochs(self) -> int:
        return self.cfg.train.stage1_epochs + self.cfg.train.stage2_epochs


@dataclass
class TrainResult:
    """What ``train`` returns: the run folder, how far it got, and the trained model."""

    output_dir: Path
    global_step: int
    finished: bool  # False when stopped early by ``train.stop_at_step``
    best_score: float | None
    model: nn.Module  # unwrapped


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def build_loaders(cfg: Config, accelerator: Accelerator) -> tuple[DataLoader, DataLoader]:
    """Training loader (I images x b expressions) and validation loader, sharded per process.

    The samplers shard themselves, so neither loader goes through ``accelerator.prepare``.
    """
    shard = {"num_replicas": accelerator.num_processes, "rank": accelerator.process_index}
    train_loader = build_train_loader(cfg, **shard)
    val_loader = build_eval_loader(cfg, cfg.data.val, limit=cfg.data.max_val_expressions, **shard)
    return train_loader, val_loader


def count_steps_per_epoch(cfg: Config, accelerator: Accelerator, loader: Any) -> int:
    """Optimizer steps per epoch, equal on every process (DDP steps in lockstep).

    The sampler gives every process whole steps (``loader.batch_sampler.steps_per_epoch``, the
    same for any number of processes); ``train.max_steps_per_epoch`` cuts them short.
    """
    batches = torch.tensor([len(loader)], device=accelerator.device)
    all_batches = accelerator.gather(batches).tolist()
    if len(set(all_batches)) != 1:
        raise RuntimeError(
            f"processes have different numbers of training batches {all_batches}; the sampler "
            "must give every process the same number (pad or drop the last images)"
        )
    steps = all_batches[0] // accelerator.gradient_accumulation_steps
    if cfg.train.max_steps_per_epoch is not None:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(
            f"train.max_steps_per_epoch={cfg.train.max_steps_per_epoch} leaves an epoch without "
            "an optimizer step; set it to at least 1 (or null)"
        )
    return steps


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------
def setup_run(cfg: Config, checkpoint: Path | None) -> TrainRun:
    """Accelerator -> seed -> model -> data -> AdamW -> poly schedule -> prepare -> resume
    (from ``checkpoint``, a verified resume checkpoint of the same model, when given)."""
    check_val_split(cfg.data.val)
    if cfg.train.best_metric not in BEST_METRICS:
        raise ConfigError(
            f"train.best_metric={cfg.train.best_metric!r}; choose one of {list(BEST_METRICS)}"
        )
    plan = launch_plan(cfg)
    accelerator = build_accelerator(cfg, plan.accumulation)
    output_dir = Path(cfg.train.output_dir)
    set_seed(cfg.train.seed)
    model = PromptRIS.from_config(cfg.model)  # right after set_seed: the same weights on every run
    with accelerator.main_process_first():
        train_loader, val_loader = build_loaders(cfg, accelerator)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.train),
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        fused=torch.cuda.is_available(),
    )
    steps_per_epoch = count_steps_per_epoch(cfg, accelerator, train_loader)
    total_steps = steps_per_epoch * (cfg.train.stage1_epochs + cfg.train.stage2_epochs)
    scheduler = LambdaLR(optimizer, poly_decay(max(total_steps, 1), cfg.train.poly_power))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainerState()
    if checkpoint is not None:
        state = checkpointing.load_training_state(accelerator, checkpoint)
    run = TrainRun(
        cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
        train_loader=train_loader, val_loader=val_loader, state=state,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, output_dir=output_dir, plan=plan,
        sam_cache=build_sam_cache(cfg, accelerator.unwrap_model(model)),
    )  # fmt: skip
    start_outputs(run, resumed=checkpoint is not None)
    return run


def check_resume_config(cfg: Config, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint of a different model; warn about other changed settings
    that alter the training trajectory."""
    saved_path = checkpoint.parent.parent / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text())
    current = config_to_dict(cfg)
    if saved.get("model") != current["model"]:
        raise ConfigError(
            f"--resume {checkpoint}: its run was trained with another model config "
            f"({saved_path}); give --resume without --config (the run's config.yaml is used), "
            "or the same --config and model overrides"
        )
    changed = [
        f"{section}.{key}"
        for section in ("data", "train")
        for key, value in current[section].items()
        if saved.get(section, {}).get(key) != value and key not in RESUME_NEUTRAL_KEYS
    ]
    if changed:
        logger.warning("resuming with changed settings %s: the run is no longer exact", changed)


def start_outputs(run: TrainRun, resumed: bool) -> None:
    """Resolved config, trackers, metrics file (cut back to the resumed step)."""
    accelerator = run.accelerator
    if accelerator.is_main_process:
        save_config(run.cfg, run.output_dir / "config.yaml")
        if resumed:  # drop what the interrupted run logged after the checkpoint
            trim_metrics(run.output_dir, run.state)
    init_trackers(accelerator, run.output_dir)
    accelerator.log({"config": yaml.safe_dump(config_to_dict(run.cfg), sort_keys=False)}, step=0)
    train_cfg = run.cfg.train
    logger.info("launch as applied: %s", describe_launch(accelerator, run.model, run.plan))
    warning = single_process_warning(accelerator.num_processes)
    if warning:
        logger.warning(warning)
    logger.info(
        "%d epochs (%d stage 1, %d stage 2) of %d steps, %d in all; %d trainable parameters",
        run.num_epochs, train_cfg.stage1_epochs, train_cfg.stage2_epochs, run.steps_per_epoch,
        run.total_steps, sum(p.numel() for p in run.unwrapped.parameters() if p.requires_grad),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def train(cfg: Config, resume: str | None = None) -> TrainResult:
    """Train Prompt-RIS: stage 1 then stage 2, with validation, checkpoints and exports.

    Args:
        cfg: the resolved config (``load_config``).
        resume: None (start fresh), ``"latest"`` (newest checkpoint of ``train.output_dir``) or
            a checkpoint / run folder.

    Returns:
        TrainResult (on every process; ``model`` is the unwrapped, trained model). Resuming a
        run that already finished, with its ``final/`` export written, trains and writes
        nothing: it says so and returns that export.
    """
    output_dir = Path(cfg.train.output_dir)
    checkpoint = checkpointing.resolve_resume(output_dir, resume) if resume else None
    if checkpoint is not None:
        check_resume_config(cfg, checkpoint)
        done = finished_run(cfg, checkpoint)
        if done is not None:
            return done
    run = setup_run(cfg, checkpoint)
    run.save_request.install()
    finished = True
    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            run.progress = StageProgress(
                total=run.total_steps, initial=run.state.global_step, desc="train",
                dynamic_ncols=True, disable=not run.accelerator.is_main_process,
                stage1_steps=run.steps_per_epoch * cfg.train.stage1_epochs,
            )  # fmt: skip
            run.meter = LossMeter()  # time counts from the first step, not from the set-up
            while run.state.epoch < run.num_epochs:
                if not train_one_epoch(run):
                    finished = False
                    break
                end_of_epoch(run)
            run.progress.close()
        if finished:
            export(run, "final", stage_of_epoch(run.num_epochs - 1, cfg), run.num_epochs)
    finally:
        run.save_request.uninstall()
        run.accelerator.end_training()
    return TrainResult(
        output_dir=run.output_dir, global_step=run.state.global_step, finished=finished,
        best_score=run.state.best_score, model=run.unwrapped,
    )  # fmt: skip


def finished_run(cfg: Config, checkpoint: Path) -> TrainResult | None:
    """The result of the run, when ``checkpoint`` is its end (all epochs done) and its
    ``final/`` export exists; None when there is training (or the final export) left to do."""
    state = checkpointing.read_trainer_state(checkpoint)
    output_dir = Path(cfg.train.output_dir)
    final = output_dir / "final"
    num_epochs = cfg.train.stage1_epochs + cfg.train.stage2_epochs
    if state.epoch < num_epochs or not (final / WEIGHTS_NAME).is_file():
        return None
    logger.info(
        "run '%s' already finished at step %d; nothing to do (its final export: %s)",
        output_dir, state.global_step, final,
    )  # fmt: skip
    return TrainResult(
        output_dir=output_dir, global_step=state.global_step, finished=True,
        best_score=state.best_score, model=PromptRIS.from_pretrained(final),
    )  # fmt: skip


def train_one_epoch(run: TrainRun) -> bool:
    """Train the rest of epoch ``run.state.epoch``; False when ``stop_at_step`` stopped it."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    epoch, accum = state.epoch, accelerator.gradient_accumulation_steps
    stage = stage_of_epoch(epoch, cfg)
    if state.step_in_epoch == 0:
        logger.info("epoch %d/%d: stage %d", epoch + 1, run.num_epochs, stage)
    run.model.train()
    run.train_loader.batch_sampler.set_epoch(epoch)  # the same batches on every (re)run
    micro_total = run.steps_per_epoch * accum  # a trailing partial accumulation is dropped
    first = state.step_in_epoch * accum
    if first >= micro_total:
        return True
    batches = skip_first_batches(run.train_loader, first) if first else run.train_loader
    for micro_step, batch in enumerate(batches, start=first):
        seed_micro_step(cfg.train.seed, accelerator.process_index, epoch, micro_step)
        batch = send_to_device(batch, accelerator.device)
        with accelerator.accumulate(run.model):
            sam_img_embed = cached_sam_embeddings(run, batch) if stage == Stage.FULL else None
            loss, terms = forward_loss(
                run.model, batch, stage, cfg.train, sam_img_embed=sam_img_embed
            )
            accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        run.meter.add(terms, batch.num_expressions)
        if accelerator.sync_gradients:
            run.scheduler.step()
            state.global_step += 1
            state.step_in_epoch += 1
            if not after_optimizer_step(run, stage):
                return False
        if micro_step + 1 >= micro_total:
            break
    return True


def build_sam_cache(cfg: Config, model: nn.Module) -> SamEmbeddingCache | None:
    """The on-disk cache of SAM image embeddings, when configured and the encoder is frozen."""
    if not cfg.train.sam_embed_cache:
        return None
    if not cfg.model.sam.freeze_image_encoder:
        raise ConfigError(
            "train.sam_embed_cache needs a frozen SAM image encoder "
            "(set model.sam.freeze_image_encoder=true or train.sam_embed_cache=null)"
        )
    prefix = sam_cache_prefix(model.sam.image_encoder, cfg.model.sam.image_size)
    return SamEmbeddingCache(cfg.train.sam_embed_cache, prefix)


def cached_sam_embeddings(run: TrainRun, batch: Batch) -> torch.Tensor | None:
    """SAM image embeddings of the batch's images from the cache (encoding only the misses)."""
    if run.sam_cache is None:
        return None
    keys = batch_image_keys(batch, f"{run.cfg.data.train}:")
    with run.accelerator.autocast():
        encode = run.accelerator.unwrap_model(run.model).encode_sam
        return run.sam_cache.encode(keys, batch.sam_images, encode)


def forward_loss(
    model: nn.Module,
    batch: Batch,
    stage: Stage,
    train_cfg: TrainConfig,
    sam_img_embed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The stage's forward pass and loss (eq. 9): stage 1 skips SAM, stage 2 drops prompts.

    ``sam_img_embed`` (I, D_S, h_s, w_s), when given, replaces the SAM image encoder's pass.
    """
    full = stage == Stage.FULL
    grounding = full and train_cfg.text_grounding_weight > 0
    out = model(
        batch, with_sam=full, prompt_dropout=full, sam_img_embed=sam_img_embed,
        text_attention=grounding,
    )  # fmt: skip
    return stage_loss(out, batch, stage, train_cfg.icl_weight, train_cfg.text_grounding_weight)


def after_optimizer_step(run: TrainRun, stage: Stage) -> bool:
    """Progress, logs and requested checkpoints after a step; False to stop the run here."""
    cfg, state = run.cfg, run.state
    run.progress.update(1)
    if state.global_step % cfg.train.log_every == 0:
        log_train(run, stage)
    stop_step = state.global_step
    stop = cfg.train.stop_at_step is not None and stop_step >= cfg.train.stop_at_step
    every = cfg.train.save_every_steps
    requested = agree(run.accelerator, run.save_request.pending)
    periodic = bool(every) and state.global_step % every == 0
    epoch_save_follows = state.step_in_epoch == run.steps_per_epoch  # end_of_epoch saves
    if stop or ((requested or periodic) and not epoch_save_follows):
        save_checkpoint(run)
    if stop:
        logger.info("stopped at step %d (train.stop_at_step); go on with --resume", stop_step)
    return not stop


def agree(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a signal may reach only one)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def log_train(run: TrainRun, stage: Stage) -> None:
    """One log line, TensorBoard scalars and a metrics.jsonl record; averages over processes."""
    accelerator, meter, state = run.accelerator, run.meter, run.state
    names = sorted(meter.sums)
    means = torch.stack([meter.sums[n].float() / meter.steps for n in names])  # (terms,)
    means = accelerator.reduce(means.to(accelerator.device), reduction="mean").tolist()
    throughput = meter.expressions_per_s * accelerator.num_processes
    lr = run.scheduler.get_last_lr()[0]
    record = {
        "step": state.global_step, "epoch": state.epoch + 1, "stage": int(stage), "lr": lr,
        "expressions_per_s": throughput, **{f"loss/{n}": v for n, v in zip(names, means)},
    }  # fmt: skip
    run.meter = LossMeter()
    if not accelerator.is_main_process:
        return
    terms = " ".join(f"{n} {v:.4f}" for n, v in zip(names, means))
    logger.info(
        "epoch %d/%d stage %d step %d/%d | %s | lr %.3g | %.1f expr/s",
        state.epoch + 1, run.num_epochs, stage, state.global_step, run.total_steps, terms, lr,
        throughput,
    )  # fmt: skip
    run.progress.set_postfix(stage=stage, loss=f"{record.get('loss/total', math.nan):.4f}")
    scalars = {f"train/{k}": v for k, v in record.items() if k != "step"}
    accelerator.log(scalars, step=state.global_step)
    append_metrics(run.output_dir, record)


def save_checkpoint(run: TrainRun) -> Path:
    run.save_request.pending = False  # this save serves any SIGUSR1 received so far
    running = run.meter.pause()  # saving is not training time
    path = checkpointing.save_training_state(
        run.accelerator, run.output_dir, run.state, keep=run.cfg.train.keep_checkpoints
    )
    if running:
        run.meter.resume()
        run.progress.unpause()
    return path


# --------------------------------------------------------------------------------------------
# End of an epoch: validation, exports, checkpoint
# --------------------------------------------------------------------------------------------
def end_of_epoch(run: TrainRun) -> None:
    """Validate (every ``val_every`` epochs and at the end of each stage), export, checkpoint."""
    cfg, state = run.cfg, run.state
    run.meter.pause()  # validation, exports and saving are not training time
    epoch, stage = state.epoch, stage_of_epoch(state.epoch, cfg)
    ends_stage = epoch + 1 in (cfg.train.stage1_epochs, run.num_epochs)
    every = cfg.train.val_every
    if every > 0 and ((epoch + 1) % every == 0 or ends_stage):
        validate(run, stage)
    if stage == Stage.COARSE and epoch + 1 == cfg.train.stage1_epochs:
        export(run, "stage1", stage, epoch + 1)
    state.epoch, state.step_in_epoch = epoch + 1, 0
    save_checkpoint(run)
    run.meter.resume()
    run.progress.unpause()  # the ETA counts training steps, not the validation


def validate(run: TrainRun, stage: Stage) -> dict[str, float]:
    """Validation metrics on ``data.val``; exports ``best/`` when the selection score improves.

    Returns:
        ``{"val/<output>_<metric>": value}`` for the coarse (and, in stage 2, final) masks.
    """
    cfg, state, accelerator = run.cfg, run.state, run.accelerator
    with_sam = stage == Stage.FULL
    switch_sets = [run.unwrapped.default_switches] if with_sam else []
    (records,) = score_loader(
        run.model, run.val_loader, accelerator, cfg.data.val, switch_sets,
        threshold=cfg.eval.threshold,
    )  # fmt: skip
    metrics = summarize_outputs(records)
    values = {
        f"val/{output}_{name}": float(value)
        for output, table in metrics.items()
        for name, value in table.items()
        if not name.startswith("num_")
    }
    score = values[f"val/{'final' if with_sam else 'coarse'}_{cfg.train.best_metric}"]
    improved = state.best_stage != stage or state.best_score is None or score > state.best_score
    logger.info(
        "validation %s after epoch %d (stage %d): %s%s", cfg.data.val, state.epoch + 1, stage,
        ", ".join(f"{k[4:]} {v:.2f}" for k, v in values.items() if "IoU" in k),
        " (new best)" if improved else "",
    )  # fmt: skip
    if accelerator.is_main_process:
        accelerator.log(values, step=state.global_step)
        record = {"step": state.global_step, "epoch": state.epoch + 1, **values}
        append_metrics(run.output_dir, record)
    state.history.append({"epoch": state.epoch + 1, "stage": int(stage), "score": score})
    if improved:
        state.best_score, state.best_stage = score, int(stage)
        export(run, "best", stage, state.epoch + 1, values)
    if cfg.train.num_overlays > 0 and accelerator.is_main_process:
        batch = send_to_device(next(iter(run.val_loader)), accelerator.device)
        log_overlays(
            accelerator, run.unwrapped, batch, with_sam, cfg.train.num_overlays, state.global_step
        )
    return values


def export(
    run: TrainRun,
    name: str,
    stage: Stage,
    epochs_done: int,
    metrics: dict[str, float] | None = None,
) -> None:
    """Export the learned weights to ``<output_dir>/<name>`` (main process; others wait)."""
    if run.accelerator.is_main_process:
        training = {
            "stage": int(stage), "epochs_done": epochs_done, "global_step": run.state.global_step,
            "metrics": metrics or {},
        }  # fmt: skip
        checkpointing.export_pretrained(run.unwrapped, run.cfg, run.output_dir / name, training)
    run.accelerator.wait_for_everyone()
