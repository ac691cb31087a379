"""The on-disk cache of SAM image embeddings (embedding_cache.py): round trips, keys, encoding
only the misses, concurrent writers."""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
from pathlib import Path

import pytest
import torch

from prompt_ris.config import Config
from prompt_ris.data.batch import random_batch
from prompt_ris.models.embedding_cache import (
    SamEmbeddingCache,
    batch_image_keys,
    encoder_fingerprint,
    sam_cache_prefix,
)
from tiny_random import tiny_sam_encoder


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


def test_cache_keys_differ_with_size_and_weights(tmp_path: Path) -> None:
    encoder = tiny_sam_encoder(seed=7)
    other = tiny_sam_encoder(seed=8)
    prefix = sam_cache_prefix(encoder, 64)
    assert prefix == sam_cache_prefix(copy.deepcopy(encoder), 64)  # same weights, same prefix
    assert len({prefix, sam_cache_prefix(encoder, 128), sam_cache_prefix(other, 64)}) == 3
    assert prefix.startswith("sam64-letterbox-")  # the preprocessing is named in every key
    assert encoder_fingerprint(encoder) != encoder_fingerprint(other)

    small = SamEmbeddingCache(tmp_path, sam_cache_prefix(encoder, 64))
    large = SamEmbeddingCache(tmp_path, sam_cache_prefix(encoder, 128))
    assert small.path("img1") != large.path("img1") != small.path("img2")
    small.put(["img1"], torch.ones(1, 4, 2, 2))
    assert large.get(["img1"]) is None and small.get(["img1"]) is not None


def test_cache_encode_computes_only_missing_rows(tmp_path: Path) -> None:
    encoder = tiny_sam_encoder(seed=9)
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


def test_batch_image_keys_one_per_image(tiny_cfg: Config) -> None:
    batch = dataclasses.replace(
        random_batch(tiny_cfg, 3, 2),
        image_index=torch.tensor([0, 0, 1, 1, 2]),
        image_ids=torch.tensor([581857, 581857, 17, 17, 9]),
    )
    assert batch_image_keys(batch, "coco:") == ["coco:581857", "coco:17", "coco:9"]
    assert batch_image_keys(random_batch(tiny_cfg, 2, 3)) == ["1000", "1001"]
