"""Fast path: SDPA SAM encoder equals segment_anything's own; the embedding cache round-trips."""

from __future__ import annotations

import copy
import multiprocessing
from pathlib import Path

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT
from torch.profiler import ProfilerActivity, profile

from prompt_ris.models import fast_attention
from prompt_ris.models.embedding_cache import (
    SamEmbeddingCache,
    batch_image_keys,
    encoder_fingerprint,
    sam_cache_prefix,
)
from prompt_ris.models.fast_attention import (
    SDPAAttention,
    sam_encoder_uses_sdpa,
    use_sdpa_in_sam_encoder,
)


def _tiny_encoder(seed: int = 0) -> ImageEncoderViT:
    """Real SAM encoder, 8x8 tokens: block 0 windowed (3x3 windows, padded to 9x9), block 1 global.

    Every parameter is random, the relative-position tables included (upstream zero-inits them,
    which would make the bias path untested).
    """
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        img_size=64,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        out_chans=16,
        use_rel_pos=True,
        window_size=3,
        global_attn_indexes=(1,),
    )
    with torch.no_grad():
        for param in encoder.parameters():
            param.normal_(0.0, 0.5 if param.dim() < 2 else 0.2)
    return encoder.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_sdpa_sam_encoder_matches_segment_anything_fp32() -> None:
    reference = _tiny_encoder()
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
    reference = _tiny_encoder(seed=1)
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
    """The tiny preset trains SAM from scratch: gradients must match upstream's too."""
    reference = _tiny_encoder(seed=2).train()
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
    reference = _tiny_encoder(seed=3)
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
    """Why CLIP needs no switch: open_clip 3.3.0 attention runs aten SDPA when training."""
    torch.manual_seed(5)
    block = ResidualAttentionBlock(d_model=16, n_head=2).train()
    causal = torch.full((5, 5), float("-inf")).triu(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        block(torch.randn(3, 5, 16, requires_grad=True), attn_mask=causal).sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in names
    assert "aten::softmax" not in names and "aten::_softmax" not in names


# --------------------------------------------------------------------------------------------
# SAM embedding cache
# --------------------------------------------------------------------------------------------
def test_cache_roundtrips_embeddings(tmp_path: Path) -> None:
    torch.manual_seed(6)
    embeds = torch.randn(3, 16, 8, 8)
    cache = SamEmbeddingCache(tmp_path, "sam64-letterbox-abc-v1", max_memory_items=2)
    assert cache.get(["a", "b", "c"]) is None
    cache.put(["a", "b", "c"], embeds)

    fresh = SamEmbeddingCache(tmp_path, "sam64-letterbox-abc-v1")  # disk only, new process view
    got = fresh.get(["c", "a"], dtype=torch.float32)
    assert got.shape == (2, 16, 8, 8) and got.dtype == torch.float32
    # fp16 storage: relative rounding <= 2^-11 per value.
    torch.testing.assert_close(got, embeds[[2, 0]], rtol=2**-11, atol=1e-7)
    assert torch.equal(got, embeds[[2, 0]].half().float())
    assert fresh.get(["a", "zzz"]) is None
    # The LRU keeps the 2 most recent items; older ones are reread from disk identically.
    assert list(cache._memory) == ["b", "c"]
    assert torch.equal(cache.get(["a"])[0], fresh.get(["a"])[0])
    # Files are complete safetensors; no temporary file is left behind.
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 3 and all(name.endswith(".safetensors") for name in files)


def test_cache_keys_differ_with_preprocessing(tmp_path: Path) -> None:
    encoder = _tiny_encoder(seed=7)
    other = _tiny_encoder(seed=8)
    prefix = sam_cache_prefix(encoder, 64)
    assert prefix == sam_cache_prefix(copy.deepcopy(encoder), 64)  # same weights, same prefix
    assert len({prefix, sam_cache_prefix(encoder, 128), sam_cache_prefix(other, 64)}) == 3
    assert sam_cache_prefix(encoder, 64, preprocess="stretch") != prefix
    assert encoder_fingerprint(encoder) != encoder_fingerprint(other)

    small = SamEmbeddingCache(tmp_path, sam_cache_prefix(encoder, 64))
    large = SamEmbeddingCache(tmp_path, sam_cache_prefix(encoder, 128))
    assert small.path("img1") != large.path("img1") != small.path("img2")
    small.put(["img1"], torch.ones(1, 4, 2, 2))
    assert large.get(["img1"]) is None and small.get(["img1"]) is not None


def test_cache_encode_computes_only_missing_rows(tmp_path: Path) -> None:
    encoder = _tiny_encoder(seed=9)
    cache = SamEmbeddingCache(tmp_path, sam_cache_prefix(encoder, 64))
    images = torch.randn(3, 3, 64, 64)
    seen: list[int] = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return encoder(x)

    with torch.no_grad():
        expected = encoder(images)  # (3, 16, 8, 8)
    first = cache.encode(["x", "y", "z"], images, encode)
    cache.put(["w"], expected[:1])
    second = cache.encode(["y", "w", "q"], images, encode)
    assert seen == [3, 1]  # all three, then only "q"
    assert torch.equal(first, expected.half().float())  # same rounding hit or miss
    assert torch.equal(second[:2], expected[[1, 0]].half().float())
    # "q" was encoded alone: batch-of-one float noise may flip a half-precision rounding.
    torch.testing.assert_close(second[2], expected[2], rtol=2**-10, atol=1e-6)
    assert (cache.hits, cache.misses) == (2, 4)


def test_cache_rejects_overflow_and_bad_shapes(tmp_path: Path) -> None:
    cache = SamEmbeddingCache(tmp_path, "p")
    with pytest.raises(ValueError, match="storage_dtype=torch.bfloat16"):
        cache.put(["a"], torch.full((1, 2, 2, 2), 1e6))
    with pytest.raises(ValueError, match="len\\(keys\\) = 2"):
        cache.put(["a", "b"], torch.zeros(1, 2, 2, 2))
    bf16 = SamEmbeddingCache(tmp_path, "p", storage_dtype=torch.bfloat16)
    bf16.put(["a"], torch.full((1, 2, 2, 2), 1e6))
    assert SamEmbeddingCache(tmp_path, "p").get(["a"])[0, 0, 0, 0].item() == pytest.approx(
        1e6, rel=4e-3
    )


def _write_many(folder: str, value: float) -> None:
    cache = SamEmbeddingCache(folder, "shared")
    for _ in range(20):
        cache.put(["same"], torch.full((1, 8, 16, 16), value))


def test_cache_concurrent_writers_leave_a_complete_file(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")  # small tensors only: no OpenMP in the children
    writers = [ctx.Process(target=_write_many, args=(str(tmp_path), v)) for v in (1.0, 2.0)]
    for proc in writers:
        proc.start()
    reader = SamEmbeddingCache(tmp_path, "shared", max_memory_items=0)
    reads = []
    while any(proc.is_alive() for proc in writers):
        got = reader.get(["same"])
        if got is not None:
            reads.append(got.unique().tolist())
    for proc in writers:
        proc.join()
        assert proc.exitcode == 0
    reads.append(reader.get(["same"]).unique().tolist())
    assert all(r in ([1.0], [2.0]) for r in reads)  # never a torn or partial file
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []


def test_batch_image_keys_one_per_image() -> None:
    batch = {
        "image_index": torch.tensor([0, 0, 1, 1, 2]),
        "image_ids": torch.tensor([581857, 581857, 17, 17, 9]),
    }
    assert batch_image_keys(batch, "coco:") == ["coco:581857", "coco:17", "coco:9"]


# --------------------------------------------------------------------------------------------
# The whole model: fast path (SDPA + bf16 autocast) against the reference path
# --------------------------------------------------------------------------------------------
def test_fast_model_path_matches_reference(
    tiny_model: torch.nn.Module, synthetic_batch: dict
) -> None:
    reference = use_sdpa_in_sam_encoder(copy.deepcopy(tiny_model), enabled=False).eval()
    fast = use_sdpa_in_sam_encoder(copy.deepcopy(tiny_model)).eval()
    inputs = [
        synthetic_batch[k] for k in ("clip_images", "sam_images", "text_tokens", "image_index")
    ]
    with torch.no_grad():
        expected = reference(*inputs)  # fp32, segment_anything's attention
        same_dtype = fast(*inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fast(*inputs)
    torch.testing.assert_close(same_dtype.mask_logits, expected.mask_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        same_dtype.coarse_logits, expected.coarse_logits, rtol=1e-4, atol=1e-5
    )

    assert got.mask_logits.dtype == torch.bfloat16  # autocast really ran in bf16
    for name in ("mask_logits", "coarse_logits"):
        ref, low = getattr(expected, name), getattr(got, name).float()
        assert _rel_err(low, ref) < 5e-2, name  # bf16 through ~20 layers
        agreement = ((low > 0) == (ref > 0)).float().mean().item()
        assert agreement >= 0.99, (name, agreement)
