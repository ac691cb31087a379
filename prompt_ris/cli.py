"""``prompt-ris`` command line: segment what an expression describes with a trained checkpoint,
export checkpoints, and try one in the browser.

Examples::

    prompt-ris predict --checkpoint checkpoints/run1/best --image a.jpg \\
        --text "the man on the left" --out overlay.png          # + overlay_mask.png
    prompt-ris predict --checkpoint ... --image photos/ --text "the dog" --out-dir masks/
    prompt-ris predict --checkpoint ... --batch jobs.json --out-dir masks/
    prompt-ris export --checkpoint checkpoints/run1/best --out run1_portable --self-contained
    prompt-ris app [--checkpoint ...] [--host 127.0.0.1] [--port 7860] [--device cuda]

``jobs.json`` is a list of ``{"image": "path", "text": "expression"}`` (``text`` may be a list);
relative image paths are read from the JSON file's folder. Batch modes write
``<name>_mask.png`` (0/255) and ``<name>_overlay.png`` per expression plus ``predictions.json``,
go on past a bad image or expression, and exit with 1 if any failed. In a folder, images of the
same name (``a.jpg``, ``a.png``) write ``a_jpg_*`` and ``a_png_*``; no two outputs ever share a
file, and no output overwrites an input.

``export`` writes a checkpoint that loads anywhere: ``--self-contained`` stores the base CLIP and
SAM weights too (no weight files needed to load it); without it, the learned weights only, naming
the base weights by file name, found through the weights folder (``$PROMPT_RIS_WEIGHTS``).

Every user error (bad arguments, a ``--device`` this machine lacks, missing or mismatched
checkpoint, a file of a checkpoint instead of its folder, missing base weights, unreadable image,
empty expression, NaN weights) ends the program with one ``prompt-ris: error: ...`` line per
problem and exit code 1, found before the model is loaded where it can be;
``--verbose`` shows the traceback instead. The heavy imports happen after the arguments are
parsed, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from prompt_ris.prompt_switches import PROMPT_TYPES, PromptSwitches, SwitchesError

if TYPE_CHECKING:  # imported in the commands, after the arguments are parsed
    from prompt_ris.predictor import Predictor

logger = logging.getLogger(__name__)

PROG = "prompt-ris"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
OVERLAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")  # Pillow writes
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")  # lossless: a mask must read back exactly
SUMMARY_NAME = "predictions.json"
USER_ERRORS = (OSError, ValueError, RuntimeError)  # reported as one line (see module docstring)


class UsageProblems(ValueError):
    """Several problems with the command line, each reported on its own line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class Job:
    """Expressions about one image and the (overlay, mask) files each one is written to."""

    image: Path
    texts: list[str]
    outputs: list[tuple[Path, Path]]


def _parse_switches(text: str) -> PromptSwitches:
    try:
        return PromptSwitches.parse(text)
    except SwitchesError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("predict", help="segment the object an expression refers to")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or .safetensors file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="an image file, or a folder of images")
    source.add_argument("--batch", type=Path, help='JSON list of {"image": ..., "text": ...}')
    p.add_argument("--text", action="append", default=[], help="expression (repeatable)")
    p.add_argument("--out", type=Path, help="overlay file for a single image (e.g. overlay.png)")
    p.add_argument("--mask-out", type=Path, help="mask file (default: <out stem>_mask.png)")
    p.add_argument("--out-dir", type=Path, help="output folder (folder and --batch modes)")
    p.add_argument(
        "--switches", type=_parse_switches, default=None,
        help="prompts reaching SAM, e.g. 'mask + text' (default: the checkpoint's own)",
    )  # fmt: skip
    for name in PROMPT_TYPES:
        p.add_argument(f"--no-{name}", action="store_true", help=f"leave out the {name} prompt")
    p.add_argument(
        "--threshold", type=float, default=None,
        help="mask probability in (0, 1) (default: prompt_ris.metrics.DEFAULT_THRESHOLD)",
    )  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--clip-weights", default=None, help="local CLIP weights (overrides config)")
    p.add_argument("--sam-weights", default=None, help="local SAM checkpoint (overrides config)")
    p.add_argument("-v", "--verbose", action="store_true", help="log details, show tracebacks")

    e = commands.add_parser(
        "export", help="write a checkpoint for another machine (self-contained: no base weights)"
    )
    e.add_argument("--checkpoint", required=True, help="checkpoint folder (e.g. <run>/best)")
    e.add_argument("--out", type=Path, required=True, help="new folder to write")
    e.add_argument(
        "--self-contained",
        action="store_true",
        help="also store the base CLIP and SAM weights, so that loading needs no weight files",
    )
    e.add_argument("--clip-weights", default=None, help="local CLIP weights (overrides config)")
    e.add_argument("--sam-weights", default=None, help="local SAM checkpoint (overrides config)")
    e.add_argument(
        "--results", type=Path, default=None,
        help="results.json whose figures the model card states (default: the checkpoint's "
        "<run>/eval/<name>/results.json when it exists)",
    )  # fmt: skip
    e.add_argument("-v", "--verbose", action="store_true", help="log details, show tracebacks")

    a = commands.add_parser(
        "app", help="try a model in the browser (needs the app extra: pip install -e .[app])"
    )
    a.add_argument(
        "--checkpoint", default=None,
        help="checkpoint folder (default: the shipped checkpoints/tiny_synthetic_demo)",
    )  # fmt: skip
    a.add_argument("--host", default="127.0.0.1", help="address to serve on (default: loopback)")
    a.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    a.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    a.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    a.add_argument("-v", "--verbose", action="store_true", help="log details, show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 error, 2 usage error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"{PROG}: %(levelname)s: %(message)s",
    )
    command = {"export": run_export, "app": run_app}.get(args.command, run_predict)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return command(args)
        except USER_ERRORS as err:
            if args.verbose:
                raise
            for problem in getattr(err, "problems", [str(err)]):
                _error(problem)
            return 1


def load_checked(checkpoint: str, clip_weights: str | None, sam_weights: str | None) -> Any:
    """``PromptRIS.from_pretrained`` after checking, without building anything, that the
    checkpoint reads and that the base weights it needs exist (every problem, one per line)."""
    from prompt_ris.models import PromptRIS
    from prompt_ris.models.build import base_weight_problems
    from prompt_ris.models.hub import checkpoint_folder
    from prompt_ris.models.pretrained import KIND_FULL, read_checkpoint

    checkpoint = str(checkpoint_folder(checkpoint))  # a hub id ``owner/name`` is fetched
    saved = read_checkpoint(checkpoint)
    if saved.kind != KIND_FULL:
        problems = base_weight_problems(saved.config.model, clip_weights, sam_weights)
        if problems:
            raise UsageProblems(problems)
    return PromptRIS.from_pretrained(checkpoint, clip_weights=clip_weights, sam_weights=sam_weights)


def run_predict(args: argparse.Namespace) -> int:
    """The ``predict`` command: plan the jobs, load the model once, run them."""
    jobs = _plan_jobs(args)
    from prompt_ris.metrics import DEFAULT_THRESHOLD
    from prompt_ris.predictor import Predictor, device_problem

    problem = None if args.device is None else device_problem(args.device)
    _require(problem is None, f"--device {args.device}: {problem}; use --device cpu")
    model = load_checked(args.checkpoint, args.clip_weights, args.sam_weights)
    dtype = None if args.dtype == "auto" else args.dtype
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    predictor = Predictor(model, device=args.device, dtype=dtype, threshold=threshold)
    switches = (args.switches or model.default_switches).without(
        *(name for name in PROMPT_TYPES if getattr(args, f"no_{name}"))
    )
    single = args.image is not None and args.image.is_file()
    records: list[dict[str, Any]] = []
    for job in jobs:
        try:
            records.extend(_run_job(predictor, job, switches, single))
        except USER_ERRORS as err:
            if single or args.verbose:
                raise
            image = str(job.image)
            problem = str(err) if image in str(err) else f"{image}: {err}"
            _error(f"{problem}; skipped this image, the others are predicted")
            records.extend({"image": image, "text": t, "error": str(err)} for t in job.texts)
    failed = sum("error" in record for record in records)
    if not single:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        summary = args.out_dir / SUMMARY_NAME
        summary.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
        _say(f"wrote {len(records) - failed} mask(s) and {summary}")
    if failed:
        done = len(records) - failed
        rest = f"the other {done} were predicted" if done else "none was predicted"
        _error(
            f"{failed} of {len(records)} expressions failed (see above and {SUMMARY_NAME}); {rest}"
        )
        return 1
    return 0


def _run_job(
    predictor: Predictor, job: Job, switches: PromptSwitches, strict: bool
) -> list[dict[str, Any]]:
    """Predict all expressions of one image in one batch and write their files.

    An empty expression raises when ``strict``; otherwise it gets an error record and the
    other expressions of the image are still predicted.
    """
    import numpy as np
    from PIL import Image

    from prompt_ris.data.text import EmptyExpressionError, tokenize
    from prompt_ris.data.transforms import as_rgb_image
    from prompt_ris.method_picture import method_picture

    records: list[dict[str, Any]] = [{"image": str(job.image), "text": t} for t in job.texts]
    todo = list(range(len(job.texts)))
    if not strict:  # drop empty expressions here so that the others still run
        for k, text in enumerate(job.texts):
            try:
                tokenize(text, predictor.model.text_length)  # raises if empty
            except EmptyExpressionError as err:
                _error(f"{job.image}: {err}")
                records[k]["error"] = str(err)
                todo.remove(k)
    if not todo:
        return records
    rgb = as_rgb_image(job.image)
    predictor.set_image(rgb)
    prediction = predictor.predict(
        [job.texts[k] for k in todo], switches=switches, return_coarse=True, return_probs=True
    )
    for row, (k, mask) in enumerate(zip(todo, prediction.masks)):
        overlay_path, mask_path = job.outputs[k]
        for path in (overlay_path, mask_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)  # (H, W) 0/255
        method_picture(
            np.asarray(rgb), job.texts[k], mask, prediction.coarse_probs[row],
            prediction.points[row],
        ).save(overlay_path)  # image | coarse mask + point | final mask
        fraction = float(mask.mean())
        _say(f"{job.image}: {job.texts[k]!r} -> {overlay_path}, {mask_path} ({fraction:.1%})")
        records[k].update(overlay=str(overlay_path), mask=str(mask_path), mask_fraction=fraction)
    return records


# --------------------------------------------------------------------------------------------
# Planning: which image gets which expressions and output files
# --------------------------------------------------------------------------------------------
def _plan_jobs(args: argparse.Namespace) -> list[Job]:
    """Check the arguments and list the jobs (before any model is loaded): the argument
    combination, the threshold, the output file types, and that no two outputs share a file."""
    _require(
        args.threshold is None or 0.0 < args.threshold < 1.0,
        f"--threshold {args.threshold} is not a probability in (0, 1); e.g. --threshold 0.5",
    )
    jobs = _jobs(args)
    outputs = [path for job in jobs for pair in job.outputs for path in pair]
    for overlay, mask in (pair for job in jobs for pair in job.outputs):
        _require(
            overlay.suffix.lower() in OVERLAY_SUFFIXES,
            f"overlay file '{overlay}' needs an image extension ({', '.join(OVERLAY_SUFFIXES)}), "
            "e.g. --out overlay.png",
        )
        _require(
            mask.suffix.lower() in MASK_SUFFIXES,
            f"mask file '{mask}' needs a lossless image extension ({', '.join(MASK_SUFFIXES)}), "
            "e.g. --mask-out mask.png",
        )
    same = [path for path, n in Counter(_real(p) for p in outputs).items() if n > 1]
    if same:
        raise ValueError(
            f"two outputs would be written to '{same[0]}'; give --out and --mask-out "
            "different names"
        )
    inputs = {_real(job.image) for job in jobs}
    clobber = [p for p in outputs if _real(p) in inputs]
    if clobber:
        raise ValueError(
            f"output '{clobber[0]}' is an input image; choose another --out / --out-dir"
        )
    return jobs


def _real(path: Path) -> str:
    return os.path.normcase(os.path.realpath(path))


def _jobs(args: argparse.Namespace) -> list[Job]:
    """The jobs the arguments describe (folder, JSON batch or single image)."""
    if args.batch is not None or args.image.is_dir():
        _require(
            args.out is None and args.mask_out is None,
            "--out and --mask-out are for a single image; use --out-dir",
        )
    if args.batch is not None:
        _require(not args.text, "--text is not used with --batch (the JSON file gives the texts)")
        _require(args.out_dir is not None, "--batch needs --out-dir")
        return _jobs_from_json(args.batch, args.out_dir)
    _require(bool(args.text), "give the expression with --text")
    if args.image.is_dir():
        _require(len(args.text) == 1, "a folder of images takes exactly one --text")
        _require(args.out_dir is not None, "a folder of images needs --out-dir")
        images = sorted(p for p in args.image.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        _require(bool(images), f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{args.image}'")
        stems = Counter(image.stem for image in images)
        return [
            Job(image, list(args.text), [_outputs(args.out_dir, _output_name(image, stems))])
            for image in images
        ]
    if not args.image.is_file():
        raise FileNotFoundError(f"image '{args.image}' does not exist; check the path")
    _require(
        (args.out is None) != (args.out_dir is None), "give either --out FILE or --out-dir DIR"
    )
    return [Job(args.image, list(args.text), list(_single_outputs(args)))]


def _single_outputs(args: argparse.Namespace) -> Iterator[tuple[Path, Path]]:
    """(overlay, mask) paths for the expressions of the single-image mode."""
    many = len(args.text) > 1
    _require(not (many and args.mask_out), "--mask-out takes one --text; use --out instead")
    for k in range(len(args.text)):
        if args.out_dir is not None:
            yield _outputs(args.out_dir, f"{args.image.stem}_{k}" if many else args.image.stem)
            continue
        out = args.out.with_name(f"{args.out.stem}_{k}{args.out.suffix}") if many else args.out
        yield out, args.mask_out or out.with_name(f"{out.stem}_mask.png")


def _jobs_from_json(path: Path, out_dir: Path) -> list[Job]:
    """Read a JSON list of {"image", "text"}; entries about the same image share one job."""
    if not path.is_file():
        raise FileNotFoundError(f"batch file '{path}' does not exist")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"batch file '{path}' is not valid JSON ({err})") from err
    _require(
        isinstance(entries, list) and bool(entries),
        f"batch file '{path}' must hold a non-empty JSON list of "
        '{"image": "path", "text": "expression"} objects',
    )
    jobs: dict[Path, Job] = {}
    for i, entry in enumerate(entries):
        _require(
            isinstance(entry, dict) and {"image", "text"} <= set(entry),
            f"batch file '{path}' entry {i} must be an object with \"image\" and \"text\"",
        )
        texts = entry["text"] if isinstance(entry["text"], list) else [entry["text"]]
        _require(
            all(isinstance(t, str) for t in texts),
            f"batch file '{path}' entry {i}: \"text\" must be a string or a list of strings",
        )
        image = path.parent / str(entry["image"])  # relative to the JSON file's folder
        job = jobs.setdefault(image, Job(image, [], []))
        for k, text in enumerate(texts):
            job.texts.append(text)
            job.outputs.append(_outputs(out_dir, f"{i:04d}_{k}_{image.stem}"))
    return list(jobs.values())


def _output_name(image: Path, stems: Counter[str]) -> str:
    """``a`` for ``a.jpg``; ``a_jpg`` when another image of the folder is also named ``a``."""
    return image.stem if stems[image.stem] == 1 else f"{image.stem}_{image.suffix[1:]}"


def _outputs(out_dir: Path, name: str) -> tuple[Path, Path]:
    return out_dir / f"{name}_overlay.png", out_dir / f"{name}_mask.png"


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------
def run_export(args: argparse.Namespace) -> int:
    """The ``export`` command: load a checkpoint and write it to a new folder, self-contained
    (every weight) or learned-only with its base weights named by file name."""
    out = args.out
    _require(
        not (out.exists() and (not out.is_dir() or any(out.iterdir()))),
        f"--out '{out}' already exists; give a new folder",
    )
    from prompt_ris.models.hub import write_card
    from prompt_ris.models.pretrained import read_checkpoint
    from prompt_ris.weights import names_a_file

    saved = read_checkpoint(args.checkpoint)
    model = load_checked(args.checkpoint, args.clip_weights, args.sam_weights)
    if not args.self_contained:  # name the base weights as the weights folder holds them
        model_cfg = model.config.model
        clip = args.clip_weights or model_cfg.clip.pretrained
        if clip is not None and names_a_file(clip):
            model_cfg.clip.pretrained = Path(clip).name
        sam = args.sam_weights or model_cfg.sam.checkpoint
        if sam is not None:
            model_cfg.sam.checkpoint = Path(sam).name
    training = {**saved.training, "exported_from": str(args.checkpoint)}
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, self_contained=args.self_contained, training=training)
    write_card(tmp, _export_results(args), name=out.name, load_from=str(out))  # README.md
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    kind = "self-contained" if args.self_contained else "learned weights only"
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    _say(f"wrote {out} ({kind}, {size:.1f} MB); load it with PromptRIS.from_pretrained('{out}')")
    return 0


def _export_results(args: argparse.Namespace) -> dict[str, Any] | None:
    """The evaluation figures an export's card states: --results, else the checkpoint's own
    evaluation (``<run>/eval/<name>/results.json``), else none."""
    path = args.results
    if path is None:
        folder = Path(args.checkpoint)
        path = folder.parent / "eval" / folder.name / "results.json"
        if not path.is_file():
            return None
    if not path.is_file():
        raise FileNotFoundError(f"--results '{path}' does not exist; give a results.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"--results '{path}' is not valid JSON ({err})") from err


# --------------------------------------------------------------------------------------------
# App
# --------------------------------------------------------------------------------------------
SHIPPED_CHECKPOINT = "checkpoints/tiny_synthetic_demo"  # under the source tree


def run_app(args: argparse.Namespace) -> int:
    """The ``app`` command: load the model, then serve the page until interrupted."""
    _require(0 < args.port < 65536, f"--port {args.port} is not a port; e.g. --port 7860")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError(
            "the app needs Gradio, which is not installed; run: pip install -e '.[app]'"
        ) from None
    from prompt_ris.app.answers import Answerer
    from prompt_ris.app.server import serve
    from prompt_ris.predictor import device_problem, resolve_device
    from prompt_ris.weights import SOURCE_TREE

    problem = None if args.device is None else device_problem(args.device)
    _require(problem is None, f"--device {args.device}: {problem}; use --device cpu")
    checkpoint = args.checkpoint or str(SOURCE_TREE / SHIPPED_CHECKPOINT)
    model = load_checked(checkpoint, None, None)
    answerer = Answerer(model, device=resolve_device(args.device, model))
    _say(f"serving {checkpoint} on http://{args.host}:{args.port} (Ctrl+C stops)")
    serve(answerer, host=args.host, port=args.port, share=args.share)
    return 0


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _say(message: str) -> None:
    sys.stdout.write(message + "\n")


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {' '.join(message.split())}\n")


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    sys.stderr.write(f"{PROG}: warning: {' '.join(str(message).split())}\n")
