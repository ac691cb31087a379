"""Miniature foundations: captions, pretraining script, and the weight files' code path."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from prompt_ris.config import load_config
from prompt_ris.data.text import tokenize
from prompt_ris.miniature.captions import (
    CAPTION_KINDS,
    POSITION_WORDS,
    caption_scene,
    hard_variants,
    paint_scene,
    sample_captioned_spec,
    sample_scene,
)
from prompt_ris.miniature.clip_pretrain import clip_images, encode_text
from prompt_ris.miniature.clip_probes import patch_tokens
from prompt_ris.miniature.sam_pretrain import (
    PROMPT_KINDS,
    decode,
    encode_prompts,
    make_sample,
    pad_clicks,
    random_clicks,
)
from prompt_ris.miniature.synthetic import COLOURS, SHAPES
from prompt_ris.models import PromptRIS
from prompt_ris.models.build import build_clip, build_sam
from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "checkpoints" / "tiny_synthetic"


def _tiny_cfg():
    return load_config({"model": {"preset": "tiny"}}).model


def test_captions_name_every_word_held_out_shapes_included() -> None:
    rng = random.Random(0)
    words: set[str] = set()
    for _ in range(300):
        for kind in CAPTION_KINDS:
            words.update(sample_captioned_spec(rng, kind)[1].replace(",", "").split())
    assert set(SHAPES) <= words  # star and hexagon too
    assert set(COLOURS) <= words
    assert set(POSITION_WORDS) <= words


@pytest.mark.parametrize("attribute", ["shape", "colour"])
def test_hard_variant_captions_differ_in_the_changed_word_only(attribute: str) -> None:
    rng = random.Random(1)
    values = set(SHAPES) if attribute == "shape" else set(COLOURS)
    for kind in ("single", "pair", "listing"):
        spec, caption, seed = sample_captioned_spec(rng, kind)
        for variant in hard_variants(spec, 3, rng, attribute):
            other = caption_scene(variant, kind, random.Random(seed))
            diff = [(a, b) for a, b in zip(caption.split(), other.split()) if a != b]
            assert len(caption.split()) == len(other.split())
            assert len(diff) == 1 and {w.rstrip(",") for w in diff[0]} <= values


def test_painted_masks_are_disjoint_and_coloured() -> None:
    spec, _, _ = sample_captioned_spec(random.Random(2), "listing")
    pixels, masks = paint_scene(spec)
    assert sum(m.astype(int) for m in masks).max() == 1
    for obj, mask in zip(spec.objects, masks):
        if mask.any():
            mean = pixels[mask].mean(0)
            assert np.abs(mean - np.array(COLOURS[obj.colour])).max() <= 13


def test_short_text_encoding_equals_open_clip_encode_text() -> None:
    torch.manual_seed(0)
    model = build_clip(_tiny_cfg().clip, None).eval()
    texts = ["a red star left of a blue hexagon", "the leftmost shape is a green cross"]
    with torch.no_grad():
        short = encode_text(model, tokenize(texts, 16))
        full = model.encode_text(tokenize(texts, model.context_length))
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


def test_probe_patch_tokens_equal_open_clips_output_tokens() -> None:
    torch.manual_seed(0)
    model = build_clip(_tiny_cfg().clip, None).eval()
    rng = random.Random(0)
    specs = [sample_scene(rng) for _ in range(3)]
    ours = patch_tokens(model, specs)  # (3, h*w, D_v)
    model.visual.output_tokens = True
    with torch.no_grad():
        _, theirs = model.visual(clip_images(specs, model.visual.image_size[0]))
    assert ours.shape == theirs.shape and ours.shape[0] == 3
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_batched_decode_equals_sam_mask_decoder() -> None:
    torch.manual_seed(0)
    sam = build_sam(_tiny_cfg().sam, None).eval()
    size = sam.image_encoder.img_size
    points = torch.tensor([[10.0, 20.0], [100.0, 50.0], [200.0, 240.0]])
    boxes = torch.tensor([[5.0, 5.0, 60.0, 80.0]]).expand(3, 4)
    masks = torch.randn(3, 1, size // 4, size // 4)
    clicks = pad_clicks([[(1.0, 2.0, 1)], [(3.0, 4.0, 1), (5.0, 6.0, 0)], [(7.0, 8.0, 0)] * 3])
    with torch.no_grad():
        embedding = sam.image_encoder(torch.randn(1, 3, size, size))  # (1, C, h, w)
        for kind in PROMPT_KINDS:
            sparse, dense = encode_prompts(sam, kind, points, boxes, masks, clicks)
            ours = decode(sam, embedding.expand(3, -1, -1, -1), sparse, dense)
            upstream = sam.mask_decoder(
                embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, False
            )
            for a, b in zip(ours, upstream):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_clicks_fall_on_the_object_or_off_it_by_label_and_pad_with_minus_one() -> None:
    rng = random.Random(3)
    sample = make_sample(sample_scene(rng), 256)
    rows = [random_clicks(sample, k, rng, 3, 3) for k in range(len(sample.masks))] * 20
    for k, clicks in enumerate(rows):
        mask = sample.masks[k % len(sample.masks)]
        labels = [label for _, _, label in clicks]
        assert 1 <= labels.count(1) <= 3 and labels.count(0) <= 3
        for x, y, label in clicks:
            # back to the original pixel the click was drawn from
            col, row = round((x + 0.5) / sample.scale - 0.5), round((y + 0.5) / sample.scale - 0.5)
            assert bool(mask[row, col]) == (label == 1)
    coords, labels = pad_clicks(rows)
    longest = max(len(c) for c in rows)
    assert coords.shape == (len(rows), longest, 2) and labels.shape == (len(rows), longest)
    for clicks, row in zip(rows, labels):
        assert row[: len(clicks)].tolist() == [label for _, _, label in clicks]
        assert (row[len(clicks) :] == -1).all()


def _assert_same_weights(module: torch.nn.Module, trained: torch.nn.Module) -> None:
    loaded, reference = module.state_dict(), trained.state_dict()
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        expected = value.half().float() if value.is_floating_point() else value
        torch.testing.assert_close(loaded[key], expected, rtol=0, atol=0, msg=key)


def test_quick_pretraining_files_load_through_build(tmp_path: Path) -> None:
    script = load_script("scripts/pretrain_foundations.py")
    result = script.main(["--quick", "--out", str(tmp_path)])
    cfg = _tiny_cfg()
    clip = build_clip(cfg.clip, str(tmp_path / script.CLIP_FILE)).eval()
    sam = build_sam(cfg.sam, str(tmp_path / script.SAM_FILE)).eval()
    _assert_same_weights(clip, result.clip)
    _assert_same_weights(sam, result.sam)

    # Same tensors out: the fp16-rounded trained models against the loaded ones.
    for model in (result.clip, result.sam):
        model.load_state_dict(
            {
                k: v.half().float() if v.is_floating_point() else v
                for k, v in model.state_dict().items()
            }
        )
    images = torch.randn(2, 3, cfg.clip.image_size, cfg.clip.image_size)
    tokens = tokenize(["a red star", "a blue hexagon on the left"], cfg.clip.text_length)
    sam_images = torch.randn(1, 3, cfg.sam.image_size, cfg.sam.image_size)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images), result.clip.encode_image(images))
        torch.testing.assert_close(encode_text(clip, tokens), encode_text(result.clip, tokens))
        torch.testing.assert_close(
            sam.image_encoder(sam_images), result.sam.image_encoder(sam_images)
        )

    report = (tmp_path / "report.md").read_text()
    assert "## CLIP" in report and "## SAM" in report
    assert {"retrieval", "hard_pairs", "word_auc", "patch_probe"} <= set(result.report["clip"])
    assert set(result.report["sam"]["miou"]) >= {"point", "box", "coarse", "point+coarse"}


def test_quick_pretraining_is_deterministic(tmp_path: Path) -> None:
    script = load_script("scripts/pretrain_foundations.py")
    runs = [
        script.main(["--quick", "--no-eval", "--out", str(tmp_path / str(i))]) for i in range(2)
    ]
    for name in ("clip", "sam"):
        first, second = (getattr(r, name).state_dict() for r in runs)
        for key, value in first.items():
            torch.testing.assert_close(second[key], value, rtol=0, atol=0, msg=key)


def test_committed_foundations_load_with_the_tiny_preset() -> None:
    cfg = _tiny_cfg()
    clip = build_clip(cfg.clip, str(COMMITTED / "clip_tiny_synthetic.pt")).eval()
    sam = build_sam(cfg.sam, str(COMMITTED / "sam_tiny_synthetic.pth")).eval()
    stored = torch.load(COMMITTED / "sam_tiny_synthetic.pth", weights_only=True)
    for key, value in sam.state_dict().items():
        torch.testing.assert_close(value, stored[key].float(), rtol=0, atol=0, msg=key)
    stored = torch.load(COMMITTED / "clip_tiny_synthetic.pt", weights_only=True)
    for key, value in clip.state_dict().items():
        torch.testing.assert_close(value, stored[key].float(), rtol=0, atol=0, msg=key)
    images = torch.zeros(1, 3, cfg.clip.image_size, cfg.clip.image_size)
    with torch.no_grad():
        assert torch.isfinite(clip.encode_image(images)).all()
        assert torch.isfinite(sam.image_encoder(torch.zeros(1, 3, 256, 256))).all()


def test_the_tiny_preset_builds_prompt_ris_on_the_committed_foundations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The preset's own paths, from the repository root; CLIP at another image size too (its
    fp16 position embeddings are resized in float32)."""
    monkeypatch.chdir(COMMITTED.parents[1])
    model = PromptRIS.from_config(_tiny_cfg())
    stored = torch.load(COMMITTED / "sam_tiny_synthetic.pth", weights_only=True)
    decoder = model.sam.mask_decoder.state_dict()
    for key, value in decoder.items():
        torch.testing.assert_close(value, stored[f"mask_decoder.{key}"].float(), rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.sam.parameters())  # SAM frozen whole
    assert not any(p.requires_grad for p in model.clip.clip.parameters())  # CLIP frozen
    small = PromptRIS.from_config(
        load_config({"model": {"preset": "tiny", "clip": {"image_size": 64}}}).model
    )
    grid = small.clip.clip.visual.positional_embedding
    assert grid.shape == (1 + 8 * 8, 64) and grid.dtype == torch.float32


def test_the_committed_ambiguous_sam_loads_and_says_how_it_was_made() -> None:
    """checkpoints/tiny_synthetic_ambiguous: the SAM of configs/tiny_synthetic_ambiguous.yaml, in
    SAM's format through the real loader, its report naming the world and the multimask clicks."""
    folder = ROOT / "checkpoints" / "tiny_synthetic_ambiguous"
    path = folder / "sam_tiny_synthetic_ambiguous.pth"
    sam = build_sam(_tiny_cfg().sam, str(path)).eval()
    stored = torch.load(path, weights_only=True)
    for key, value in sam.state_dict().items():
        torch.testing.assert_close(value, stored[key].float(), rtol=0, atol=0, msg=key)
    flat = torch.load(COMMITTED / "sam_tiny_synthetic.pth", weights_only=True)
    assert not torch.equal(
        flat["mask_decoder.mask_tokens.weight"], stored["mask_decoder.mask_tokens.weight"]
    )
    report = json.loads((folder / "report_sam.json").read_text())
    assert report["sam"]["settings"]["world"] == "ambiguous"
    assert report["sam"]["settings"]["multimask"] is True
