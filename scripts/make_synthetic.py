"""Write the synthetic referring dataset (refer format) and prepare it for training.

Usage:

    python scripts/make_synthetic.py --out data/synthetic [--num-images 300] [--seed 0] \
        [--kinds attribute,position,relation] [--world flat|ambiguous]

Writes ``<out>/synthetic/refs(unc).p``, ``<out>/synthetic/instances.json`` and the images under
``<out>/images/mscoco/images/train2014/``, then (unless ``--no-prepare``) the prepared Arrow
data under ``<out>/prepared`` with the same code as ``scripts/prepare_data.py``. Use it with
``data.prepared=<out>/prepared data.train=synthetic:train data.val=synthetic:val``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/synthetic", help="data root to write")
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kinds",
        default=None,
        help="comma-separated expression kinds to write (default: all of "
        "prompt_ris.miniature.synthetic.EXPRESSION_KINDS; an unknown kind lists them)",
    )
    parser.add_argument(
        "--world",
        default="flat",
        help="flat (objects apart) or ambiguous (also shapes inside shapes and same-coloured "
        "shapes overlapping; prompt_ris.miniature.synthetic.WORLDS)",
    )
    parser.add_argument("--no-prepare", action="store_true", help="skip the Arrow preparation")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Any:
    """Write the data (and prepare it); returns the SyntheticSummary."""
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # Imported here, after the arguments are read: --help stays fast.
    from prompt_ris.data.prepare import format_counts_table, prepare_refer
    from prompt_ris.miniature.synthetic import (
        EXPRESSION_KINDS,
        SYNTHETIC_DATASET,
        SYNTHETIC_SPLIT_BY,
        generate_synthetic,
    )

    given = args.kinds.split(",") if args.kinds is not None else EXPRESSION_KINDS
    kinds = [k.strip() for k in given if k.strip()]
    summary = generate_synthetic(
        args.out, num_images=args.num_images, seed=args.seed, kinds=kinds, world=args.world
    )
    print(
        f"synthetic data: {summary.num_images} images, {summary.num_refs} refs, "
        f"{summary.num_sentences} sentences in {args.out}"
    )
    if not args.no_prepare:
        prepared = Path(args.out) / "prepared"
        reports = prepare_refer(
            args.out, prepared, [(SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY)], check_images="full"
        )
        print(format_counts_table(reports))
        print(f"prepared data written to {prepared}")
    return summary


if __name__ == "__main__":
    main()
