"""What the app's second answer about an image costs against the first (which computes the
image's SAM embedding; the second reuses it), on new synthetic scenes with their expressions.

Usage: ``python scripts/benchmark_app_cache.py [--checkpoint checkpoints/tiny_synthetic_demo]
[--scenes 20] [--device cpu]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "tiny_synthetic_demo"))
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    import numpy as np

    from prompt_ris import PromptRIS
    from prompt_ris.app.answers import Answerer
    from prompt_ris.app.scenes import new_scene

    answerer = Answerer(PromptRIS.from_pretrained(args.checkpoint), device=args.device)
    answerer.answer(new_scene(0).image, ["the red shape"])  # warm-up
    first, second = [], []
    for seed in range(1, args.scenes + 1):
        scene = new_scene(seed)
        for times, threshold in ((first, 0.5), (second, 0.4)):
            start = time.perf_counter()
            answerer.answer(scene.image, scene.expressions, threshold=threshold)
            times.append(time.perf_counter() - start)
    f, s = np.median(first) * 1000, np.median(second) * 1000
    print(
        f"median over {args.scenes} scenes of {len(scene.expressions)} expressions: first answer "
        f"{f:.1f} ms (embeds the image), second {s:.1f} ms (reuses it), {s / f:.0%} of the first"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
