"""The embedded default, end to end on a laptop CPU with no downloads.

1. generates the synthetic referring dataset (refer format) and prepares it;
2. trains Prompt-RIS at the ``tiny`` preset's sizes as the paper trains it (CLIP frozen and
   prompt-tuned, SAM frozen, ICL on; stage 1 then stage 2) with ``accelerate launch``, on the
   miniature foundations committed in ``checkpoints/tiny_synthetic/``;
3. evaluates it on the synthetic test split and on its seen and held-out (unseen) shape parts
   (``synthetic:test_seen``, ``synthetic:test_unseen``; star and hexagon are held out of
   training), coarse and final masks beside the baseline that answers with a random object of the
   image, by expression form, and again with every other set of prompts (Table 5's eight rows,
   beside the paper's); then checks the paper's claims in miniature against their targets;
4. writes pictures of the method (image | coarse mask with the point | final mask | ground truth)
   and predicts on a new image from
   Python, as a user would.

Usage: ``python scripts/demo.py [--out runs/demo] [--kinds attribute] [--world flat] [--config YAML]
[--ship DIR] [key=value ...]`` (``--world ambiguous`` adds shapes inside shapes and same-coloured
shapes overlapping, and a table by situation)
(overrides go to training; ``--ship checkpoints/tiny_synthetic_demo`` remakes the shipped model
with ``scripts/ship_model.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prompt_ris import EvaluationResults

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny_synthetic.yaml"
TEST_SPLIT = "synthetic:test"
SEEN_SPLIT, UNSEEN_SPLIT = "synthetic:test_seen", "synthetic:test_unseen"
OUTPUTS = {
    "final": "Prompt-RIS final mask",
    "coarse": "Prompt-RIS coarse mask",
    "random": "random object",
}
FORM_EXAMPLES = {
    "colour + shape": "the red circle",
    "colour": "the red shape",
    "shape": "the circle",
    "position": "the leftmost shape",
    "relation": "the square above the blue star",
}
SITUATION_EXAMPLES = {
    "apart": "a shape with room around it",
    "outer": "a shape with a smaller one inside",
    "inner": "the smaller shape inside",
    "touching": "one of two same-coloured shapes overlapping",
}
# The paper's claims in miniature, each with its target (README: "What the demo does").
TARGET_MIOU, TARGET_RATIO = 75.0, 2.5  # final mask on the test split, and its ratio to random
TARGET_REFINE, TARGET_P90_RATIO = 5.0, 2.0  # final - coarse mIoU; final P@0.9 / coarse P@0.9
TARGET_UNSEEN_RATIO = 2.5  # final mIoU on the held-out shapes / their random baseline
TARGET_TEXT_SHARE = 0.70  # text alone / all three prompts, final mIoU (the paper: 96%)
TARGET_TEXT_GAIN = 1.0  # mask + point + text - mask + point, final mIoU (the paper: +4.9)
# The exit status: the demo fails only when the model has not learnt (final < 2x random).
MIN_RATIO_TO_RANDOM = 2.0
PAPER_RESULTS = REPO / "evaluation" / "paper_results.json"
PAPER_SPLIT = "refcoco:val"  # the split of the paper's Table 5

PYTHON_EXAMPLE = """\
from prompt_ris import PromptRIS
model = PromptRIS.from_pretrained("{checkpoint}")
mask = model.predict("{image}", "{text}").masks[0]    # (H, W) bool, the image's size"""


def accelerate_launch(script: str, *args: str) -> None:
    """Run one of the project's scripts through ``accelerate launch`` (one CPU process)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / script), *args,
    ]  # fmt: skip
    print(f"\n$ accelerate launch {script} {' '.join(args)}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def evaluate_checkpoint(checkpoint: Path, out: Path, data: str, overlays: int) -> EvaluationResults:
    """Evaluate ``checkpoint`` on the test split and its seen / unseen parts, with the
    checkpoint's prompts first and then every other set of prompts (Table 5), from Python; the
    results are also written to ``out``."""
    from prompt_ris import PromptRIS, PromptSwitches, evaluate, load_config
    from prompt_ris.prompt_switches import parse_switch_sets

    model = PromptRIS.from_pretrained(checkpoint)
    overrides = [f"data.prepared={data}", f"eval.num_overlays={overlays}", f"eval.output_dir={out}"]
    cfg = load_config(overrides=overrides)
    results = evaluate(
        model, [TEST_SPLIT, SEEN_SPLIT, UNSEEN_SPLIT],
        parse_switch_sets([model.default_switches, *PromptSwitches.every()]),
        config=cfg, overlay_dir=out / "overlays",
    )  # fmt: skip
    results.checkpoint = str(checkpoint)
    results.save(out)
    print(results.table(), flush=True)
    passes = results.passes
    print(
        f"model passes: {passes.encoded} expressions through CLIP, the coarse decoder and SAM's "
        f"image encoder, {passes.decoded} through SAM's prompt and decoder side",
        flush=True,
    )
    return results


def form_table(records: list[dict]) -> str:
    """mIoU by expression form ("the red circle", "the red shape", "the circle", ...)."""
    from prompt_ris.engine.tables import group_table
    from prompt_ris.miniature.synthetic import EXPRESSION_FORMS, expression_form

    examples = {form: FORM_EXAMPLES[form] for form in EXPRESSION_FORMS}
    return group_table(records, lambda r: expression_form(r["text"]), examples, list(OUTPUTS))


def situation_section(records: list[dict], data_root: Path) -> list[str]:
    """mIoU by the referent's situation in its scene (apart, outer, inner, touching), for a world
    with more than one situation; nothing for the flat world."""
    import json

    from prompt_ris.engine.tables import group_table
    from prompt_ris.miniature.synthetic import SITUATIONS, SITUATIONS_FILE, SYNTHETIC_DATASET

    path = data_root / SYNTHETIC_DATASET / SITUATIONS_FILE
    situations = json.loads(path.read_text()) if path.is_file() else {}
    if len(set(situations.values())) < 2:
        return []
    examples = {s: SITUATION_EXAMPLES[s] for s in SITUATIONS}
    table = group_table(
        records, lambda r: situations[str(r["object_id"])], examples, list(OUTPUTS), "situation"
    )
    return [f"## By situation of the referent ({TEST_SPLIT})", "", table, ""]


def paper_table(ablation: dict[str, dict]) -> str:
    """Table 5 in miniature: the final mask on the test split per set of prompts, in the paper's
    order, beside the paper's mIoU on RefCOCO val (its check marks are lost; the rows are read in
    the usual order, as ``evaluation/paper_results.json`` notes)."""
    import json

    from prompt_ris import PromptSwitches
    from prompt_ris.engine.tables import switch_table

    paper = json.loads(PAPER_RESULTS.read_text())["entries"]
    every = [switches.name for switches in PromptSwitches.every()]
    theirs = {
        name: entry["splits"][PAPER_SPLIT]["final"]["mIoU"]
        for name in every
        if (entry := paper.get(f"table5/{name.replace(' + ', '+')}"))
    }
    ordered = {name: ablation[name] for name in every}
    return switch_table(ordered, TEST_SPLIT, (f"the paper's mIoU ({PAPER_SPLIT})", theirs))


def paper_claims(splits: dict[str, dict], ablation: dict[str, dict]) -> list[tuple[str, str, bool]]:
    """The paper's claims in miniature: (claim, measured figures, target met) for each."""
    test, unseen = splits[TEST_SPLIT], splits[UNSEEN_SPLIT]
    final, coarse, rand = test["final"], test["coarse"], test["random"]
    ratio = final["mIoU"] / max(rand["mIoU"], 1e-9)
    refine = final["mIoU"] - coarse["mIoU"]
    p90_ratio = final["P@0.9"] / max(coarse["P@0.9"], 1e-9)
    unseen_ratio = unseen["final"]["mIoU"] / max(unseen["random"]["mIoU"], 1e-9)
    miou = {name: by_split[TEST_SPLIT]["mIoU"] for name, by_split in ablation.items()}
    all_three, text, mask, point = (
        miou[n] for n in ("mask + point + text", "text", "mask", "point")
    )  # fmt: skip
    text_gain = all_three - miou["mask + point"]
    return [
        (
            f"final mIoU >= {TARGET_MIOU:.0f} and >= {TARGET_RATIO}x random",
            f"{final['mIoU']:.2f}, {ratio:.2f}x random ({rand['mIoU']:.2f})",
            final["mIoU"] >= TARGET_MIOU and ratio >= TARGET_RATIO,
        ),
        (
            f"text prompts localise: text alone >= {TARGET_TEXT_SHARE:.0%} of all three",
            f"{text:.2f} of {all_three:.2f} ({text / max(all_three, 1e-9):.0%})",
            text >= TARGET_TEXT_SHARE * all_three,
        ),
        (
            f"text adds: mask + point + text >= mask + point + {TARGET_TEXT_GAIN:.1f}",
            f"{all_three:.2f} - {miou['mask + point']:.2f} = {text_gain:+.2f}",
            text_gain >= TARGET_TEXT_GAIN,
        ),
        (
            "a click is ambiguous: point alone below mask alone",
            f"{point:.2f} vs {mask:.2f}",
            point < mask,
        ),
        (
            f"SAM refines: final - coarse >= +{TARGET_REFINE:.0f} mIoU",
            f"{final['mIoU']:.2f} - {coarse['mIoU']:.2f} = {refine:+.2f}",
            refine >= TARGET_REFINE,
        ),
        (
            f"SAM refines: final P@0.9 >= {TARGET_P90_RATIO:.0f}x coarse P@0.9",
            f"{final['P@0.9']:.2f} vs {coarse['P@0.9']:.2f} ({p90_ratio:.2f}x)",
            p90_ratio >= TARGET_P90_RATIO,
        ),
        (
            f"unseen shapes: final mIoU >= {TARGET_UNSEEN_RATIO}x random ({UNSEEN_SPLIT})",
            f"{unseen['final']['mIoU']:.2f} vs {unseen['random']['mIoU']:.2f} "
            f"({unseen_ratio:.2f}x)",
            unseen_ratio >= TARGET_UNSEEN_RATIO,
        ),
    ]


def claims_table(claims: list[tuple[str, str, bool]]) -> str:
    rows = ["| claim (target) | measured | met |", "|---|---|---|"]
    for claim, measured, met in claims:
        rows.append(f"| {claim} | {measured} | {'yes' if met else 'NO'} |")
    return "\n".join(rows)


def predict_on_new_image(checkpoint: Path, out: Path, world: str = "flat") -> str:
    """Render a scene of ``world`` the model never saw and run the three-line example on it, as
    typed."""
    import numpy as np
    from PIL import Image

    from prompt_ris.data.refer import Refer
    from prompt_ris.miniature.synthetic import (
        SYNTHETIC_DATASET,
        SYNTHETIC_SPLIT_BY,
        generate_synthetic,
    )
    from prompt_ris.method_picture import method_picture

    scene_root = out / "new_scene"
    # A seed the training data never used.
    generate_synthetic(scene_root, num_images=1, seed=12345, world=world)
    refer = Refer(scene_root, SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY)
    ref = refer.refs[0]
    image = refer.image_path(ref)
    text = refer.sentences(ref)[0][1]
    example = PYTHON_EXAMPLE.format(checkpoint=checkpoint, image=image, text=text)
    namespace: dict = {}
    exec(compile(example, "<example>", "exec"), namespace)
    rgb = np.asarray(Image.open(image).convert("RGB"))  # (H, W, 3)
    shown = namespace["model"].predict(rgb, text, return_coarse=True, return_probs=True)
    picture = method_picture(
        rgb, text, namespace["mask"], shown.coarse_probs[0], shown.points[0], refer.mask(ref)
    )  # image | coarse mask + point | final mask | ground truth
    picture.save(out / "new_scene_prediction.png")
    return example


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder for data, weights and results")
    parser.add_argument("--num-images", type=int, default=1600, help="synthetic images to render")
    parser.add_argument(
        "--kinds",
        default="attribute",
        help="expression kinds of the synthetic data (attribute, position, relation; see README)",
    )
    parser.add_argument(
        "--world", default="flat",
        help="flat, or ambiguous: shapes inside shapes and same-coloured shapes overlapping",
    )  # fmt: skip
    parser.add_argument("--overlays", type=int, default=8, help="overlay pictures per split")
    parser.add_argument(
        "--ship", default=None, metavar="DIR",
        help="also write the trained model as the shipped model to DIR (scripts/ship_model.py), "
        "e.g. checkpoints/tiny_synthetic_demo",
    )  # fmt: skip
    parser.add_argument(
        "--config", type=Path, default=CONFIG,
        help="training config (default: configs/tiny_synthetic.yaml, the paper's recipe; "
        "configs/tiny_synthetic_grounded.yaml adds the grounded text prompter)",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="training overrides (train.stage1_epochs=2)")
    args = parser.parse_args(argv)
    config = (args.config if args.config.is_file() else REPO / args.config).resolve()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    out = (REPO / args.out).resolve()
    data_root, run_dir = out / "data", out / "train"
    prepared = data_root / "prepared"
    start = time.time()

    print(
        f"[1/4] synthetic referring data ({args.num_images} images of the {args.world} world, "
        f"{args.kinds} expressions) -> {data_root}",
        flush=True,
    )
    subprocess.run(
        [sys.executable, str(REPO / "scripts/make_synthetic.py"), "--out", str(data_root),
         "--num-images", str(args.num_images), "--kinds", args.kinds, "--world", args.world],
        check=True, cwd=REPO,
    )  # fmt: skip

    print("[2/4] training the tiny model: stage 1 (CLIP + CMP), then stage 2 (SAM)", flush=True)
    if run_dir.exists():  # a demo starts afresh (train.py refuses to overwrite a run otherwise)
        print(f"removing the previous demo run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    # The foundations by absolute path, so that the exports load from any folder of this machine
    # (elsewhere, the same file names in the weights folder).
    from prompt_ris.config import load_config

    tiny = load_config(config).model  # the preset's foundation files, relative to the repository
    foundations = [
        f"model.clip.pretrained={REPO / tiny.clip.pretrained}",
        f"model.sam.checkpoint={REPO / tiny.sam.checkpoint}",
    ]
    accelerate_launch(
        "scripts/train.py", "--config", str(config), f"data.prepared={prepared}",
        f"train.output_dir={run_dir}", *foundations, *args.overrides,
    )  # fmt: skip
    checkpoint = run_dir / "final"

    print(
        "[3/4] evaluating on the test split and its seen / unseen parts (every sentence of every "
        "reference), then again with every other set of prompts (Table 5)",
        flush=True,
    )
    results = evaluate_checkpoint(checkpoint, out / "eval", str(prepared), args.overlays)
    splits, ablation = results.splits, results.ablation()
    records = results.records[TEST_SPLIT]
    print("[4/4] predicting on a new image from Python", flush=True)
    example = predict_on_new_image(checkpoint, out, args.world)

    from prompt_ris.config import load_config
    from prompt_ris.engine.tables import split_table

    cfg = load_config(config, args.overrides)
    test = splits[TEST_SPLIT]
    final, random_miou = test["final"]["mIoU"], test["random"]["mIoU"]
    learnt = final >= MIN_RATIO_TO_RANDOM * random_miou
    report = "\n".join([
        "## Results on the synthetic test split (percent)",
        "",
        f"Config {config.name}; trained on {cfg.data.train} (ICL weight {cfg.train.icl_weight:g}); "
        f"star and hexagon are the held-out (unseen) shapes. Expression kinds: {args.kinds}; "
        f"world: {args.world}.",
        "",
        split_table(splits, OUTPUTS),
        "",
        f"## By expression form ({TEST_SPLIT})",
        "",
        form_table(records),
        "",
        *situation_section(records, data_root),
        f"## Every set of prompts (final mask, {TEST_SPLIT}; Table 5)",
        "",
        paper_table(ablation),
        "",
        "## The paper's claims in miniature",
        "",
        claims_table(paper_claims(splits, ablation)),
        "",
        f"ICL (Sec. 4.4), final mask on {TEST_SPLIT}: ImgAcc {test['final']['ImgAcc']:.2f}, "
        f"InstAcc {test['final']['InstAcc']:.2f}",
        f"learnt (final mIoU >= {MIN_RATIO_TO_RANDOM:.0f}x random, the exit status): "
        f"{'yes' if learnt else 'NOT met'}",
        f"total time {(time.time() - start) / 60:.1f} min",
    ])  # fmt: skip
    (out / "demo_results.md").write_text(report + "\n")
    print("\n" + report)
    if args.ship is not None:
        sys.path.insert(0, str(REPO / "scripts"))
        from ship_model import ship

        ship(checkpoint, REPO / args.ship)
    pictures = out / "eval" / "overlays"
    print(f"\nPictures (image | coarse mask + point | final mask | ground truth): {pictures}")
    print(f"Prediction on a new image: {out / 'new_scene_prediction.png'}")
    print("\nLoad the trained weights and predict in Python:\n")
    print(example)
    return 0 if learnt else 1


if __name__ == "__main__":
    sys.exit(main())
