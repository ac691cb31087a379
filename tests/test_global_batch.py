"""The paper's global batch on any launch: 1 process x 16 images, 2 processes x 8 images (gloo DDP
on CPU) and 1 process x 2 accumulated micro-batches of 8 take the same optimizer steps.

The runs train stage 1 only: its forward pass draws nothing at random (the Gumbel point and the
prompt dropout are stage 2's, and their draws are seeded per process and micro-batch, so they
differ between launches by design), and the tiny preset keeps no batch statistics.
What stays different is the order of the floating-point sums (a mean over 16 images against a
mean of two means over 8), so losses agree to float32 rounding and the parameters after AdamW
steps agree to a small share of the learning rate (2 %; measured: 0.6 %), while every step moves
them by about the learning rate itself.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file

from prompt_ris.config import ConfigError, load_config
from prompt_ris.data.loader import build_train_loader
from prompt_ris.data.prepare import prepare_refer
from prompt_ris.engine.trainer import train
from prompt_ris.miniature.synthetic import SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY, generate_synthetic
from prompt_ris.models import PromptRIS
from tiny_random import tiny_random

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3
STEPS = 2  # 35 training images // 16 per step


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50 synthetic images (35 train), and a config of the tiny preset at small image sizes:
    16 images x 2 expressions per step, stage 1 only, no validation."""
    root = tmp_path_factory.mktemp("global_batch")
    generate_synthetic(root, num_images=50, seed=3)
    prepare_refer(
        root, root / "prepared", [(SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY)], check_images="none"
    )
    config = {
        "model": tiny_random(clip={"image_size": 64}, sam={"image_size": 128}),
        "data": {
            "prepared": str(root / "prepared"), "train": "synthetic:train", "val": "synthetic:val",
            "images_per_step": 16, "expressions_per_image": 2, "num_workers": 0,
        },
        "train": {
            "stage1_epochs": 1, "stage2_epochs": 0, "lr": LR, "val_every": 0, "log_every": 1,
            "num_overlays": 0,
        },
    }  # fmt: skip
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _records(output_dir: Path) -> dict[int, dict[str, float]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss/total" in r}


def _launch_two_processes(config_file: Path, output_dir: Path) -> str:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "scripts" / "train.py"), "--config", str(config_file),
        f"train.output_dir={output_dir}",
    ]  # fmt: skip
    env = {  # the subprocesses import this checkout's package
        **os.environ, "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def test_two_processes_and_accumulation_take_the_steps_of_one_process(
    config_file: Path, tmp_path: Path
) -> None:
    one = train(load_config(config_file, [f"train.output_dir={tmp_path / 'one'}"]))
    accumulated = train(
        load_config(
            config_file,
            [f"train.output_dir={tmp_path / 'accumulated'}", "data.images_per_process=8"],
        )
    )
    log = _launch_two_processes(config_file, tmp_path / "two")
    assert "2 process(es)" in log
    assert "16 images x 2 expressions per optimizer step = 2 process(es) x 8 images" in log
    assert one.global_step == accumulated.global_step == STEPS

    # The same steps, the same schedule, the same losses.
    want = _records(tmp_path / "one")
    assert sorted(want) == list(range(1, STEPS + 1))
    for run in ("accumulated", "two"):
        got = _records(tmp_path / run)
        assert got.keys() == want.keys(), run
        for step in want:
            assert got[step]["lr"] == want[step]["lr"], (run, step)
            for key in ("loss/total", "loss/clipseg", "loss/icl_coarse"):
                assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (run, step, key)
    # The lr logged after step k is the next step's: poly decay over the 2 steps of the run.
    assert [want[k]["lr"] for k in (1, 2)] == [pytest.approx(LR * 0.5**0.9), 0.0]

    # The same parameters after the two AdamW steps.
    reference = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    cfg = load_config(config_file)
    set_seed(cfg.train.seed)  # what `train` starts from: the model built right after set_seed
    initial = PromptRIS.from_config(cfg.model).state_dict()
    moved = max((reference[k] - initial[k]).abs().max().item() for k in reference)
    assert moved > 0.5 * LR  # the steps did move the weights (by about lr per step)
    for run in ("accumulated", "two"):
        params = load_file(str(tmp_path / run / "final" / "model.safetensors"))
        assert params.keys() == reference.keys()
        worst = max(_difference(params[k], reference[k], k) for k in reference)
        assert worst < 0.02 * LR, (run, worst)


def _difference(a: torch.Tensor, b: torch.Tensor, name: str) -> float:
    """Largest absolute difference, leaving out the key bias of every attention.

    The key bias k_b adds q . k_b to every logit of a query's softmax, which the softmax ignores:
    its gradient is zero but for rounding, and AdamW's first steps scale that rounding noise up
    to about +-lr, whatever its size. Every other element is compared.
    """
    diff = (a - b).abs()
    if name.endswith("in_proj_bias"):  # [q_b; k_b; v_b]
        width = diff.numel() // 3
        diff = torch.cat([diff[:width], diff[2 * width :]])
    return diff.max().item()


def test_a_batch_that_does_not_divide_fails_before_anything_is_built(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the batch was checked")

    monkeypatch.setattr(PromptRIS, "from_config", never)
    cfg = load_config(config_file, [f"train.output_dir={tmp_path}", "data.images_per_process=5"])
    with pytest.raises(ConfigError, match="choose data.images_per_process from 1, 2, 4, 8 or 16$"):
        train(cfg)
    cfg = load_config(config_file, [f"train.output_dir={tmp_path}", "train.epoch_unit=sentences"])
    with pytest.raises(ConfigError, match=r"train.epoch_unit='sentences'; choose one of"):
        train(cfg)


def test_the_train_loader_follows_the_epoch_unit_and_logs_both_readings(
    config_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    counts = {}
    for unit in ("images", "expressions"):
        cfg = load_config(config_file, [f"train.epoch_unit={unit}"])
        with caplog.at_level("INFO", logger="prompt_ris.data.loader"):
            loader = build_train_loader(cfg)
        counts[unit] = [len(g.expressions) for g in loader.dataset.groups]
        sampler = loader.batch_sampler
        draws = sum(math.ceil(n / 2) for n in counts[unit]) if unit == "expressions" else 35
        assert len(loader) == sampler.steps_per_epoch == draws // 16
    assert counts["images"] == counts["expressions"] and len(counts["images"]) == 35
    expected = sum(math.ceil(n / 2) for n in counts["images"]) // 16
    assert f"an epoch is 2 (images) or {expected} (expressions) optimizer steps" in caplog.text
    assert expected > 2
