"""The paper's full-size model (the ``vit_b`` preset) through every command, on CPU, from weight
files in the upstream formats.

Random weights written exactly as the real files are (an open_clip ``ViT-B-16`` state dict at
224 saved with ``torch.save(model.state_dict())`` as ``scripts/download_weights.py`` does, and a
segment_anything ``sam_model_registry["vit_b"]()`` state dict as ``sam_vit_b_01ec64.pth``), a
refer-format data folder with ``refcoco``, ``refcoco+`` and ``refcocog`` (umd and google) as
``configs/refcoco_combined.yaml`` needs them, then the commands a user runs:
``scripts/prepare_data.py``, ``accelerate launch scripts/train.py --config
configs/refcoco_combined.yaml`` stopped after the stage-1 step (``train.stop_at_step``) and
resumed (``--resume``) through a stage-2 step and the exports, ``evaluation/evaluate.py`` on
``refcoco:val`` and ``prompt-ris predict`` (as ``python -m prompt_ris predict``, the same entry
point) with the exported checkpoint.

Kept lean for CI: full-size models (CLIP at 480, SAM at 1024: the paper's setting), but 1 image x
2 expressions per step, one step per stage and one expression per validation/evaluation split.
Measured on a 2-core CPU machine shared with other jobs, one thread per process: 4.0 to 4.5
minutes (242 s on its own, 239 and 271 s inside the full suite; the resumed run, with a stage-2
step, two validations and the exports, takes half of it), 6.3 GB peak RSS (the training process in
stage 2; 4.0 GB in stage 1) and about 5 GB of temporary files, removed at the end (a resumable
checkpoint of the full model is 1.6 GB). Select it with ``-m full_size`` or leave it out with
``-m "not full_size"``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from segment_anything import sam_model_registry

from prompt_ris.data.refer import REFER_IMAGE_DIR
from prompt_ris.miniature.synthetic import SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY, generate_synthetic

pytestmark = pytest.mark.full_size

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # per command; the whole test takes about 4 minutes on 2 cores
# (dataset, splitBy) -> refer split of each synthetic split: the layout of the real folders.
REFER_COPIES = {
    ("refcoco", "unc"): {"train": "train", "val": "val", "testA": "testA", "testB": "testB"},
    ("refcoco+", "unc"): {"train": "train", "val": "val", "testA": "testA", "testB": "testB"},
    ("refcocog", "umd"): {"train": "train", "val": "val", "testA": "test", "testB": "test"},
    ("refcocog", "google"): {"train": "train", "val": "val", "testA": "val", "testB": "val"},
}


def write_upstream_weights(out_dir: Path) -> tuple[Path, Path]:
    """Random CLIP ViT-B/16 and SAM ViT-B weights in the formats of the published files."""
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    clip_path = out_dir / "clip_vit_b16_openai.pt"  # as scripts/download_weights.py saves it
    torch.save(clip.state_dict(), clip_path)
    del clip
    sam_path = out_dir / "sam_vit_b_01ec64.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), sam_path)
    return clip_path, sam_path


def write_refer_folders(root: Path) -> None:
    """refcoco / refcoco+ / refcocog in the refer layout, made from a small synthetic set.

    Each copy keeps one reference per image with its first sentence, so that a validation or
    evaluation split of one image is one expression (the full-size model runs CLIP's image tower
    once per expression); the combined training set then gives each training image three
    expressions, one per dataset.
    """
    generate_synthetic(root, num_images=10, seed=0, kinds=("attribute",))
    source = root / SYNTHETIC_DATASET
    refs = pickle.loads((source / f"refs({SYNTHETIC_SPLIT_BY}).p").read_bytes())
    first = {}
    for ref in refs:
        first.setdefault(ref["image_id"], ref)
    for (dataset, split_by), splits in REFER_COPIES.items():
        folder = root / dataset
        folder.mkdir(exist_ok=True)
        (folder / "instances.json").write_bytes((source / "instances.json").read_bytes())
        copies = [
            {**ref, "split": splits[ref["split"]], "sentences": ref["sentences"][:1],
             "sent_ids": ref["sent_ids"][:1]}
            for ref in first.values()
        ]  # fmt: skip
        with (folder / f"refs({split_by}).p").open("wb") as handle:
            pickle.dump(copies, handle, protocol=2)


def run(command: list[str], timings: dict[str, tuple], name: str) -> str:
    """Run a command of the pipeline with this checkout's package; its output on failure.

    Records (seconds, peak RSS in GB of the largest command so far) under ``timings[name]``.
    """
    env = {  # subprocesses import this checkout's package, single-threaded as the suite runs
        **os.environ, "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # so far, any command
    timings[name] = (round(time.perf_counter() - start, 1), round(peak_gb, 2))
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def test_vit_b_from_upstream_files_trains_resumes_exports_evaluates_and_predicts(
    tmp_path: Path,
) -> None:
    clip_path, sam_path = write_upstream_weights(tmp_path)
    clip_keys = torch.load(clip_path, map_location="cpu", weights_only=True)
    assert clip_keys["visual.positional_embedding"].shape == (14 * 14 + 1, 768)  # 224, as published
    del clip_keys
    data = tmp_path / "refer"
    write_refer_folders(data)
    timings: dict[str, tuple] = {}
    python, launch = sys.executable, [sys.executable, "-m", "accelerate.commands.launch"]
    launch += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no"]

    prepared = tmp_path / "prepared"
    prep = [python, "scripts/prepare_data.py", "--root", str(data), "--out", str(prepared)]
    run([*prep, "--datasets", *(f"{d}:{s}" for d, s in REFER_COPIES)], timings, "prepare")

    out = tmp_path / "run"
    train = [
        *launch, "scripts/train.py", "--config", "configs/refcoco_combined.yaml",
        f"model.clip.pretrained={clip_path}", f"model.sam.checkpoint={sam_path}",
        f"data.prepared={prepared}", "data.images_per_step=1", "data.expressions_per_image=2",
        "data.num_workers=0", "train.stage1_epochs=1", "train.stage2_epochs=1",
        "train.max_steps_per_epoch=1", "train.num_overlays=0", "train.log_every=1",
        f"train.output_dir={out}",
    ]  # fmt: skip
    log = run([*train, "train.stop_at_step=1"], timings, "train until killed")
    assert "stopped at step 1" in log and not (out / "final").exists()
    assert "1 images x 2 expressions per optimizer step = 1 process(es) x 1 images" in log
    assert "train split combined: 21 refs, 7 images, 21 expressions" in log
    log = run([*train, "--resume"], timings, "resume to the end")
    assert "resumed from" in log and "global step 1)" in log

    # The exports: learned weights only, and a config naming the upstream files.
    for export in ("stage1", "best", "final"):
        assert (out / export / "model.safetensors").is_file(), export
    meta = json.loads((out / "final" / "config.json").read_text())
    model_cfg = meta["config"]["model"]
    assert model_cfg["preset"] == "vit_b" and model_cfg["clip"]["image_size"] == 480
    assert model_cfg["clip"]["pretrained"] == str(clip_path)
    assert model_cfg["sam"]["checkpoint"] == str(sam_path)
    with safe_open(str(out / "final" / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        learned = sum(math.prod(handle.get_slice(k).get_shape()) for k in keys)
    assert keys and not any(k.startswith(("clip.clip.", "sam.image_encoder.")) for k in keys)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss/total" in r]
    assert [r["stage"] for r in losses] == [1, 2] and all(
        np.isfinite(r["loss/total"]) for r in losses
    )
    assert "val/final_oIoU" in records[-1]

    # Evaluation on one split, with the exported checkpoint and the upstream files it names.
    evaluated = tmp_path / "eval"
    run(
        [python, "evaluation/evaluate.py", "--checkpoint", str(out / "final"), "--splits",
         "refcoco:val", "--output", str(evaluated), f"data.prepared={prepared}",
         "data.num_workers=0"],
        timings, "evaluate",
    )  # fmt: skip
    scores = json.loads((evaluated / "results.json").read_text())["splits"]["refcoco:val"]
    assert {"coarse", "final", "random"} <= scores.keys()  # one val image, one expression
    assert scores["final"]["num_expressions"] == 1 and 0 <= scores["final"]["mIoU"] <= 100
    assert len((evaluated / "records.jsonl").read_text().splitlines()) == 1

    # prompt-ris predict on a training image.
    image = next((data / REFER_IMAGE_DIR).glob("*.png"))
    overlay = tmp_path / "overlay.png"
    run(
        [python, "-m", "prompt_ris", "predict", "--checkpoint", str(out / "final"), "--image",
         str(image), "--text", "the red shape", "--out", str(overlay), "--device", "cpu"],
        timings, "predict",
    )  # fmt: skip
    mask = np.asarray(Image.open(overlay.with_name("overlay_mask.png")))  # (H, W) 0/255
    assert mask.shape == np.asarray(Image.open(image)).shape[:2] and set(np.unique(mask)) <= {
        0, 255
    }  # fmt: skip
    assert Image.open(overlay).size[0] >= mask.shape[1]
    own_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"\nfull size: {timings}; test process {own_gb:.2f} GB; {learned} learned parameters")
    shutil.rmtree(out / "checkpoints")  # about 5 GB with the weight files: do not keep them
    clip_path.unlink()
    sam_path.unlink()
