"""Train Prompt-RIS: stage 1 (CLIP + CMP + ICL) then stage 2 (end to end), Sec. 4.2.

Usage (any device or number of processes that ``accelerate config`` describes):

    accelerate launch scripts/train.py --config configs/refcoco_combined.yaml [key=value ...]
    accelerate launch scripts/train.py --resume checkpoints/refcoco_combined
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --config ... train.lr=2e-4

``--resume RUN`` continues the run folder RUN from its newest intact checkpoint with the run's
own ``config.yaml`` less its ``train.stop_at_step`` (overrides still apply; a changed model is
refused; a run that finished is left as it is, with "already finished at step N; nothing to
do"). With ``--config``, ``--resume`` alone continues ``train.output_dir``. Before anything is built, every problem
found (config keys, base weights, prepared splits, output folder, resume checkpoint) is printed
as one line with its fix, and the exit status is 1; ``-v`` shows tracebacks. Send SIGUSR1 to a
training process to save a resumable checkpoint at the next step.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

PROG = "train.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", help="YAML file of differences from defaults (optional with --resume RUN)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="a run folder (its newest intact checkpoint and config.yaml), a checkpoint folder, "
        "or 'latest' (train.output_dir of --config; the value when the flag is given alone)",
    )
    parser.add_argument(
        "--save-every-steps",
        type=int,
        default=None,
        help="also save a resumable checkpoint every N optimizer steps (train.save_every_steps)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=2e-4")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after options


def main(argv: list[str] | None = None) -> Any:
    """Check everything, then train; returns the TrainResult (exits with 1 on a user error)."""
    args = parse_args(argv)
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        from prompt_ris.engine.preflight import report

        report(PROG, [
            f"--resume took '{args.resume}' as the checkpoint to resume; put --resume after the "
            "overrides (or write --resume latest) so that it is not read as an override"
        ])  # fmt: skip
        raise SystemExit(1)
    overrides = list(args.overrides)
    if args.save_every_steps is not None:
        overrides.append(f"train.save_every_steps={args.save_every_steps}")
    main_process = int(os.environ.get("RANK", "0")) == 0  # set by `accelerate launch`
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if main_process else logging.WARNING,
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per file it saves

    from prompt_ris.config import ConfigError
    from prompt_ris.engine import preflight
    from prompt_ris.engine.checkpointing import DamagedCheckpointError
    from prompt_ris.models.pretrained import CheckpointError

    errors: list[ConfigError] = []
    cfg = preflight.training_config(args.config, args.resume, overrides, errors)
    if cfg is None:  # no config to check the rest against
        problems, checkpoint = preflight.config_problems(errors), None
    else:
        problems, checkpoint = preflight.training_problems(cfg, args.resume, errors)
    if problems:
        preflight.report(PROG, problems, before="building the model")
        raise SystemExit(1)

    from prompt_ris.engine.trainer import train

    user_errors = (ConfigError, CheckpointError, DamagedCheckpointError, FileNotFoundError)
    try:
        return train(cfg, resume=None if checkpoint is None else str(checkpoint))
    except user_errors as err:
        if args.verbose:
            raise
        preflight.report(PROG, [f"{preflight.one_line(err)} (-v shows the traceback)"])
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
