"""The paper workflow as the README tells it, for real, on the tiny model and synthetic data.

From a folder laid out like a fresh clone, with base weights in the real file formats under the
real file names in the weights folder (where ``download_weights.py`` puts them) and a config that
names them by file name only: ``accelerate launch scripts/train.py`` (the launcher's
``--mixed_precision bf16`` respected), a stop, a damaged newest checkpoint, ``--resume <run>``
with no ``--config``, ``evaluation/evaluate.py`` to its default folder, ``compare.py``,
``prompt-ris predict`` from another folder, ``prompt-ris export --self-contained`` and a
prediction from that export where no base weights are. The run folder must be the one the README
documents.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from prompt_ris.cli import main as cli
from prompt_ris.config import load_config
from prompt_ris.data.prepare import prepare_refer
from prompt_ris.miniature.synthetic import SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY, generate_synthetic
from prompt_ris.models import PromptRIS
from prompt_ris.weights import CLIP_FILE, SAM_FILE
from tiny_random import tiny_random

REPO = Path(__file__).resolve().parents[1]
RUN = "checkpoints/tiny_run"  # relative, as the README's checkpoints/refcoco_combined


SIZES = {"clip": {"image_size": 64}, "sam": {"image_size": 128}}  # the tiny preset, halved


def write_base_weights(folder: Path) -> None:
    """Tiny random CLIP (an open_clip state dict) and SAM (a segment_anything state dict) under
    the names download_weights.py writes."""
    torch.manual_seed(0)
    base = PromptRIS.from_config(load_config({"model": tiny_random(**SIZES)}).model)
    folder.mkdir(parents=True)
    torch.save(base.clip.clip.state_dict(), folder / CLIP_FILE)
    sam = {
        f"{part}.{key}": value
        for part in ("image_encoder", "prompt_encoder", "mask_decoder")
        for key, value in getattr(base.sam, part).state_dict().items()
    }
    torch.save(sam, folder / SAM_FILE)


def readme_run_layout() -> set[str]:
    """The top-level entries of the run folder as README.md documents them."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```text\ncheckpoints/refcoco_combined/\n(.*?)```", text, re.S).group(1)
    return {line.split()[0].split("/")[0] for line in block.splitlines()}


def test_paper_workflow_from_a_fresh_clone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("scripts", "evaluation"):
        (clone / name).symlink_to(REPO / name)
    weights = tmp_path / "weights"
    write_base_weights(weights)
    monkeypatch.setenv("PROMPT_RIS_WEIGHTS", str(weights))
    monkeypatch.chdir(clone)
    generate_synthetic(clone / "data", num_images=20, seed=0)
    prepare_refer(
        clone / "data", clone / "data/prepared", [(SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY)],
        check_images="none",
    )  # fmt: skip
    config = {  # the tiny model with frozen base towers named by file name, as the paper's
        "model": {
            "preset": "tiny",
            "clip": {"pretrained": CLIP_FILE, "freeze": True, "image_size": 64},
            "sam": {"checkpoint": SAM_FILE, "image_size": 128, "freeze_image_encoder": True,
                    "freeze_prompt_encoder": True, "freeze_mask_decoder": True},  # fmt: skip
        },
        "data": {"prepared": "data/prepared", "train": "synthetic:train", "val": "synthetic:val",
                 "images_per_step": 2, "expressions_per_image": 2, "num_workers": 0},
        "eval": {"batch_images": 2},
        "train": {"output_dir": RUN, "stage1_epochs": 1, "stage2_epochs": 1,
                  "max_steps_per_epoch": 2, "log_every": 1, "num_overlays": 1},
    }  # fmt: skip
    (clone / "configs").mkdir()
    (clone / "configs" / "tiny.yaml").write_text(yaml.safe_dump(config))

    # 1. Train with the launcher's precision; stop after the first step of stage 2.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
        "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
    ]  # fmt: skip
    proc = subprocess.run(
        [*launch, "scripts/train.py", "--config", "configs/tiny.yaml", "train.stop_at_step=3"],
        env=env, cwd=clone, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (  # the launcher's precision, not overridden by the config's "auto", as applied
        "mixed precision bf16 (autocast to bfloat16); no torch.compile (dynamo backend no); "
        "2 images x 2 expressions per optimizer step = 1 process(es)"
    ) in proc.stderr
    run = clone / RUN
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert steps == ["step_00000002", "step_00000003"]
    assert (run / "checkpoints" / "step_00000003" / "model.safetensors").stat().st_mode & 0o077

    # 2. The newest checkpoint is damaged (a partial copy): resume from the run folder alone.
    damaged = run / "checkpoints" / "step_00000003" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    train = runpy.run_path(str(REPO / "scripts" / "train.py"))["main"]
    with pytest.raises(SystemExit):  # overrides are checked against the run: no other model
        train(["--resume", RUN, "model.cmp.num_prompts=2"])
    assert "another model config" in capsys.readouterr().err
    with caplog.at_level("WARNING"):
        result = train(["--resume", RUN])
    assert result.finished and result.global_step == 4
    assert "step_00000003 (model.safetensors is truncated" in caplog.text
    assert "resuming from" in caplog.text and "step_00000002" in caplog.text
    assert readme_run_layout() - {"eval"} == {p.name for p in run.iterdir()}

    # 3. Evaluate the best export into its default folder, and compare with the paper.
    evaluate = runpy.run_path(str(REPO / "evaluation" / "evaluate.py"))["main"]
    results = evaluate(["--checkpoint", f"{RUN}/best", "--splits", "synthetic:val"])
    saved = json.loads((run / "eval" / "best" / "results.json").read_text())
    assert saved["complete"] and saved["splits"] == results["splits"]
    assert readme_run_layout() == {p.name for p in run.iterdir()}
    compare = runpy.run_path(str(REPO / "evaluation" / "compare.py"))["main"]
    compare(["evaluation/paper_results.json", f"{RUN}/eval/best/results.json"])

    # 4. Predict from another folder; export self-contained; predict from it without weights.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    image = elsewhere / "img.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8)).save(image)
    predict = ["predict", "--image", "img.jpg", "--text", "the red circle", "--device", "cpu"]
    assert cli([*predict, "--checkpoint", str(run / "best"), "--out", "overlay.png"]) == 0
    want = np.asarray(Image.open("overlay_mask.png"))
    portable = tmp_path / "portable"
    assert cli(["export", "--checkpoint", str(run / "best"), "--out", str(portable),
                "--self-contained"]) == 0  # fmt: skip
    monkeypatch.setenv("PROMPT_RIS_WEIGHTS", str(tmp_path / "no_weights_here"))
    assert cli([*predict, "--checkpoint", str(run / "best"), "--out", "x.png"]) == 1
    assert "not found in the weights folder" in capsys.readouterr().err
    assert cli([*predict, "--checkpoint", str(portable), "--out", "again.png"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open("again_mask.png")), want)
