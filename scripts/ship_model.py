"""Turn a trained tiny checkpoint into the model shipped with the repository.

Writes ``<out>/model.safetensors`` and ``config.json`` (the learned weights, with the base weights
named by their path in the repository, ``checkpoints/tiny_synthetic/...``, so that it loads from
any folder), then scores it on a fixed set of synthetic scenes that training never saw
(``SUBSET``: rendered from their own seed) and writes ``results.json`` and the model card
``README.md`` (how it was made, how to remake it, the figures).

Usage::

    python scripts/ship_model.py --checkpoint runs/demo/train/final \
        --out checkpoints/tiny_synthetic_demo

``python scripts/demo.py --out runs/demo --ship checkpoints/tiny_synthetic_demo`` trains the demo
and runs this at its end: the one command that remakes the shipped model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = "checkpoints/tiny_synthetic_demo"
# The fixed scenes the shipped figures are measured on (and tests/test_shipped_model.py checks).
SUBSET = {"seed": 2026, "num_images": 100, "kinds": ["attribute"], "split": "synthetic:test"}
TOLERANCE = 1.0  # points of mIoU / oIoU another machine's floating point may move the figures
REMAKE = "python scripts/demo.py --out runs/demo --ship checkpoints/tiny_synthetic_demo"
# Paths of the training machine that a shipped config must not carry.
PORTABLE = {
    "data.prepared": "data/synthetic/prepared",
    "data.image_dir": None,
    "train.output_dir": "runs/demo/train",
    "eval.output_dir": None,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo/train/final", help="the trained export")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder to write (replaced)")
    return parser.parse_args(argv)


def subset_data(root: Path) -> Path:
    """Render and prepare the fixed scenes under ``root``; returns the prepared folder."""
    from prompt_ris.data.prepare import prepare_refer
    from prompt_ris.miniature.synthetic import (
        SYNTHETIC_DATASET,
        SYNTHETIC_SPLIT_BY,
        generate_synthetic,
    )

    generate_synthetic(
        root, num_images=SUBSET["num_images"], seed=SUBSET["seed"], kinds=SUBSET["kinds"]
    )
    prepared = root / "prepared"
    prepare_refer(root, prepared, [(SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY)], check_images="full")
    return prepared


def score_on_subset(checkpoint: str | Path) -> dict[str, Any]:
    """``results.json`` of ``checkpoint`` on the fixed scenes (``SUBSET``), coarse and final."""
    from prompt_ris import PromptRIS, evaluate, load_config

    model = PromptRIS.from_pretrained(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = subset_data(Path(tmp))
        cfg = load_config(overrides=[f"data.prepared={prepared}", "eval.random_baseline=false"])
        results = evaluate(model, [SUBSET["split"]], config=cfg)
    return {
        "subset": dict(SUBSET),
        "switches": model.default_switches.name,
        "tolerance": TOLERANCE,
        "splits": results.to_dict()["splits"],
    }


def portable_model(checkpoint: str | Path) -> Any:
    """The checkpoint's model with its config's machine paths made relative: the base weights
    named by their path in the repository (as the ``tiny`` preset names them)."""
    from prompt_ris import PromptRIS
    from prompt_ris.config import load_config

    model = PromptRIS.from_pretrained(checkpoint)
    preset = load_config(REPO / "configs" / "tiny_synthetic.yaml").model
    cfg = model.config
    cfg.model.clip.pretrained = preset.clip.pretrained
    cfg.model.sam.checkpoint = preset.sam.checkpoint
    for dotted, value in PORTABLE.items():
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, value)
    return model


def ship(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the shipped model to ``out`` (replaced) and return its ``results.json``."""
    from prompt_ris.models.model_card import CARD_NAME, model_card

    out = Path(out)
    started = time.time()
    from prompt_ris.models.pretrained import read_checkpoint

    training = {**read_checkpoint(checkpoint).training, "made_by": REMAKE}
    model = portable_model(checkpoint)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, training=training)
    results = score_on_subset(tmp)
    results["measured"] = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores",
    }
    (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    meta = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    card = model_card(
        meta, results, name="prompt-ris tiny synthetic demo", description=DESCRIPTION,
        how_made=how_made(results), load_from=DEFAULT_OUT,
    )  # fmt: skip
    (tmp / CARD_NAME).write_text(card, encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    final = results["splits"][SUBSET["split"]]["final"]
    print(
        f"shipped {out} in {time.time() - started:.0f} s: final mIoU {final['mIoU']:.2f}, oIoU "
        f"{final['oIoU']:.2f} on {final['num_expressions']} expressions of the fixed scenes"
    )
    return results


DESCRIPTION = (
    "The demo's Prompt-RIS at the `tiny` preset's sizes, trained on synthetic scenes of flat "
    "shapes (expressions naming a colour and/or a shape: \"the red circle\", \"the red shape\", "
    "\"the circle\"), over the miniature CLIP and SAM committed in `checkpoints/tiny_synthetic/`. "
    "It is a working miniature of the method, to try the code in a minute on a CPU; it knows "
    "nothing of photographs."
)


def how_made(results: dict[str, Any]) -> str:
    subset = results["subset"]
    return (
        "`bash scripts/demo.sh` (`python scripts/demo.py --out runs/demo`): the recipe of "
        "`configs/tiny_synthetic.yaml` (stage 1 then stage 2, CLIP and SAM frozen, ICL on, star "
        "and hexagon held out of training), then `scripts/ship_model.py` on its `final/` export. "
        f"Remake it with one command:\n\n```bash\n{REMAKE}\n```\n\n"
        f"The figures below are measured by that command on {subset['num_images']} synthetic "
        f"images rendered with seed {subset['seed']} ({subset['split']}, "
        f"{', '.join(subset['kinds'])} expressions; every sentence of every reference; "
        f"prompts `{results['switches']}`), on {results['measured']['machine']}, "
        f"{results['measured']['date']}. `tests/test_shipped_model.py` renders the same scenes "
        f"and holds the model to them within {results['tolerance']:g} point (floating-point "
        "kernels differ between machines)."
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ship(args.checkpoint, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
