"""Write the app's example scenes (``examples/scenes/``): synthetic scenes with their expressions
and ground truth.

Usage: ``python scripts/make_examples.py [--out examples/scenes] [--seeds 101,102,103,104]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEEDS = "101,102,103,104"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "examples" / "scenes"), help="folder to write")
    parser.add_argument("--seeds", default=SEEDS, help="one scene per seed, comma-separated")
    args = parser.parse_args(argv)
    from prompt_ris.app.scenes import new_scene, write_examples

    scenes = [new_scene(int(seed)) for seed in args.seeds.split(",")]
    for k, scene in enumerate(scenes):
        scene.name = f"example {k + 1}"
    index = write_examples(scenes, args.out)
    print(f"wrote {len(scenes)} scenes and {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
