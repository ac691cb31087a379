"""Train Prompt-RIS: stage 1 (CLIP + CMP + ICL) then stage 2 (end to end), Sec. 4.2.

Usage (any device or number of processes that ``accelerate config`` describes):

    accelerate launch scripts/train.py --config configs/refcoco_combined.yaml [key=value ...]
    accelerate launch scripts/train.py --config configs/tiny_synthetic.yaml --resume
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --config ... train.lr=2e-4

``--resume`` continues the newest checkpoint of ``train.output_dir`` (or the checkpoint or run
folder given). Send SIGUSR1 to a training process to save a resumable checkpoint at the next step.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from prompt_ris.config import load_config
from prompt_ris.engine.trainer import TrainResult, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML file of differences from defaults")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="'latest' (when the flag is given alone or last), a checkpoint folder or a run folder",
    )
    parser.add_argument(
        "--save-every-steps",
        type=int,
        default=None,
        help="also save a resumable checkpoint every N optimizer steps (train.save_every_steps)",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=2e-4")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after options


def main(argv: list[str] | None = None) -> TrainResult:
    args = parse_args(argv)
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        raise SystemExit(
            f"--resume took '{args.resume}' as the checkpoint to resume; put --resume after the "
            "overrides (or write --resume latest) so that it is not read as an override"
        )
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
    cfg = load_config(args.config, overrides)
    return train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
