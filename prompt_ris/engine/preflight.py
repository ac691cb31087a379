"""Checks before the long wait: what a command needs, checked before any model is built.

``scripts/train.py`` and ``evaluation/evaluate.py`` call ``training_problems`` /
``evaluation_problems`` right after parsing their arguments and stop when the list is not empty,
printing each problem (``report``) as one line that says what is wrong and how to fix it. Nothing
here builds a model or reads a tensor: config keys and values, base-weight files (found as
``prompt_ris.weights`` finds them), prepared splits, checkpoints (their headers, or the integrity
of resume checkpoints) and output folders.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from prompt_ris.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
)
from prompt_ris.data.prepare import source_name
from prompt_ris.data.schedule import check_epoch_unit
from prompt_ris.data.splits import (
    PAPER_HELDOUT_SPLITS,
    PAPER_TRAIN_SOURCES,
    load_split,
    parse_split,
)
from prompt_ris.engine import checkpointing
from prompt_ris.engine.tracking import tracker_problem
from prompt_ris.engine.trainer import (
    BEST_METRICS,
    check_resume_config,
    check_val_split,
    launch_plan,
    resolve_mixed_precision,
)
from prompt_ris.metrics import threshold_logit
from prompt_ris.models.build import base_weight_problems
from prompt_ris.prompt_switches import PromptSwitches

PREPARE_HINT = (
    "run `python scripts/prepare_data.py --root <refer data root> --out {prepared}` (or "
    "`python scripts/make_synthetic.py` for the synthetic data), or set data.prepared to the "
    "folder it wrote"
)


def one_line(message: object) -> str:
    """A message on one line (exception texts may hold newlines)."""
    return " ".join(str(message).split())


def report(prog: str, problems: Sequence[str], before: str | None = None) -> None:
    """Print each problem on one line as ``<prog>: error: ...`` (main process only), then, when
    ``before`` names the step the checks came before, how many were found."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for problem in problems:
        sys.stderr.write(f"{prog}: error: {problem}\n")
    if before is not None:
        sys.stderr.write(f"{prog}: {len(problems)} problem(s) found before {before}\n")


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------
def config_problems(errors: Iterable[ConfigError]) -> list[str]:
    """One line per config error collected by ``load_config(..., errors=[])``."""
    return [one_line(err) for err in errors]


def split_problems(prepared: str | Path, names: Sequence[tuple[str, str]]) -> list[str]:
    """Split names that are malformed, whose prepared data is missing, or that are empty.

    Args:
        prepared: ``data.prepared``.
        names: (setting, split name) pairs, e.g. ``("data.val", "refcoco:val")``.
    """
    problems: list[str] = []
    missing: dict[str, list[str]] = {}  # prepared source -> the settings that need it
    present = []
    for setting, name in names:
        try:
            spec = parse_split(name)
        except ValueError as err:
            problems.append(f"{setting}: {one_line(err)}")
            continue
        if spec.is_combined:
            sources = list(dict.fromkeys([*PAPER_TRAIN_SOURCES, *PAPER_HELDOUT_SPLITS]))
        else:
            sources = [(spec.dataset, spec.split_by)]
        lacking = [s for s in sources if not _prepared_source(prepared, *s).is_file()]
        for dataset, split_by in lacking:
            key = f"{dataset}({split_by})"
            missing.setdefault(key, []).append(f"{setting}={name}")
        if not lacking:
            present.append((setting, name))
    for source, users in missing.items():
        folder = Path(prepared) / source_name(*source.rstrip(")").split("("))
        problems.append(
            f"prepared data for {source} not found at '{folder}' (needed by "
            f"{', '.join(users)}); {PREPARE_HINT.format(prepared=prepared)}"
        )
    for setting, name in present:
        try:
            load_split(prepared, name)
        except (ValueError, FileNotFoundError, KeyError) as err:
            problems.append(f"{setting}={name}: {one_line(err)}")
    return problems


def _prepared_source(prepared: str | Path, dataset: str, split_by: str) -> Path:
    return Path(prepared) / source_name(dataset, split_by) / "state.json"


def output_problem(folder: str | Path, setting: str) -> str | None:
    """Why ``folder`` cannot be created or written to, or None."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        return f"{setting}='{folder}' is a file, not a folder; choose a folder"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_file():
        return f"{setting}='{folder}' lies under the file '{existing}'; choose another folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{setting}='{folder}': '{existing}' is not writable; choose another folder"
    return None


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def training_problems(
    cfg: Config, resume: str | None, config_errors: Iterable[ConfigError] = ()
) -> tuple[list[str], Path | None]:
    """Everything ``train`` would fail on, before it builds the model.

    Args:
        cfg: the resolved config (with the valid part of a config that had errors).
        resume: ``--resume`` (None, "latest", a run or checkpoint folder).
        config_errors: what ``load_config(..., errors=[])`` collected.

    Returns:
        (problems, the checkpoint folder to resume, verified intact, or None).
    """
    problems = config_problems(config_errors)
    train = cfg.train
    for check in (
        lambda: check_val_split(cfg.data.val),
        lambda: resolve_mixed_precision(train.mixed_precision),
        lambda: threshold_logit(cfg.eval.threshold),
        lambda: check_epoch_unit(train.epoch_unit),
        lambda: launch_plan(cfg),  # the global batch splits over the launched processes
    ):
        try:
            check()
        except ValueError as err:
            problems.append(one_line(err))
    if train.best_metric not in BEST_METRICS:
        problems.append(
            f"train.best_metric={train.best_metric!r}; choose one of {list(BEST_METRICS)}"
        )
    tracker = tracker_problem(train.tracker)
    if tracker:
        problems.append(tracker)
    if train.sam_embed_cache and not cfg.model.sam.freeze_image_encoder:
        problems.append(
            "train.sam_embed_cache needs a frozen SAM image encoder; set "
            "model.sam.freeze_image_encoder=true or train.sam_embed_cache=null"
        )
    if train.text_grounding_weight > 0 and "text" not in PromptSwitches.parse(
        cfg.model.prompts.switches
    ):
        problems.append(
            f"train.text_grounding_weight={train.text_grounding_weight:g} teaches the text "
            f"prompter, but model.prompts.switches='{cfg.model.prompts.switches}' has no text; "
            "set train.text_grounding_weight=0 or add text to the switches"
        )
    for setting in ("stage1_epochs", "stage2_epochs"):
        if getattr(train, setting) < 0:
            problems.append(f"train.{setting}={getattr(train, setting)} must be 0 or more")
    problems += base_weight_problems(cfg.model)
    problems += split_problems(
        cfg.data.prepared, [("data.train", cfg.data.train), ("data.val", cfg.data.val)]
    )
    for folder, setting in ((train.output_dir, "train.output_dir"),
                            (train.sam_embed_cache, "train.sam_embed_cache")):  # fmt: skip
        problem = output_problem(folder, setting) if folder else None
        if problem:
            problems.append(problem)
    checkpoint = None
    if resume is None:
        existing = checkpointing.checkpoint_root(train.output_dir) / checkpointing.LATEST_FILENAME
        if existing.is_file():
            problems.append(
                f"train.output_dir='{train.output_dir}' already holds a run ({existing} exists); "
                f"continue it with --resume {train.output_dir}, or choose another "
                "train.output_dir (or delete the folder) to start afresh"
            )
    else:
        try:
            checkpoint = checkpointing.resolve_resume(train.output_dir, resume)
            check_resume_config(cfg, checkpoint)
        except (FileNotFoundError, checkpointing.DamagedCheckpointError, ConfigError) as err:
            problems.append(one_line(err))
            checkpoint = None
    return problems, checkpoint


def evaluation_problems(
    cfg: Config,
    checkpoint: str | Path,
    clip_weights: str | None = None,
    sam_weights: str | None = None,
    config_errors: Iterable[ConfigError] = (),
) -> list[str]:
    """Everything an evaluation would fail on, before it loads the model: the checkpoint (its
    header and config), the base weights it needs, every split, the output folder."""
    from prompt_ris.models.pretrained import KIND_FULL, CheckpointError, read_checkpoint

    problems = config_problems(config_errors)
    try:
        threshold_logit(cfg.eval.threshold)
    except ValueError as err:
        problems.append(f"eval.threshold: {one_line(err)}")
    try:
        saved = read_checkpoint(checkpoint)
    except (FileNotFoundError, CheckpointError) as err:
        problems.append(one_line(err))
    else:
        if saved.kind != KIND_FULL:
            problems += base_weight_problems(saved.config.model, clip_weights, sam_weights)
    problems += split_problems(cfg.data.prepared, [("--splits", s) for s in cfg.eval.splits])
    if not cfg.eval.splits:
        problems.append("no split to evaluate; give --splits refcoco:val,... or eval.splits")
    if cfg.eval.output_dir:
        problem = output_problem(cfg.eval.output_dir, "--output")
        if problem:
            problems.append(problem)
    return problems


def training_config(
    config: str | None, resume: str | None, overrides: list[str], errors: list[ConfigError]
) -> Config | None:
    """The config of a training command: ``--config`` and overrides, or, for ``--resume <run or
    checkpoint folder>`` without ``--config``, the run's own ``config.yaml`` (less its
    ``train.stop_at_step``, which ended the previous leg) and overrides.

    Problems are appended to ``errors``. Returns the Config of what was valid, or None when
    there is no config to check further (no ``--config`` and no readable run config).
    """
    if config is not None or resume is None or resume == "latest":
        if config is None and resume is None:
            errors.append(ConfigError("give --config configs/<name>.yaml (or --resume <run>)"))
            return None
        if config is None:
            errors.append(
                ConfigError(
                    "--resume latest needs --config (its train.output_dir is the run to "
                    "continue); or name the run: --resume checkpoints/<run>"
                )
            )
            return None
        return load_config(config, overrides, errors)
    folder = Path(resume)
    run = checkpointing.run_folder_of(folder) if checkpointing.is_checkpoint(folder) else folder
    path = run / checkpointing.RUN_CONFIG_NAME
    if not path.is_file():
        what = "no run there" if not run.exists() else "the run's config is unknown"
        errors.append(
            ConfigError(
                f"--resume {resume}: {what} ('{path}' not found); pass the folder of a run "
                "written by scripts/train.py (its train.output_dir), or --config to start one"
            )
        )
        return None
    try:
        cfg = config_from_dict(yaml.safe_load(path.read_text()), source=str(path))
    except (ConfigError, yaml.YAMLError) as err:
        errors.append(ConfigError(f"'{path}': {one_line(err)}; add --config to resume it"))
        return None
    cfg.train.stop_at_step = None  # the stop that ended the last leg; give it again to stop
    apply_overrides(cfg, overrides, errors)
    cfg.train.output_dir = str(run)  # where the run is now, even if it was moved
    return cfg
