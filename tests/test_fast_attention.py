"""SDPA attention in SAM's image encoder (fast_attention.py) equals segment_anything's own."""

from __future__ import annotations

import copy

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from segment_anything.modeling.image_encoder import Attention
from torch.profiler import ProfilerActivity, profile

from prompt_ris.models import fast_attention
from prompt_ris.models.fast_attention import (
    SDPAAttention,
    sam_encoder_uses_sdpa,
    use_sdpa_in_sam_encoder,
)
from tiny_random import tiny_sam_encoder


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_sdpa_sam_encoder_matches_segment_anything_fp32() -> None:
    reference = tiny_sam_encoder()
    fast = use_sdpa_in_sam_encoder(copy.deepcopy(reference))
    assert sam_encoder_uses_sdpa(fast) and not sam_encoder_uses_sdpa(reference)
    assert [type(b.attn) for b in fast.blocks] == [SDPAAttention, SDPAAttention]
    # No state-dict change: same keys, same tensors.
    ref_state, fast_state = reference.state_dict(), fast.state_dict()
    assert list(ref_state) == list(fast_state)
    assert all(torch.equal(ref_state[k], fast_state[k]) for k in ref_state)

    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = reference(images)  # (3, 16, 8, 8)
        got = fast(images)
    assert got.shape == expected.shape == (3, 16, 8, 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # The switch is reversible and idempotent.
    use_sdpa_in_sam_encoder(fast)
    assert sam_encoder_uses_sdpa(fast)
    use_sdpa_in_sam_encoder(fast, enabled=False)
    assert [type(b.attn) for b in fast.blocks] == [Attention, Attention]
    with torch.no_grad():
        assert torch.equal(fast(images), expected)


def test_sdpa_sam_encoder_bf16_autocast_within_bf16_tolerance() -> None:
    reference = tiny_sam_encoder(seed=1)
    fast = use_sdpa_in_sam_encoder(copy.deepcopy(reference))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(images)  # fp32 upstream
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fast(images)
            upstream_bf16 = reference(images)
    # bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%); two blocks stay within a few %.
    assert _rel_err(got, expected) < 3e-2
    assert _rel_err(upstream_bf16, expected) < 3e-2
    # The fused path is no less accurate than upstream under the same autocast (+ slack).
    assert _rel_err(got, expected) < 2 * _rel_err(upstream_bf16, expected) + 5e-3


def test_sdpa_sam_encoder_gradients_match() -> None:
    """SAM's encoder is trained when unfrozen (and by the foundation pretraining): gradients
    must match upstream's too."""
    reference = tiny_sam_encoder(seed=2).train()
    fast = use_sdpa_in_sam_encoder(copy.deepcopy(reference))
    images = torch.randn(2, 3, 64, 64)
    weights = torch.randn(2, 16, 8, 8)
    (reference(images) * weights).sum().backward()
    (fast(images) * weights).sum().backward()
    for (name, ref_param), fast_param in zip(
        reference.named_parameters(), fast.parameters(), strict=True
    ):
        torch.testing.assert_close(fast_param.grad, ref_param.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert reference.blocks[1].attn.rel_pos_h.grad.abs().sum() > 0


def test_sdpa_batch_chunking_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = tiny_sam_encoder(seed=3)
    fast = use_sdpa_in_sam_encoder(copy.deepcopy(reference))
    # One image's global bias is 2 heads x 64^2 x 4 bytes = 32 KiB: force chunks of one image.
    monkeypatch.setattr(fast_attention, "MAX_BIAS_BYTES", 40_000)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(images), reference(images), rtol=1e-5, atol=1e-5)


def test_sdpa_attention_interpolates_rel_pos_like_upstream() -> None:
    """Tokens on a 6x5 grid with tables built for 4x4: upstream's interpolation branch."""
    torch.manual_seed(4)
    reference = Attention(16, num_heads=2, use_rel_pos=True, input_size=(4, 4))
    with torch.no_grad():
        reference.rel_pos_h.normal_()
        reference.rel_pos_w.normal_()
    fast = use_sdpa_in_sam_encoder(copy.deepcopy(reference))
    tokens = torch.randn(2, 6, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens), reference(tokens), rtol=1e-5, atol=1e-5)


def test_use_sdpa_without_sam_attention_raises() -> None:
    with pytest.raises(ValueError, match="pass the SAM image encoder"):
        use_sdpa_in_sam_encoder(torch.nn.Linear(2, 2))


def test_open_clip_resblock_already_dispatches_to_sdpa() -> None:
    """Why CLIP needs no switch: open_clip's attention runs aten SDPA when training."""
    torch.manual_seed(5)
    block = ResidualAttentionBlock(d_model=16, n_head=2).train()
    causal = torch.full((5, 5), float("-inf")).triu(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        block(torch.randn(3, 5, 16, requires_grad=True), attn_mask=causal).sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in names
    assert "aten::softmax" not in names and "aten::_softmax" not in names
