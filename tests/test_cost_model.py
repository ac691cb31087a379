"""scripts/cost_model.py: FLOPs of a known layer by hand, and the arithmetic of its report."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from prompt_ris.config import load_config
from prompt_ris.data.schedule import combined_train_size_bounds
from prompt_ris.models.build import build_sam
from prompt_ris.models.fast_attention import use_sdpa_in_sam_encoder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = runpy.run_path(str(ROOT / "scripts" / "cost_model.py"))


def test_sam_vit_b_image_encoder_flops_by_hand() -> None:
    """SAM ViT-B at 1024, counted on the meta device, against the formula (2 FLOPs per MAC).

    64 x 64 = 4096 tokens of width D = 768; 8 windowed blocks (14 x 14 windows: the grid padded to
    70 x 70, 25 windows of 196 tokens) and 4 global ones. A block: qkv and projection on the
    tokens it attends over (8 D^2 per token), MLP on the 4096 tokens (16 D^2 per token), q k^T
    and attn v (4 n D per token for n keys) and the decomposed relative positions (4 k D per
    token for k positions per axis, both axes).
    """
    cfg = load_config()  # vit_b
    with torch.device("meta"):
        sam = build_sam(cfg.model.sam, None)
    use_sdpa_in_sam_encoder(sam.image_encoder)  # fused attention, as the model runs it
    image = torch.zeros(1, 3, 1024, 1024, device="meta")
    total, per_module = SCRIPT["count_flops"](lambda: sam.image_encoder(image))

    d, tokens, padded, window = 768, 64 * 64, 70 * 70, 14 * 14
    windowed = 8 * d * d * padded + 16 * d * d * tokens + 4 * window * d * padded
    windowed += 4 * 14 * d * padded  # relative positions: 14 per axis in a window
    global_ = 24 * d * d * tokens + 4 * tokens * d * tokens + 4 * 64 * d * tokens
    patch_embed = 2 * (3 * 16 * 16) * d * tokens
    neck = 2 * d * 256 * tokens + 2 * 256 * 256 * 9 * tokens  # 1x1 then 3x3 convolution
    assert per_module["ImageEncoderViT.blocks.0"] == windowed == 64_936_894_464
    assert per_module["ImageEncoderViT.blocks.2"] == global_ == 110_326_972_416
    assert total == 8 * windowed + 4 * global_ + patch_embed + neck == 972_077_334_528


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("cost") / "tiny.json"
    args = ["--preset", "tiny", "--images", "2", "--expressions", "2", "--out", str(out)]
    result = SCRIPT["main"](args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    return result, out


def test_report_arithmetic(report: tuple[dict, Path]) -> None:
    result, out = report
    counts, peak = result["counts"], result["peak_tflops"]
    assert peak == 989.0 and result["device"] == "meta"
    for name, expressions in (("stage1", 4), ("stage2", 4), ("inference", 1)):
        c = counts[name]
        assert c["expressions"] == expressions and c["flops"] > 0
        assert c["flops_per_expression"] == c["flops"] / expressions
        assert c["expressions_per_s_upper_bound"] == pytest.approx(
            peak * 1e12 / c["flops_per_expression"]
        )
        parts = c["flops_by_part"]
        assert (
            sum(parts[p] for p in ("clip", "decoder", "sam", "text_prompter", "other"))
            == (c["flops"])
        )
    # Stage 1 skips SAM and the text prompter; stage 2 and inference run them.
    assert counts["stage1"]["flops_by_part"]["sam"] == counts["stage1"]["flops_by_part"][
        "text_prompter"
    ] == 0  # fmt: skip
    assert counts["stage2"]["flops_by_part"]["sam_image_encoder"] > 0
    assert counts["stage2"]["flops"] > counts["stage1"]["flops"]
    assert counts["stage1"]["saved_bytes"] > 0 and counts["inference"]["saved_bytes"] == 0

    # Hours of the paper's run by hand: 20 + 30 epochs of 16 x 4 = 64 expressions per step.
    f1, f2 = (counts[s]["flops_per_expression"] * 64 for s in ("stage1", "stage2"))
    smallest, largest = combined_train_size_bounds()
    steps = largest.images // 16  # an epoch of the images reading: 2,430 steps
    expected = (20 * steps * f1 + 30 * steps * f2) / (989e12 * 3600)
    run = result["paper_run"]
    assert run["steps"]["images"]["largest"]["steps_per_epoch"] == [2430, 2430]
    assert run["hours_at_peak"]["images"]["largest"] == pytest.approx([expected, expected])
    assert run["hours_at_utilization"]["images"]["largest"] == pytest.approx(
        [expected / 0.4, expected / 0.4]
    )
    low, high = run["steps"]["expressions"]["smallest"]["steps_per_epoch"]
    assert (low, high) == smallest.steps_range(4, 16, "expressions") and low < high
    table = out.with_suffix(".md").read_text()
    assert "| stage-2 step |" in table and "| expressions | largest | 38,893 | 321,327 |" in table


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_storage_key_tells_storages_apart_where_data_pointers_cannot(device: str) -> None:
    """``_storage_key`` is torch's private ``UntypedStorage._cdata`` (the storage object itself):
    a view shares its base's key, another tensor has its own, on CPU as its data pointer says and
    on the meta device, where every data pointer is 0."""
    key = SCRIPT["_storage_key"]
    first, second = torch.zeros(4, 3, device=device), torch.zeros(4, 3, device=device)
    assert key(first) == key(first[1:]) == key(first.t())
    assert key(first) != key(second)
    pointers = {t.untyped_storage().data_ptr() for t in (first, second)}
    assert len(pointers) == (2 if device == "cpu" else 1)


def test_saved_tensor_bytes_counts_each_storage_once_and_no_parameters() -> None:
    with torch.device("meta"):
        layer = torch.nn.Linear(8, 8, bias=False)
        x = torch.zeros(4, 8, requires_grad=True)
    with SCRIPT["saved_tensor_bytes"](layer) as saved:
        layer(x)  # saves x (its weight is a parameter)
    assert saved["bytes"] == 4 * 8 * 4
    with SCRIPT["saved_tensor_bytes"](layer) as saved:
        y = x * 2
        (y[1:] * y[:-1]).sum()  # saves two views of y: one storage
    assert saved["bytes"] == 4 * 8 * 4
