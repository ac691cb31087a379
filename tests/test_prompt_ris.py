"""PromptRIS end to end: gradients, freezing, batch independence, dropout, presets, the frame
maps of its outputs, single-image inference (segment / predict) and construction."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prompt_ris.config import Config, load_config
from prompt_ris.data.batch import Batch, ModelInputs
from prompt_ris.data.text import tokenize
from prompt_ris.frames import lowres_to_original
from prompt_ris.models import Prediction, PromptRIS
from prompt_ris.prompt_switches import PromptSwitches
from prompt_ris.models.build import build_parts
from prompt_ris.models.fast_attention import sam_encoder_uses_sdpa, use_sdpa_in_sam_encoder
from prompt_ris.predictor import Predictor

TEXTS = ["the man on the left", "the small dog next to the bench"]


def _frozen_like_vit_b(cfg: Config) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.model.clip.freeze = True
    cfg.model.sam.freeze_image_encoder = True
    cfg.model.sam.freeze_prompt_encoder = True
    cfg.model.sam.freeze_mask_decoder = True
    return cfg


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_frozen_weights_unchanged_after_step(tiny_cfg: Config, synthetic_batch: Batch) -> None:
    cfg = _frozen_like_vit_b(tiny_cfg)
    torch.manual_seed(0)
    model = PromptRIS.from_config(cfg.model).train()
    # A text prompter past its start (at its start only its last LayerNorm gets a gradient:
    # test_text_prompter checks that step).
    torch.nn.init.ones_(model.text_prompter.out_norm.weight)
    learnable = model.learnable_state_dict()
    assert learnable and all(not n.startswith(("clip.clip.", "sam.")) for n in learnable)
    assert any(n.startswith("clip.v2l.") for n in learnable)
    assert any(n.startswith("clip.l2v.") for n in learnable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    out = model(synthetic_batch, prompt_dropout=False)  # stage 2, all prompts
    gt = synthetic_batch.gt_masks  # (B, 1, 64, 64) low-res frame
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


def test_prediction_independent_of_batch(tiny_model: PromptRIS, synthetic_batch: Batch) -> None:
    model = tiny_model.eval()
    batch = synthetic_batch
    with torch.no_grad():
        together = model(batch)
        for i, image in enumerate(batch.image_index.tolist()):
            alone = model(
                ModelInputs(
                    clip_images=batch.clip_images[image : image + 1],
                    sam_images=batch.sam_images[image : image + 1],
                    text_tokens=batch.text_tokens[i : i + 1],
                    image_index=torch.zeros(1, dtype=torch.long),
                )
            )
            torch.testing.assert_close(
                together.coarse_logits[i : i + 1], alone.coarse_logits, rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(
                together.mask_logits[i : i + 1], alone.mask_logits, rtol=1e-4, atol=1e-5
            )


def test_stage1_skips_sam(tiny_model: PromptRIS, synthetic_batch: Batch) -> None:
    out = tiny_model.train()(synthetic_batch, with_sam=False)
    assert out.mask_logits is None
    assert out.coarse_logits.shape == (4, 1, 16, 16)  # 128 / 8
    assert out.coarse_lowres.shape == (4, 1, 64, 64)  # 256 / 4: S_C exists in stage 1 too
    out.coarse_logits.sum().backward()
    assert all(p.grad is None for p in tiny_model.sam.parameters())
    assert all(p.grad is None for p in tiny_model.text_prompter.parameters())


def test_coarse_lowres_is_the_float32_bilinear_upsampling(
    tiny_model: PromptRIS, synthetic_batch: Batch
) -> None:
    """S_C: S'_C resized from the CLIP grid to the low-res frame (align_corners=False)."""
    with torch.no_grad():
        out = tiny_model.eval()(synthetic_batch, with_sam=False)
    want = F.interpolate(out.coarse_logits, (64, 64), mode="bilinear", align_corners=False)
    assert out.coarse_lowres.dtype == torch.float32
    torch.testing.assert_close(out.coarse_lowres, want)
    torch.testing.assert_close(tiny_model.upsample_coarse(out.coarse_logits), want)
    assert out.text_global.shape == (4, tiny_model.config.model.decoder.dim)


def test_full_dropout_equals_all_prompts_off(tiny_cfg: Config, synthetic_batch: Batch) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.prompts.drop_mask = cfg.model.prompts.drop_point = cfg.model.prompts.drop_text = 1.0
    torch.manual_seed(0)
    model = PromptRIS.from_config(cfg.model).train()
    off = PromptSwitches.parse("none")
    with torch.no_grad():
        dropped = model(synthetic_batch, prompt_dropout=True)
        switched_off = model(synthetic_batch, switches=off, prompt_dropout=False)
        kept = model(synthetic_batch, prompt_dropout=False)
    torch.testing.assert_close(dropped.mask_logits, switched_off.mask_logits)
    assert not torch.allclose(dropped.mask_logits, kept.mask_logits, atol=1e-4)


def test_bf16_autocast_forward(tiny_model: PromptRIS, synthetic_batch: Batch) -> None:
    # One image, one expression, F_IS given: bf16 is slow on CPUs without bf16 units.
    with torch.no_grad():
        sam_img_embed = tiny_model.encode_sam(synthetic_batch.sam_images[:1])
    inputs = ModelInputs(
        clip_images=synthetic_batch.clip_images[:1],
        sam_images=torch.empty(0),  # not read when sam_img_embed is given
        text_tokens=synthetic_batch.text_tokens[:1],
        image_index=torch.zeros(1, dtype=torch.long),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model.train()(inputs, sam_img_embed=sam_img_embed)
        loss = out.mask_logits.float().mean() + out.coarse_logits.float().mean()
    loss.backward()
    assert out.mask_logits.dtype == torch.bfloat16 and out.mask_logits.shape == (1, 1, 64, 64)
    assert torch.isfinite(out.mask_logits.float()).all()
    assert tiny_model.decoder.logit_scale.grad is not None


def test_given_sam_embedding_replaces_the_encoder(
    tiny_model: PromptRIS, synthetic_batch: Batch
) -> None:
    model = tiny_model.eval()
    calls = []
    hook = model.sam.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            embed = model.encode_sam(synthetic_batch.sam_images)  # (I, C, h_s, w_s)
            encoded = model(synthetic_batch)
            given = model(
                dataclasses.replace(synthetic_batch, sam_images=torch.empty(0)),
                sam_img_embed=embed,
            )
    finally:
        hook.remove()
    assert len(calls) == 2  # encode_sam and the plain forward; not the forward given F_IS
    assert embed.shape == (2, 64, 16, 16)
    torch.testing.assert_close(given.mask_logits, encoded.mask_logits)


def test_vit_b_preset_shapes_and_parameter_counts() -> None:
    """The paper's model, on the meta device (no memory, no compute): shapes and sizes."""
    cfg = load_config(overrides=["model.clip.pretrained=null", "model.sam.checkpoint=null"])
    with torch.device("meta"):
        model = PromptRIS.from_config(cfg.model).eval()
    clip_params = sum(p.numel() for p in model.clip.clip.parameters())
    sam_params = sum(p.numel() for p in model.sam.parameters())
    assert 149e6 < clip_params < 151e6  # ViT-B/16 CLIP (~149.6M at 224, +0.5M pos-emb at 480)
    assert 93e6 < sam_params < 95e6  # SAM ViT-B (93.7M)
    assert not any(n.startswith(("clip.clip.", "sam.")) for n in model.learnable_state_dict())
    assert model.clip_image_size == 480 and model.sam.image_size == 1024
    assert model.sam.lowres_size == 256

    inputs = ModelInputs(
        clip_images=torch.empty(1, 3, 480, 480, device="meta"),
        sam_images=torch.empty(0, device="meta"),
        text_tokens=tokenize(["the girl in pink"], cfg.model.clip.text_length).to("meta"),
        image_index=torch.zeros(1, dtype=torch.long, device="meta"),
    )
    with torch.no_grad():
        sam_img_embed = model.encode_sam(torch.empty(1, 3, 1024, 1024, device="meta"))
        out = model(inputs, sam_img_embed=sam_img_embed)
    assert tuple(sam_img_embed.shape) == (1, 256, 64, 64)
    assert tuple(out.coarse_logits.shape) == (1, 1, 30, 30)
    assert tuple(out.coarse_lowres.shape) == (1, 1, 256, 256)
    assert tuple(out.mask_logits.shape) == (1, 1, 256, 256)
    assert tuple(model.clip.clip.visual.positional_embedding.shape) == (901, 768)
    assert tuple(model.sam.point_table().shape) == (256 * 256, 256)


# --------------------------------------------------------------------------------------------
# The whole model: fast path (SDPA + bf16 autocast) against the reference path
# --------------------------------------------------------------------------------------------
def test_fast_model_path_matches_reference(tiny_model: PromptRIS, synthetic_batch: Batch) -> None:
    reference = use_sdpa_in_sam_encoder(copy.deepcopy(tiny_model), enabled=False).eval()
    fast = use_sdpa_in_sam_encoder(copy.deepcopy(tiny_model)).eval()
    assert sam_encoder_uses_sdpa(tiny_model)  # model.sam.fast_attention is on by default
    assert sam_encoder_uses_sdpa(fast) and not sam_encoder_uses_sdpa(reference)
    with torch.no_grad():
        expected = reference(synthetic_batch)  # fp32, segment_anything's attention
        same_dtype = fast(synthetic_batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fast(synthetic_batch)
    torch.testing.assert_close(same_dtype.mask_logits, expected.mask_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        same_dtype.coarse_logits, expected.coarse_logits, rtol=1e-4, atol=1e-5
    )

    assert got.mask_logits.dtype == torch.bfloat16  # autocast really ran in bf16
    for name in ("mask_logits", "coarse_logits"):
        ref, low = getattr(expected, name), getattr(got, name).float()
        assert float((low - ref).norm() / ref.norm()) < 5e-2, name  # bf16 through ~20 layers
        agreement = ((low > 0) == (ref > 0)).float().mean().item()
        assert agreement >= 0.99, (name, agreement)


# --------------------------------------------------------------------------------------------
# Outputs in the original frame
# --------------------------------------------------------------------------------------------
def test_original_logits_maps_both_outputs_with_the_frame_map(
    tiny_model: PromptRIS, synthetic_batch: Batch
) -> None:
    batch = dataclasses.replace(
        synthetic_batch,
        input_sizes=torch.tensor([[256, 192], [128, 256]]),  # a tall and a wide image
        orig_sizes=torch.tensor([[120, 90], [50, 100]]),
    )
    with torch.no_grad():
        out = tiny_model.eval()(batch)
    sizes = (batch.input_sizes, batch.orig_sizes, batch.image_index)
    got = tiny_model.original_logits(out, *sizes)
    assert list(got) == ["coarse", "final"]
    for name, lowres in (("coarse", out.coarse_lowres), ("final", out.mask_logits)):
        want = lowres_to_original(lowres, *sizes, 256)
        assert [tuple(m.shape) for m in got[name]] == [(120, 90)] * 2 + [(50, 100)] * 2
        for a, b in zip(got[name], want, strict=True):
            assert torch.equal(a, b)
    assert list(tiny_model.original_logits(out, *sizes, outputs=("final",))) == ["final"]
    with torch.no_grad():
        stage1 = tiny_model(batch, with_sam=False)
    assert list(tiny_model.original_logits(stage1, *sizes)) == ["coarse"]  # no final mask


def test_segment_runs_in_eval_mode_and_restores_the_mode(tiny_model: PromptRIS) -> None:
    image = _image(30, 50)
    letterboxed = tiny_model.letterbox(image)
    assert letterboxed.clip_image.shape == (3, 128, 128)
    assert letterboxed.sam_image.shape == (3, 256, 256)
    assert letterboxed.input_size == (154, 256) and letterboxed.orig_size == (30, 50)
    tokens = tokenize(TEXTS, tiny_model.text_length)
    model = tiny_model.train()
    got = model.segment(letterboxed, tokens, with_coarse=True)
    assert model.training  # restored
    assert set(got) == {"final", "coarse"}
    assert got["final"].shape == got["coarse"].shape == (2, 30, 50)
    assert got["final"].dtype == torch.float32

    inputs = ModelInputs(
        clip_images=letterboxed.clip_image[None],
        sam_images=letterboxed.sam_image[None],
        text_tokens=tokens,
        image_index=torch.zeros(2, dtype=torch.long),
    )
    with torch.no_grad():
        out = model.eval()(inputs)
    sizes = (torch.tensor([[154, 256]]), torch.tensor([[30, 50]]), inputs.image_index)
    want = model.original_logits(out, *sizes)
    torch.testing.assert_close(got["final"], torch.stack(want["final"]))
    torch.testing.assert_close(got["coarse"], torch.stack(want["coarse"]))
    # With F_IS given, the SAM encoder is skipped and the answer is the same.
    with torch.no_grad():
        embed = model.encode_sam(inputs.sam_images)
    again = model.segment(letterboxed, tokens, sam_img_embed=embed)
    assert list(again) == ["final"]
    torch.testing.assert_close(again["final"], got["final"])


def test_predict_method_equals_predictor(tiny_model: PromptRIS) -> None:
    image = _image(25, 45)
    predictor = Predictor(tiny_model, device="cpu", dtype=torch.float32)
    predictor.set_image(image)
    want = predictor.predict(TEXTS, return_probs=True, return_coarse=True)
    got = tiny_model.predict(image, TEXTS, return_probs=True, return_coarse=True)
    assert isinstance(got, Prediction) and got.expressions == TEXTS
    np.testing.assert_array_equal(got.probs, want.probs)
    np.testing.assert_array_equal(got.masks, want.masks)
    np.testing.assert_array_equal(got.coarse_probs, want.coarse_probs)
    plain = tiny_model.predict(image, TEXTS[0])
    assert plain.expressions == [TEXTS[0]] and plain.masks.shape == (1, 25, 45)
    assert plain.probs is None and plain.coarse_masks is None and plain.coarse_probs is None
    with pytest.raises(ValueError, match="no expression"):
        tiny_model.predict(image, [])


def test_predict_runs_on_the_models_dtype(tiny_model: PromptRIS) -> None:
    image = _image(20, 24)
    want = tiny_model.predict(image, TEXTS[0], return_probs=True).probs
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    got = model.predict(image, TEXTS[0], return_probs=True).probs
    assert got.dtype == np.float32 and got.shape == (1, 20, 24)
    np.testing.assert_allclose(got, want, atol=0.1)


def test_prediction_from_logits_thresholds_strictly_above() -> None:
    final = torch.tensor([[[-1.0, 0.0], [0.5, 3.0]]])  # (1, 2, 2); logit 0 is probability 0.5
    coarse = torch.tensor([[[2.0, -2.0], [0.0, 1e-3]]])
    got = Prediction.from_logits(["x"], {"final": final, "coarse": coarse}, 0.5, True)
    np.testing.assert_array_equal(got.masks, [[[False, False], [True, True]]])
    np.testing.assert_array_equal(got.coarse_masks, [[[True, False], [False, True]]])
    np.testing.assert_allclose(got.probs, torch.sigmoid(final).numpy())
    np.testing.assert_allclose(got.coarse_probs, torch.sigmoid(coarse).numpy())
    # threshold 0.75: logit(0.75) = ln 3 = 1.0986; only logit 3 is above.
    high = Prediction.from_logits(["x"], {"final": final}, 0.75)
    np.testing.assert_array_equal(high.masks, [[[False, False], [False, True]]])
    assert high.probs is None and high.coarse_masks is None and high.coarse_probs is None
    assert high.masks.dtype == bool


# --------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------
def test_from_config_accepts_yaml_config_and_model_config(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "model:\n  preset: tiny\n  clip:\n    pretrained: null\n  sam:\n    checkpoint: null\n"
        "  cmp:\n    num_prompts: 2\n"
    )
    cfg = load_config(path)
    for source in (path, str(path), cfg, cfg.model):
        model = PromptRIS.from_config(source)
        assert model.clip.num_prompts == 2 and model.text_length == 16
        assert model.config.model.cmp.num_prompts == 2
    with pytest.raises(TypeError, match="YAML path, a Config or a ModelConfig"):
        PromptRIS.from_config({"model": {"preset": "tiny"}})  # type: ignore[arg-type]


def test_save_pretrained_needs_a_config(tiny_cfg: Config, tmp_path: Path) -> None:
    model = PromptRIS(**build_parts(tiny_cfg.model).as_kwargs())  # assembled by hand, no config
    assert model.config is None
    with pytest.raises(ValueError, match="from_config"):
        model.save_pretrained(tmp_path)


def test_missing_clip_weights_name_file_and_fix(tiny_cfg: Config) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.clip.pretrained = "checkpoints/clip_vit_b16_openai.pt"
    with pytest.raises(FileNotFoundError, match=r"clip_vit_b16_openai\.pt.*download_weights\.py"):
        PromptRIS.from_config(cfg.model)
