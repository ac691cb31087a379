"""Load test of a running ``prompt-ris app``: many clients at once through ``gradio_client``.

Each request sends one of the example scenes with its expressions to the ``segment`` API; an
answer is correct when its masks equal ``PromptRIS.predict``'s for the same inputs (computed
here with the same checkpoint). Prints the count answered, the count correct and the latency
percentiles; exit status 1 unless every request was answered correctly.

Usage::

    prompt-ris app --port 7860 &
    python scripts/load_test_app.py --url http://127.0.0.1:7860/ [--requests 50] [--clients 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def run(
    url: str, requests: int = 50, clients: int = 10, checkpoint: str | None = None
) -> dict[str, Any]:
    """Send ``requests`` requests from ``clients`` threads, each with its own client; returns
    the report (answered, correct, latency percentiles in ms, wall time)."""
    import numpy as np
    from gradio_client import Client, handle_file

    from prompt_ris import PromptRIS
    from prompt_ris.app.scenes import example_scenes
    from prompt_ris.data.rle import decode_rle

    scenes = example_scenes()
    model = PromptRIS.from_pretrained(checkpoint or REPO / "checkpoints" / "tiny_synthetic_demo")
    expected = [model.predict(s.image, s.expressions).masks for s in scenes]

    def one_client(index: int) -> list[tuple[float, bool]]:
        client = Client(url, verbose=False)
        done = []
        for k in range(index, requests, clients):
            scene = scenes[k % len(scenes)]
            start = time.perf_counter()
            try:
                out = client.predict(
                    handle_file(str(scene.path)), "\n".join(scene.expressions), 0.5,
                    ["mask", "point", "text"], api_name="/segment",
                )  # fmt: skip
            except Exception:  # noqa: BLE001 - an unanswered request is counted, not raised
                done.append((time.perf_counter() - start, False))
                continue
            masks = [decode_rle(entry["mask"]) for entry in json.loads(out)]
            want = expected[k % len(scenes)]
            ok = len(masks) == len(want) and all(np.array_equal(a, b) for a, b in zip(masks, want))
            done.append((time.perf_counter() - start, ok))
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(one_client, range(clients)) for r in rs]
    wall = time.perf_counter() - started
    latencies = np.array([seconds * 1000 for seconds, _ in results])
    return {
        "requests": requests,
        "clients": clients,
        "answered": len(results),
        "correct": sum(ok for _, ok in results),
        "latency_ms": {
            f"p{q}": round(float(np.percentile(latencies, q)), 1) for q in (50, 90, 95, 99)
        }
        | {"max": round(float(latencies.max()), 1)},
        "wall_s": round(wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860/", help="the app's address")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--checkpoint", default=None, help="the checkpoint the app serves")
    args = parser.parse_args(argv)
    report = run(args.url, args.requests, args.clients, args.checkpoint)
    print(json.dumps(report, indent=2))
    return 0 if report["correct"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
