"""Resume checkpoints (atomic, exact restore) and exports (learned params, safetensors + JSON)."""

from __future__ import annotations

import json
import os
import signal
import struct
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open

from prompt_ris.config import Config, config_from_dict, config_to_dict, load_config
from prompt_ris.data.batch import Batch
from prompt_ris.engine.checkpointing import (
    DamagedCheckpointError,
    SaveRequest,
    TrainerState,
    export_pretrained,
    load_training_state,
    resolve_resume,
    save_training_state,
    verify_checkpoint,
)
from prompt_ris.models import PromptRIS
from tiny_random import TINY_RANDOM


def _prepared_linear(seed: int = 0) -> tuple[Accelerator, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).square().sum().backward()
    optimizer.step()  # non-empty optimizer state (exp_avg, exp_avg_sq)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def test_resume_state_restores_model_optimizer_rng_and_position(tmp_path: Path) -> None:
    accelerator, model, optimizer = _prepared_linear()
    state = TrainerState(epoch=3, step_in_epoch=5, global_step=41, best_score=12.5, best_stage=1)
    saved = save_training_state(accelerator, tmp_path, state)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    expected_draw = torch.rand(3)  # the draw that follows the saved RNG state

    with torch.no_grad():
        model.weight.add_(1.0)
    optimizer.step()  # changes the moments
    torch.rand(7)

    restored = load_training_state(accelerator, resolve_resume(tmp_path, "latest"))
    assert saved == tmp_path / "checkpoints" / "step_00000041"
    assert restored == state
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert torch.equal(torch.rand(3), expected_draw)


def test_latest_moves_last_and_old_checkpoints_are_pruned(tmp_path: Path) -> None:
    accelerator, _, _ = _prepared_linear()
    for step in (1, 2, 3):
        save_training_state(accelerator, tmp_path, TrainerState(global_step=step), keep=2)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    # A run folder or a checkpoint folder may be passed to --resume as well.
    assert resolve_resume(tmp_path, "latest") == root / "step_00000003"
    assert resolve_resume("unused", str(tmp_path)) == root / "step_00000003"
    assert resolve_resume("unused", str(root / "step_00000002")) == root / "step_00000002"


def test_interrupted_save_leaves_latest_on_the_complete_checkpoint(tmp_path: Path) -> None:
    accelerator, model, _ = _prepared_linear()
    save_training_state(accelerator, tmp_path, TrainerState(global_step=1))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    # What a process killed in the middle of writing step 2 leaves behind: a half-written
    # temporary folder (truncated weights, no trainer_state.json) and the old pointer.
    root = tmp_path / "checkpoints"
    partial = root / ".tmp-step_00000002"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x10\x00\x00")
    assert resolve_resume(tmp_path, "latest") == root / "step_00000001"
    with torch.no_grad():
        model.weight.zero_()
    assert load_training_state(accelerator, root / "step_00000001").global_step == 1
    assert torch.equal(model.weight, weights["weight"])
    # The next save replaces the leftover and publishes a complete checkpoint.
    save_training_state(accelerator, tmp_path, TrainerState(global_step=2))
    assert not partial.exists()
    assert resolve_resume(tmp_path, "latest") == root / "step_00000002"
    assert (root / "step_00000002" / "model.safetensors").stat().st_size > 100


def test_sigusr1_requests_a_checkpoint_and_handler_is_restored() -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    request = SaveRequest()
    request.install()
    try:
        assert not request.pending
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.pending
    finally:
        request.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_resume_without_checkpoint_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Start without --resume"):
        resolve_resume(tmp_path, "latest")


def _safetensors_header(path: Path) -> dict:
    """Parse the safetensors layout by hand: 8-byte little-endian length, then a JSON header."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def _tiny_with_base_files(tmp_path: Path) -> tuple[Config, PromptRIS]:
    """The tiny model with frozen CLIP and SAM whose base weights come from real weight files
    (an open_clip state dict and a segment_anything state dict), as for the paper's model."""
    torch.manual_seed(0)
    base = PromptRIS.from_config(load_config({"model": TINY_RANDOM}).model)
    clip_file, sam_file = tmp_path / "clip_tiny.pt", tmp_path / "sam_tiny.pth"
    torch.save(base.clip.clip.state_dict(), clip_file)
    sam = base.sam
    sam_state = {
        f"{part}.{key}": value
        for part in ("image_encoder", "prompt_encoder", "mask_decoder")
        for key, value in getattr(sam, part).state_dict().items()
    }
    torch.save(sam_state, sam_file)
    overrides = {
        "preset": "tiny",
        "clip": {"pretrained": str(clip_file), "freeze": True},
        "sam": {
            "checkpoint": str(sam_file),
            "freeze_image_encoder": True,
            "freeze_prompt_encoder": True,
            "freeze_mask_decoder": True,
        },
    }
    cfg = load_config({"model": overrides})
    torch.manual_seed(1)
    return cfg, PromptRIS.from_config(cfg.model)


def test_export_holds_exactly_the_learned_params_without_pickle(tmp_path: Path) -> None:
    cfg, model = _tiny_with_base_files(tmp_path)
    learned = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert learned and any(n.startswith("clip.clip.") for n in frozen)
    assert any(n.startswith("sam.mask_decoder.") for n in frozen)

    runs = tmp_path / "run"
    export_pretrained(model, cfg, runs / "best", training={"epochs_done": 3})
    out = export_pretrained(model, cfg, runs / "best", training={"epochs_done": 4})
    assert sorted(p.name for p in runs.iterdir()) == ["best"]  # replaced, no leftovers
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    # Nothing pickled: the weights file is the plain safetensors layout, the config is JSON.
    header = _safetensors_header(out / "model.safetensors")
    assert set(header) - {"__metadata__"} == set(learned)
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        for name, param in learned.items():
            assert torch.equal(handle.get_tensor(name), param.detach()), name
    meta = json.loads((out / "config.json").read_text())
    assert config_to_dict(config_from_dict(meta["config"])) == config_to_dict(cfg)
    assert meta["training"] == {"epochs_done": 4}
    assert meta["base_weights"]["sam_checkpoint"] == cfg.model.sam.checkpoint


def test_export_loads_for_inference_with_identical_outputs(
    tmp_path: Path, synthetic_batch: Batch
) -> None:
    cfg = load_config({"model": TINY_RANDOM})
    torch.manual_seed(0)
    model = PromptRIS.from_config(cfg.model).eval()
    export_pretrained(model, cfg, tmp_path / "final")
    torch.manual_seed(123)  # different random base weights: only unused ones are not exported
    loaded = PromptRIS.from_pretrained(tmp_path / "final")
    with torch.no_grad():
        expected, got = model(synthetic_batch), loaded(synthetic_batch)
    assert torch.equal(got.coarse_logits, expected.coarse_logits)
    assert torch.equal(got.mask_logits, expected.mask_logits)


# --------------------------------------------------------------------------------------------
# Damaged checkpoints and file permissions
# --------------------------------------------------------------------------------------------
def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_a_stored_byte(archive: Path) -> None:
    """Flip one byte inside the data of the largest member of a torch.save (zip) archive."""
    import zipfile

    with zipfile.ZipFile(archive) as handle:
        member = max(handle.infolist(), key=lambda info: info.file_size)
    data = bytearray(archive.read_bytes())
    offset = member.header_offset
    name_len, extra_len = struct.unpack("<HH", data[offset + 26 : offset + 30])
    start = offset + 30 + name_len + extra_len  # the member's bytes (stored, not compressed)
    data[start + member.compress_size // 2] ^= 0xFF
    archive.write_bytes(bytes(data))


def test_resume_skips_a_damaged_checkpoint_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    accelerator, model, _ = _prepared_linear()
    save_training_state(accelerator, tmp_path, TrainerState(global_step=1), keep=2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    save_training_state(accelerator, tmp_path, TrainerState(global_step=2), keep=2)
    root = tmp_path / "checkpoints"
    newest, older = root / "step_00000002", root / "step_00000001"
    assert verify_checkpoint(newest) is None and verify_checkpoint(older) is None
    _truncate(newest / "model.safetensors")  # a full disk, a partial copy
    assert "model.safetensors is truncated" in verify_checkpoint(newest)

    with caplog.at_level("WARNING", logger="prompt_ris.engine.checkpointing"):
        chosen = resolve_resume(tmp_path, "latest")
    assert chosen == older
    assert "step_00000002 (model.safetensors is truncated" in caplog.text
    assert "resuming from" in caplog.text and str(older) in caplog.text
    assert load_training_state(accelerator, chosen).global_step == 1
    assert torch.equal(model.weight, weights["weight"])  # the intact state was restored
    # Naming the damaged checkpoint itself is refused, pointing at the intact one.
    with pytest.raises(DamagedCheckpointError, match=f"truncated.*resume from '{older}'"):
        resolve_resume("unused", str(newest))


def test_resume_refuses_when_no_checkpoint_is_intact(tmp_path: Path) -> None:
    accelerator, _, _ = _prepared_linear()
    for step in (1, 2):
        save_training_state(accelerator, tmp_path, TrainerState(global_step=step), keep=2)
    root = tmp_path / "checkpoints"
    _truncate(root / "step_00000002" / "model.safetensors")
    optimizer = root / "step_00000001" / "optimizer.bin"  # a flipped byte: the CRC catches it
    _flip_a_stored_byte(optimizer)
    assert "optimizer.bin" in verify_checkpoint(root / "step_00000001")
    with pytest.raises(DamagedCheckpointError) as err:
        resolve_resume(tmp_path, "latest")
    message = str(err.value)
    assert "every checkpoint" in message and "step_00000001 (optimizer.bin" in message
    assert "Start without --resume" in message and "\n" not in message


def test_exports_and_checkpoints_get_umask_permissions(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        cfg = load_config({"model": TINY_RANDOM})
        torch.manual_seed(0)
        out = export_pretrained(PromptRIS.from_config(cfg.model), cfg, tmp_path / "run" / "best")
        accelerator, _, _ = _prepared_linear()
        saved = save_training_state(accelerator, tmp_path / "run", TrainerState(global_step=1))
    finally:
        os.umask(previous)
    for path in (out / "model.safetensors", out / "config.json", saved / "model.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o644, path  # not safetensors' 0600
