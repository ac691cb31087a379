"""scripts/benchmark.py: the CPU smoke run writes every field; compile failures fall back."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from prompt_ris.config import load_config
from prompt_ris.data.batch import Batch, random_batch
from tiny_random import TINY_RANDOM_ARGS
from repo_scripts import load_script


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    yield load_script("scripts/benchmark.py")


def test_benchmark_tiny_cpu_writes_all_fields(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "bench" / "tiny.json"
    argv = "--preset tiny --device cpu --steps 2 --warmup 1 --reference --out".split() + [str(out)]
    returned = bench.main(argv)
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))

    meta = report["meta"]
    assert meta["command"] == "python scripts/benchmark.py " + " ".join(argv)
    assert meta["torch_version"] == torch.__version__ and meta["device_name"].startswith("cpu")
    assert (meta["preset"], meta["images"], meta["expressions"], meta["dtype"]) == (
        "tiny",
        2,
        2,
        "fp32",
    )
    assert meta["date"][:2] == "20"

    rows = report["measurements"]
    assert list(rows) == [
        "train_stage1",
        "train_stage2",
        "train_stage2_cached",
        "inference",
        "latency",
    ]
    for name, row in rows.items():
        fast, ref = row["fast"], row["reference"]
        for record in (fast, ref):
            assert record["expr_per_s"] > 0, name
            for key in ("command", "device_name", "torch_version", "dtype", "date"):
                assert record[key], (name, key)
        assert (fast["sam_encoder_per"], ref["sam_encoder_per"]) == ("image", "expression")
        assert (fast["sdpa_sam_encoder"], ref["sdpa_sam_encoder"]) == (True, False)
        assert ref["dtype"] == "fp32" and fast["peak_mem_gib"] is None  # no CUDA here
        assert row["speedup"] == pytest.approx(fast["expr_per_s"] / ref["expr_per_s"])
    # The cached stage-2 figure is compared with the reference's plain stage 2.
    assert rows["train_stage2_cached"]["reference"] == rows["train_stage2"]["reference"]
    stage1 = rows["train_stage1"]["fast"]
    assert stage1["expr_per_s"] == pytest.approx(2 * 4 / stage1["seconds"])  # 2 steps x B = 4
    assert stage1["ms_per_step"] == pytest.approx(1e3 * stage1["seconds"] / 2)
    latency = rows["latency"]["fast"]
    assert latency["expr_per_s"] == pytest.approx(1e3 / latency["ms"])
    assert latency["ms"] <= latency["ms_p90"]

    targets = report["targets"]
    assert [t["target"] for t in targets] == [
        "train_stage2.expr_per_s >= 300",
        "train_stage1.expr_per_s >= 450",
        "inference.expr_per_s >= 200",
        "latency.ms < 25",
        "train_stage2.peak_mem_gib < 40",
    ]
    assert not any(t["applies"] for t in targets)  # tiny on CPU is not what they were set for
    assert targets[0]["met"] == (rows["train_stage2"]["fast"]["expr_per_s"] >= 300)
    assert targets[4]["met"] is None  # no CUDA memory statistics on CPU
    assert not list(out.parent.glob("profile_*"))  # only with --profile
    printed = capsys.readouterr().out
    assert "| train_stage2 (expr/s) |" in printed and "| latency.ms < 25 |" in printed


def test_slice_images_keeps_the_first_expressions_of_the_first_images(bench: ModuleType) -> None:
    cfg = load_config(overrides=TINY_RANDOM_ARGS)
    batch = random_batch(cfg, 3, 2)
    length = cfg.model.clip.text_length
    single = bench.slice_images(batch, 1, 1)
    assert isinstance(single, Batch)
    assert single.text_tokens.shape == (1, length) and single.sam_images.shape[0] == 1
    assert torch.equal(single.text_tokens[0], batch.text_tokens[0])
    two = bench.slice_images(batch, 2, 1)  # expressions 0 and 2: the first of images 0 and 1
    assert (two.num_images, two.num_expressions) == (2, 2)
    assert two.image_index.tolist() == [0, 1] and two.texts == [batch.texts[0], batch.texts[2]]
    assert torch.equal(two.gt_masks, batch.gt_masks[[0, 2]])
    assert torch.equal(two.object_ids, batch.object_ids[[0, 2]])
    assert torch.equal(two.clip_images, batch.clip_images[:2])
    assert two.input_sizes.tolist() == [[192, 256]] * 2


def _failing_backend(graph: torch.fx.GraphModule, example_inputs: list) -> None:
    """A torch.compile backend that fails, as inductor does without a working C++ toolchain."""
    raise RuntimeError("no compiler available")


def test_runner_falls_back_to_eager_when_compile_fails(
    bench: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    runner = bench.Runner(torch.nn.ReLU(), compile_model=True, backend=_failing_backend)
    assert runner.compiled
    results = []
    with caplog.at_level(logging.WARNING, logger="benchmark"):
        runner.first_step(lambda: results.append(runner(torch.ones(2))))
    assert not runner.compiled
    assert "running eagerly" in caplog.text
    assert len(results) == 1 and torch.equal(results[0], torch.ones(2))
    assert torch.equal(runner(-torch.ones(1)), torch.zeros(1))


def test_write_profile_lists_top_ops(bench: ModuleType, tmp_path: Path) -> None:
    left, right = torch.randn(64, 64), torch.randn(64, 64)
    out = tmp_path / "profile_matmul.txt"
    bench.write_profile(lambda: torch.mm(left, right).relu(), 2, torch.device("cpu"), out)
    table = out.read_text()
    assert table.startswith("# top ops by self CPU time")
    rows = [line.split()[0] for line in table.splitlines() if line.strip().startswith("aten::")]
    assert "aten::mm" in rows and "aten::relu" in rows
    assert "# of Calls" in table
