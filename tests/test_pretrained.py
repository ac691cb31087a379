"""Checkpoint save/load: learned-only and self-contained round trips, strict key checks, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prompt_ris.config import Config, load_config
from prompt_ris.data.batch import Batch
from prompt_ris.engine.checkpointing import export_pretrained
from prompt_ris.models import PromptRIS
from prompt_ris.models.build import build_clip, build_sam
from prompt_ris.models.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    read_checkpoint,
    save_pretrained,
    stored_keys,
)


def write_base_weights(cfg: Config, folder: Path, seed: int) -> tuple[Path, Path]:
    """Random tiny CLIP and SAM saved as their real state-dict files (open_clip / SAM format)."""
    torch.manual_seed(seed)
    clip_path, sam_path = folder / f"clip_{seed}.pt", folder / f"sam_{seed}.pth"
    torch.save(build_clip(cfg.model.clip, None).state_dict(), clip_path)
    torch.save(build_sam(cfg.model.sam, None).state_dict(), sam_path)
    return clip_path, sam_path


def frozen_tiny_cfg(clip_path: Path | None, sam_path: Path | None) -> Config:
    """Tiny preset with CLIP and SAM frozen (as in the paper) on the given base weight files."""
    return load_config(
        {
            "model": {
                "preset": "tiny",
                "clip": {"pretrained": clip_path and str(clip_path), "freeze": True},
                "sam": {
                    "checkpoint": sam_path and str(sam_path),
                    "freeze_image_encoder": True,
                    "freeze_prompt_encoder": True,
                    "freeze_mask_decoder": True,
                },
            }
        }
    )


def perturb_learned(model: PromptRIS, seed: int = 1) -> None:
    """Move every learned parameter away from its initial value (as training would)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.learnable_state_dict().values():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))


@torch.no_grad()
def assert_same_outputs(got: PromptRIS, want: PromptRIS, batch: Batch) -> None:
    """Bit-identical eval-mode coarse and final logits on a tiny-preset batch."""
    out_got, out_want = got.eval()(batch), want.eval()(batch)
    assert torch.equal(out_got.coarse_logits, out_want.coarse_logits)
    assert torch.equal(out_got.mask_logits, out_want.mask_logits)


@pytest.fixture(scope="module")
def base_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cfg = frozen_tiny_cfg(None, None)
    return write_base_weights(cfg, tmp_path_factory.mktemp("base"), seed=7)


@pytest.fixture
def frozen_model(base_files: tuple[Path, Path]) -> tuple[PromptRIS, Config]:
    cfg = frozen_tiny_cfg(*base_files)
    torch.manual_seed(3)
    model = PromptRIS.from_config(cfg.model)
    perturb_learned(model)
    return model, cfg


def test_export_roundtrip_learned_params_only(
    frozen_model: tuple[PromptRIS, Config], synthetic_batch: Batch, tmp_path: Path
) -> None:
    model, cfg = frozen_model
    save_pretrained(model, tmp_path, config=cfg)

    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        saved = set(handle.keys())
    learned = {n for n, p in model.named_parameters() if p.requires_grad}
    assert saved == learned  # both base towers come from files
    assert "sam.image_encoder.patch_embed.proj.weight" not in saved  # frozen base weight
    assert len(saved) < len(model.state_dict())
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["config"]["model"]["sam"]["checkpoint"] == cfg.model.sam.checkpoint
    assert meta["config"]["model"]["clip"]["pretrained"] == cfg.model.clip.pretrained

    loaded = PromptRIS.from_pretrained(tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert_same_outputs(loaded, model, synthetic_batch)


def test_base_weights_come_from_files_and_overrides(
    frozen_model: tuple[PromptRIS, Config], tmp_path: Path
) -> None:
    model, cfg = frozen_model
    save_pretrained(model, tmp_path / "ckpt", config=cfg)
    other_clip, other_sam = write_base_weights(cfg, tmp_path, seed=8)

    loaded = PromptRIS.from_pretrained(tmp_path / "ckpt", sam_weights=str(other_sam))
    key = "image_encoder.patch_embed.proj.weight"
    other = torch.load(other_sam, weights_only=True)[key]
    assert torch.equal(loaded.state_dict()["sam." + key], other)
    assert not torch.equal(model.state_dict()["sam." + key], other)
    # the learned parameters are still the checkpoint's
    name, value = next(iter(model.learnable_state_dict().items()))
    assert torch.equal(loaded.state_dict()[name], value)


def test_self_contained_roundtrip_needs_no_base_weights(
    synthetic_batch: Batch, tmp_path: Path
) -> None:
    # Base weights in files that are deleted before loading.
    cfg0 = frozen_tiny_cfg(None, None)
    clip_path, sam_path = write_base_weights(cfg0, tmp_path, seed=9)
    cfg = frozen_tiny_cfg(clip_path, sam_path)
    torch.manual_seed(4)
    model = PromptRIS.from_config(cfg.model)
    perturb_learned(model)
    save_pretrained(model, tmp_path / "full", config=cfg, self_contained=True)
    clip_path.unlink()
    sam_path.unlink()

    with safe_open(str(tmp_path / "full" / WEIGHTS_NAME), framework="pt") as handle:
        assert set(handle.keys()) == set(model.state_dict())
    loaded = PromptRIS.from_pretrained(tmp_path / "full")
    assert loaded.config.model.sam.checkpoint == str(sam_path)  # the config is kept as saved
    assert_same_outputs(loaded, model, synthetic_batch)

    # The .safetensors file alone carries its config in its header.
    alone = tmp_path / "alone.safetensors"
    (tmp_path / "full" / WEIGHTS_NAME).rename(alone)
    assert_same_outputs(PromptRIS.from_pretrained(alone), model, synthetic_batch)


def test_random_base_towers_are_stored(
    base_files: tuple[Path, Path], synthetic_batch: Batch, tmp_path: Path
) -> None:
    # CLIP frozen on a file; SAM random (no checkpoint) and trainable except a few upstream heads.
    cfg = frozen_tiny_cfg(base_files[0], None)
    cfg.model.sam.freeze_mask_decoder = False
    torch.manual_seed(5)
    model = PromptRIS.from_config(cfg.model)
    perturb_learned(model)
    save_pretrained(model, tmp_path, config=cfg)

    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        saved = set(handle.keys())
    sam_keys = {k for k in model.state_dict() if k.startswith("sam.")}
    frozen_clip = {k for k, p in model.named_parameters() if k.startswith("clip.clip.")}
    assert sam_keys <= saved  # random SAM: frozen heads and buffers too
    assert "sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in saved
    assert "sam.image_encoder.patch_embed.proj.weight" in saved  # frozen, random
    assert not frozen_clip & saved  # CLIP comes from its file
    torch.manual_seed(6)  # the rebuild draws other random SAM weights; the file must win
    assert_same_outputs(PromptRIS.from_pretrained(tmp_path), model, synthetic_batch)
    # SAM base weights given anyway cannot replace the stored ones.
    loaded = PromptRIS.from_pretrained(tmp_path, sam_weights=str(base_files[1]))
    assert_same_outputs(loaded, model, synthetic_batch)


def test_reads_trainer_export(
    frozen_model: tuple[PromptRIS, Config], synthetic_batch: Batch, tmp_path: Path
) -> None:
    model, cfg = frozen_model
    export_pretrained(model, cfg, tmp_path / "final")
    assert_same_outputs(PromptRIS.from_pretrained(tmp_path / "final"), model, synthetic_batch)


@pytest.mark.parametrize(
    ("change", "kinds"),
    [
        ({"cmp": {"num_prompts": 2}}, ["shape mismatch"]),
        ({"prompts": {"text_blocks": 3}}, ["missing from the checkpoint"]),
        ({"prompts": {"text_blocks": 1}}, ["unexpected in the checkpoint"]),
    ],
)
def test_mismatched_config_lists_keys(
    tiny_model: PromptRIS, tiny_cfg: Config, tmp_path: Path, change: dict, kinds: list[str]
) -> None:
    save_pretrained(tiny_model, tmp_path, config=tiny_cfg)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    for section, values in change.items():
        meta["config"]["model"][section].update(values)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))

    # What differs, worked out from the two models themselves.
    other_cfg = copy.deepcopy(tiny_cfg)
    for section, values in change.items():
        for key, value in values.items():
            setattr(getattr(other_cfg.model, section), key, value)
    ours = {k: tuple(v.shape) for k, v in tiny_model.learnable_state_dict().items()}
    other = PromptRIS.from_config(other_cfg.model)
    theirs = {k: tuple(v.shape) for k, v in other.learnable_state_dict().items()}
    differing = sorted(set(ours) ^ set(theirs)) + sorted(
        k for k in set(ours) & set(theirs) if ours[k] != theirs[k]
    )
    assert differing

    with pytest.raises(CheckpointError) as info:
        PromptRIS.from_pretrained(tmp_path)
    message = str(info.value)
    for kind in kinds:
        assert kind in message
    assert differing[0] in message
    if "shape mismatch" in kinds:
        key = differing[0]
        assert f"{key}: checkpoint {list(ours[key])} vs model {list(theirs[key])}" in message


def test_missing_checkpoint_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found.*scripts/train.py"):
        PromptRIS.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        PromptRIS.from_pretrained(tmp_path)  # a folder without the weights
    save_file({"x": torch.zeros(1)}, str(tmp_path / WEIGHTS_NAME))  # no config anywhere
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        PromptRIS.from_pretrained(tmp_path)


def test_a_file_of_a_checkpoint_names_its_folder(
    tiny_model: PromptRIS, tiny_cfg: Config, tmp_path: Path
) -> None:
    save_pretrained(tiny_model, tmp_path / "ckpt", config=tiny_cfg)
    with pytest.raises(CheckpointError) as raised:
        PromptRIS.from_pretrained(tmp_path / "ckpt" / CONFIG_NAME)
    assert str(raised.value) == (
        f"'{tmp_path / 'ckpt' / CONFIG_NAME}' is a file of the checkpoint, not the checkpoint; "
        f"pass the folder '{tmp_path / 'ckpt'}'"
    )
    loaded = PromptRIS.from_pretrained(tmp_path / "ckpt" / WEIGHTS_NAME)  # the weights file works
    assert loaded.state_dict().keys() == tiny_model.state_dict().keys()


def test_corrupt_checkpoint_raises_checkpoint_error(
    tiny_model: PromptRIS, tiny_cfg: Config, tmp_path: Path
) -> None:
    path = save_pretrained(tiny_model, tmp_path, config=tiny_cfg)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        PromptRIS.from_pretrained(tmp_path)


def test_missing_base_weights_raise_builder_error(
    frozen_model: tuple[PromptRIS, Config],
    base_files: tuple[Path, Path],
    synthetic_batch: Batch,
    tmp_path: Path,
) -> None:
    model, cfg = frozen_model
    cfg = copy.deepcopy(cfg)
    cfg.model.sam.checkpoint = str(tmp_path / "sam_vit_b_01ec64.pth")  # does not exist
    save_pretrained(model, tmp_path / "ckpt", config=cfg)
    with pytest.raises(FileNotFoundError, match="sam_vit_b_01ec64.pth"):
        PromptRIS.from_pretrained(tmp_path / "ckpt")
    loaded = PromptRIS.from_pretrained(tmp_path / "ckpt", sam_weights=str(base_files[1]))
    assert_same_outputs(loaded, model, synthetic_batch)


def test_load_to_dtype(tiny_model: PromptRIS, tiny_cfg: Config, tmp_path: Path) -> None:
    save_pretrained(tiny_model, tmp_path, config=tiny_cfg)
    loaded = PromptRIS.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not loaded.training
    elsewhere = PromptRIS.from_pretrained(tmp_path, device="meta")
    assert {p.device.type for p in elsewhere.parameters()} == {"meta"}
    assert {p.dtype for p in elsewhere.parameters()} == {torch.float32}


def test_read_checkpoint_reads_header_and_config_only(
    frozen_model: tuple[PromptRIS, Config], tmp_path: Path
) -> None:
    model, cfg = frozen_model
    save_pretrained(model, tmp_path / "learned", config=cfg, training={"epochs_done": 2})
    save_pretrained(model, tmp_path / "full", config=cfg, self_contained=True)
    learned = read_checkpoint(tmp_path / "learned")
    assert learned.weights_path == tmp_path / "learned" / WEIGHTS_NAME
    # Relative paths of the config are resolved from the checkpoint (here: not found, so under
    # its folder, never the current directory).
    assert learned.config.data.prepared == str((tmp_path / "learned" / cfg.data.prepared).resolve())
    learned.config.data.prepared = cfg.data.prepared
    assert learned.kind == "learned" and learned.config == cfg
    assert learned.shapes == {
        n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad
    }
    assert set(learned.shapes) == stored_keys(model, cfg.model)
    full = read_checkpoint(tmp_path / "full" / WEIGHTS_NAME)  # the file itself works too
    assert full.kind == "full"
    assert full.shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_build_args_pick_the_base_weights(
    frozen_model: tuple[PromptRIS, Config], base_files: tuple[Path, Path], tmp_path: Path
) -> None:
    model, cfg = frozen_model
    save_pretrained(model, tmp_path / "learned", config=cfg)
    save_pretrained(model, tmp_path / "full", config=cfg, self_contained=True)
    learned, full = read_checkpoint(tmp_path / "learned"), read_checkpoint(tmp_path / "full")
    model_cfg, clip, sam = learned.build_args()
    assert (clip, sam) == (None, None) and model_cfg == cfg.model  # the config's own files
    assert model_cfg is not cfg.model  # a copy
    assert learned.build_args(sam_weights="other.pth")[1:] == (None, "other.pth")
    # Self-contained: random base towers, overrides ignored, no file named.
    model_cfg, clip, sam = full.build_args("c.pt", "s.pth")
    assert (clip, sam, model_cfg.clip.pretrained, model_cfg.sam.checkpoint) == (None,) * 4
    assert full.config.model.sam.checkpoint == str(base_files[1])  # the stored config is kept
    # A tower trained from random weights is stored whole: an override for it is dropped.
    random_sam = copy.deepcopy(cfg)
    random_sam.model.sam.checkpoint = None
    save_pretrained(model, tmp_path / "random_sam", config=random_sam)
    assert read_checkpoint(tmp_path / "random_sam").build_args("c.pt", "s.pth")[1:] == (
        "c.pt",
        None,
    )


def test_load_into_checks_before_loading(
    frozen_model: tuple[PromptRIS, Config], tmp_path: Path
) -> None:
    model, cfg = frozen_model
    save_pretrained(model, tmp_path, config=cfg)
    checkpoint = read_checkpoint(tmp_path)
    torch.manual_seed(11)
    target = PromptRIS.from_config(cfg.model)
    name, value = next(iter(model.learnable_state_dict().items()))
    assert not torch.equal(target.state_dict()[name], value)
    checkpoint.load_into(target)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in model.state_dict().items())
    other = copy.deepcopy(cfg)
    other.model.cmp.num_prompts = 2
    wrong = PromptRIS.from_config(other.model)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape mismatch"):
        checkpoint.load_into(wrong)
    assert all(torch.equal(wrong.state_dict()[k], v) for k, v in before.items())  # untouched


# --------------------------------------------------------------------------------------------
# Configs of another version, run folders, NaN weights
# --------------------------------------------------------------------------------------------
def test_config_of_a_later_version_loads_with_a_warning_outside_the_model(
    tiny_model: PromptRIS, tiny_cfg: Config, synthetic_batch: Batch, tmp_path: Path
) -> None:
    save_pretrained(tiny_model, tmp_path / "ckpt", config=tiny_cfg)
    path = tmp_path / "ckpt" / CONFIG_NAME
    meta = json.loads(path.read_text())
    meta["config"]["train"]["warmup_steps"] = 500  # a training option this version lacks
    meta["config"]["data"]["images_per_step"] = "sixteen"  # a setting whose type changed
    meta["config"]["logging"] = {"every": 5}  # a whole new section
    path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning) as caught:
        loaded = PromptRIS.from_pretrained(tmp_path / "ckpt")
    text = " | ".join(str(w.message) for w in caught)
    for key in ("train.warmup_steps", "data.images_per_step", "logging"):
        assert key in text and "ignored" in text, text
    assert loaded.config.data.images_per_step == Config().data.images_per_step  # default kept
    with torch.no_grad():
        want, got = tiny_model.eval()(synthetic_batch), loaded(synthetic_batch)
    assert torch.equal(got.mask_logits, want.mask_logits)
    # The model section decides the architecture: an unknown key there is an error.
    meta["config"]["model"]["decoder"]["depth"] = 3
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown config key 'model.decoder.depth'"):
        read_checkpoint(tmp_path / "ckpt")


def test_a_run_folder_points_at_its_exports(tiny_model: PromptRIS, tmp_path: Path) -> None:
    run = tmp_path / "run"
    for name in ("best", "final"):
        tiny_model.save_pretrained(run / name)
    (run / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        PromptRIS.from_pretrained(run)
    message = str(err.value)
    assert "training run folder" in message
    assert str(run / "best") in message and str(run / "final") in message


def test_non_finite_weights_are_refused(tiny_model: PromptRIS, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    name = "decoder.logit_bias"
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights), metadata=meta)
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in 1 tensor.*diverged"):
        PromptRIS.from_pretrained(tmp_path / "ckpt")


def test_saved_files_get_ordinary_permissions(tiny_model: PromptRIS, tmp_path: Path) -> None:
    import os

    previous = os.umask(0o027)
    try:
        tiny_model.save_pretrained(tmp_path / "a")
    finally:
        os.umask(previous)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o640, name  # 0666 & ~umask
