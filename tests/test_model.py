"""PromptRIS end to end: gradients, freezing, batch independence, dropout, presets, loading."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prompt_ris.config import Config, load_config
from prompt_ris.data.text import tokenize
from prompt_ris.models import PromptRIS, PromptSwitches, build_prompt_ris


def _run(model: PromptRIS, batch: dict, **kwargs: object) -> object:
    return model(
        batch["clip_images"], batch["sam_images"], batch["text_tokens"], batch["image_index"],
        **kwargs,
    )


def _frozen_like_vit_b(cfg: Config) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.model.clip.freeze = True
    cfg.model.sam.freeze_image_encoder = True
    cfg.model.sam.freeze_prompt_encoder = True
    cfg.model.sam.freeze_mask_decoder = True
    return cfg


def test_frozen_weights_unchanged_after_step(tiny_cfg: Config, synthetic_batch: dict) -> None:
    cfg = _frozen_like_vit_b(tiny_cfg)
    torch.manual_seed(0)
    model = build_prompt_ris(cfg.model).train()
    learnable = model.learnable_state_dict()
    assert learnable and all(not n.startswith(("clip.clip.", "sam.")) for n in learnable)
    assert any(n.startswith("clip.v2l.") for n in learnable)
    assert any(n.startswith("clip.l2v.") for n in learnable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    out = _run(model, synthetic_batch, prompt_dropout=False)  # stage 2, all prompts
    gt = synthetic_batch["gt_masks"]  # (B, 1, 64, 64) low-res frame
    coarse_gt = F.adaptive_avg_pool2d(gt, out.coarse_logits.shape[-2:])
    loss = F.binary_cross_entropy_with_logits(out.mask_logits, gt) + (
        F.binary_cross_entropy_with_logits(out.coarse_logits, coarse_gt)
    )
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} got no gradient"
            assert float(param.grad.abs().sum()) > 0, f"{name} got a zero gradient"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()

    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == param.requires_grad, f"{name}: changed={changed}"


def test_prediction_independent_of_batch(tiny_model: PromptRIS, synthetic_batch: dict) -> None:
    model = tiny_model.eval()
    with torch.no_grad():
        together = _run(model, synthetic_batch)
        for i, image in enumerate(synthetic_batch["image_index"].tolist()):
            alone = model(
                synthetic_batch["clip_images"][image : image + 1],
                synthetic_batch["sam_images"][image : image + 1],
                synthetic_batch["text_tokens"][i : i + 1],
                torch.zeros(1, dtype=torch.long),
            )
            torch.testing.assert_close(
                together.coarse_logits[i : i + 1], alone.coarse_logits, rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(
                together.mask_logits[i : i + 1], alone.mask_logits, rtol=1e-4, atol=1e-5
            )


def test_stage1_skips_sam(tiny_model: PromptRIS, synthetic_batch: dict) -> None:
    out = _run(tiny_model.train(), synthetic_batch, with_sam=False)
    assert out.mask_logits is None
    assert out.coarse_logits.shape == (4, 1, 16, 16)  # 128 / 8
    out.coarse_logits.sum().backward()
    assert all(p.grad is None for p in tiny_model.sam.parameters())
    assert all(p.grad is None for p in tiny_model.text_prompter.parameters())


def test_full_dropout_equals_all_prompts_off(tiny_cfg: Config, synthetic_batch: dict) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.prompts.drop_mask = cfg.model.prompts.drop_point = cfg.model.prompts.drop_text = 1.0
    torch.manual_seed(0)
    model = build_prompt_ris(cfg.model).train()
    off = PromptSwitches(mask=False, point=False, text=False)
    with torch.no_grad():
        dropped = _run(model, synthetic_batch, prompt_dropout=True)
        switched_off = _run(model, synthetic_batch, switches=off, prompt_dropout=False)
        kept = _run(model, synthetic_batch, prompt_dropout=False)
    torch.testing.assert_close(dropped.mask_logits, switched_off.mask_logits)
    assert not torch.allclose(dropped.mask_logits, kept.mask_logits, atol=1e-4)


def test_bf16_autocast_forward(tiny_model: PromptRIS, synthetic_batch: dict) -> None:
    # One image, one expression, F_IS given: bf16 is slow on CPUs without bf16 units.
    with torch.no_grad():
        sam_img_embed = tiny_model.encode_sam(synthetic_batch["sam_images"][:1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model.train()(
            synthetic_batch["clip_images"][:1], None, synthetic_batch["text_tokens"][:1],
            torch.zeros(1, dtype=torch.long), sam_img_embed=sam_img_embed,
        )
        loss = out.mask_logits.float().mean() + out.coarse_logits.float().mean()
    loss.backward()
    assert out.mask_logits.dtype == torch.bfloat16 and out.mask_logits.shape == (1, 1, 64, 64)
    assert torch.isfinite(out.mask_logits.float()).all()
    assert tiny_model.decoder.logit_scale.grad is not None


def test_vit_b_preset_shapes_and_parameter_counts() -> None:
    """The paper's model, on the meta device (no memory, no compute): shapes and sizes."""
    cfg = load_config(overrides=["model.clip.pretrained=null", "model.sam.checkpoint=null"])
    with torch.device("meta"):
        model = build_prompt_ris(cfg.model).eval()
    clip_params = sum(p.numel() for p in model.clip.clip.parameters())
    sam_params = sum(p.numel() for p in model.sam.parameters())
    assert 149e6 < clip_params < 151e6  # ViT-B/16 CLIP (~149.6M at 224, +0.5M pos-emb at 480)
    assert 93e6 < sam_params < 95e6  # SAM ViT-B (93.7M)
    assert not any(n.startswith(("clip.clip.", "sam.")) for n in model.learnable_state_dict())

    tokens = tokenize(["the girl in pink"], cfg.model.clip.text_length).to("meta")
    index = torch.zeros(1, dtype=torch.long, device="meta")
    with torch.no_grad():
        sam_img_embed = model.encode_sam(torch.empty(1, 3, 1024, 1024, device="meta"))
        out = model(torch.empty(1, 3, 480, 480, device="meta"), None, tokens, index,
                    sam_img_embed=sam_img_embed)
    assert tuple(sam_img_embed.shape) == (1, 256, 64, 64)
    assert tuple(out.coarse_logits.shape) == (1, 1, 30, 30)
    assert tuple(out.mask_logits.shape) == (1, 1, 256, 256)
    assert tuple(model.clip.clip.visual.positional_embedding.shape) == (901, 768)
    assert tuple(model.sam.point_table().shape) == (256 * 256, 256)


def test_from_config_accepts_yaml_config_and_model_config(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text("model:\n  preset: tiny\n  cmp:\n    num_prompts: 2\n")
    cfg = load_config(path)
    for source in (path, cfg, cfg.model):
        model = PromptRIS.from_config(source)
        assert model.clip.num_prompts == 2 and model.text_length == 16


def test_missing_clip_weights_name_file_and_fix(tiny_cfg: Config) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.clip.pretrained = "checkpoints/clip_vit_b16_openai.pt"
    with pytest.raises(FileNotFoundError, match=r"clip_vit_b16_openai\.pt.*download_weights\.py"):
        build_prompt_ris(cfg.model)
