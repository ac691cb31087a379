"""Cross-Modal Prompting: equality with open_clip when prompts are off; CMP wiring when on."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prompt_ris.config import Config
from prompt_ris.data.text import tokenize
from prompt_ris.models import PromptRIS
from prompt_ris.models.build import build_clip
from prompt_ris.models.cross_modal_prompting import PromptedCLIP, causal_mask

TEXTS = ["the red car", "a man on the left holding a cup", "dog"]


def _tiny_clip_file(cfg: Config, path: Path, seed: int = 0) -> torch.nn.Module:
    """A random open_clip CLIP built from the tiny fields, saved as an open_clip state dict."""
    torch.manual_seed(seed)
    reference = build_clip(cfg.model.clip, None)
    torch.save(reference.state_dict(), path)
    return reference.eval()


def test_prompts_off_matches_open_clip(tiny_cfg: Config, tmp_path: Path) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.cmp.num_prompts = 0
    reference = _tiny_clip_file(cfg, tmp_path / "clip.pt")
    torch.manual_seed(123)  # a different seed: the weights must come from the file
    model = PromptRIS.from_config(cfg.model, clip_weights=str(tmp_path / "clip.pt")).eval()

    size = cfg.model.clip.image_size
    images = torch.randn(len(TEXTS), 3, size, size)
    tokens = tokenize(TEXTS, cfg.model.clip.text_length)  # (B, L)
    with torch.no_grad():
        ours = model.clip(images, tokens)
        # open_clip's own forward, at its full context length (77): causal attention makes the
        # first L positions identical to an L-token input.
        ref = reference.forward_intermediates(
            image=images,
            text=tokenize(TEXTS, reference.context_length),
            normalize=False,
            normalize_intermediates=True,
            image_output_fmt="NLC",
            image_output_extra_tokens=True,
        )
        ref_text_pooled = reference.encode_text(tokenize(TEXTS, reference.context_length))

    length = tokens.shape[1]
    torch.testing.assert_close(
        ours.img_tokens, ref["image_intermediates"][-1], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        ours.text_tokens, ref["text_intermediates"][-1][:, :length], rtol=1e-5, atol=1e-5
    )
    # Pooled, projected text feature: [EOS] through open_clip's projection.
    proj_clip = model.clip.clip
    eos = ours.text_tokens[torch.arange(len(TEXTS)), tokens.argmax(-1)]
    torch.testing.assert_close(
        eos @ proj_clip.text_projection, ref_text_pooled, atol=1e-5, rtol=1e-5
    )
    assert ours.img_tokens.shape == (len(TEXTS), (size // cfg.model.clip.patch_size) ** 2, 64)


def test_pos_embed_resized_bicubic_when_loading(tiny_cfg: Config, tmp_path: Path) -> None:
    """A checkpoint with a smaller grid (8x8) loads into the 16x16 grid, bicubic-interpolated
    (open_clip's ``resize_pos_embed``: bicubic with antialias, [CLS] position kept)."""
    small_cfg = copy.deepcopy(tiny_cfg.model.clip)
    small_cfg.image_size = 64  # 8 x 8 patches
    torch.manual_seed(0)
    small = build_clip(small_cfg, None)
    torch.save(small.state_dict(), tmp_path / "clip_small.pt")

    big = build_clip(tiny_cfg.model.clip, str(tmp_path / "clip_small.pt"))
    old = small.visual.positional_embedding.detach()
    grid = old[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(
        grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=True
    )
    expected = torch.cat([old[:1], expected.permute(0, 2, 3, 1).reshape(256, -1)])
    torch.testing.assert_close(big.visual.positional_embedding.detach(), expected)
    assert big.visual.grid_size == (16, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_clip_file_loads_as_its_float32_widening(
    tiny_cfg: Config, tmp_path: Path, dtype: torch.dtype
) -> None:
    """Any CLIP file stored in half precision loads as the same file widened to float32 would,
    position-embedding resize (8x8 -> 16x16) included, into float32 parameters."""
    small_cfg = copy.deepcopy(tiny_cfg.model.clip)
    small_cfg.image_size = 64  # 8 x 8 patches
    torch.manual_seed(0)
    state = build_clip(small_cfg, None).state_dict()
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(half, tmp_path / "clip_half.pt")
    widened = {k: v.float() if v.is_floating_point() else v for k, v in half.items()}
    torch.save(widened, tmp_path / "clip_widened.pt")

    got = build_clip(tiny_cfg.model.clip, str(tmp_path / "clip_half.pt")).state_dict()
    want = build_clip(tiny_cfg.model.clip, str(tmp_path / "clip_widened.pt")).state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    assert got["visual.positional_embedding"].shape == (1 + 16 * 16, small_cfg.vision_width)
    assert got["visual.positional_embedding"].dtype == torch.float32


def _prompted(cfg: Config) -> PromptedCLIP:
    torch.manual_seed(0)
    return PromptRIS.from_config(cfg.model).clip.eval()


def test_prompted_text_block_stays_causal(tiny_cfg: Config) -> None:
    """With n prompts prepended, a text token sees all prompts and the text before it only."""
    clip = _prompted(tiny_cfg)
    n, length = clip.num_prompts, 6
    block = clip.clip.transformer.resblocks[0]
    mask = causal_mask(n + length, torch.device("cpu"))
    x = torch.randn(2, n + length, clip.clip.transformer.width)
    k = 3  # a text position
    later = x.clone()
    later[:, n + k + 1 :] += torch.randn_like(later[:, n + k + 1 :])
    other_prompts = x.clone()
    other_prompts[:, :n] += torch.randn_like(other_prompts[:, :n])
    with torch.no_grad():
        base, out_later, out_prompts = (block(t, attn_mask=mask) for t in (x, later, other_prompts))
    torch.testing.assert_close(out_later[:, : n + k + 1], base[:, : n + k + 1])
    text_changed = (out_prompts[:, n:] - base[:, n:]).abs().amax(dim=-1)  # (2, L)
    assert bool((text_changed > 1e-4).all()), "every text token must see the prompts"
    expected = torch.triu(torch.full((n + length, n + length), float("-inf")), diagonal=1)
    torch.testing.assert_close(mask, expected)


def test_prompts_on_ignore_padding_and_cross_modalities(tiny_cfg: Config) -> None:
    clip = _prompted(tiny_cfg)
    size, length = tiny_cfg.model.clip.image_size, tiny_cfg.model.clip.text_length
    images = torch.randn(1, 3, size, size)
    tokens = tokenize(["a red car on the road"], length)  # [SOS] 6 words [EOS] pad...
    eos = int(tokens.argmax())
    padded = tokens.clone()
    padded[0, eos + 1 :] = 320  # other ids in the padding: masked for L2V, unseen (causal)
    edited = tokens.clone()
    edited[0, eos - 1] = 4000  # another last word: reaches the image through L2V prompts
    with torch.no_grad():
        base = clip(images, tokens)
        other_pad = clip(images, padded)
        other_word = clip(images, edited)
        other_image = clip(torch.randn(1, 3, size, size), tokens)  # reaches text through V2L

    torch.testing.assert_close(other_pad.img_tokens, base.img_tokens)
    torch.testing.assert_close(other_pad.text_tokens[:, : eos + 1], base.text_tokens[:, : eos + 1])
    assert not torch.allclose(other_word.img_tokens, base.img_tokens, atol=1e-4)
    assert not torch.allclose(other_image.text_tokens[:, 0], base.text_tokens[:, 0], atol=1e-4)
    assert base.eos_index.tolist() == [eos]


def test_unequal_tower_depths_rejected(tiny_cfg: Config) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.clip.text_layers = 2
    with pytest.raises(ValueError, match="vision_layers == model.clip.text_layers"):
        PromptRIS.from_config(cfg.model)


def test_images_embedded_once_match_rows_per_expression(tiny_cfg: Config) -> None:
    """``image_index`` embeds each image once; the result equals one image row per expression."""
    clip = _prompted(tiny_cfg)
    size, length = tiny_cfg.model.clip.image_size, tiny_cfg.model.clip.text_length
    images = torch.randn(2, 3, size, size)  # (I, 3, S, S)
    image_index = torch.tensor([0, 0, 1])
    tokens = tokenize(TEXTS, length)  # (B, L)
    with torch.no_grad():
        once = clip(images, tokens, image_index)
        per_row = clip(images[image_index], tokens)
    torch.testing.assert_close(once.img_tokens, per_row.img_tokens)
    torch.testing.assert_close(once.text_tokens, per_row.text_tokens)
