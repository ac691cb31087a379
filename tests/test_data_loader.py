"""Samplers, datasets and collate on prepared synthetic data (loader.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import skip_first_batches
from torch.utils.data import DataLoader

from prompt_ris.config import Config, load_config
from prompt_ris.data.batch import Batch
from prompt_ris.data.loader import (
    EvalBatchSampler,
    ReferImageDataset,
    TrainBatchSampler,
    build_eval_loader,
    build_train_loader,
    collate,
    group_by_image,
)
from prompt_ris.data.prepare import prepare_refer
from prompt_ris.data.rle import decode_rle
from prompt_ris.data.splits import load_split
from prompt_ris.data.text import tokenize
from prompt_ris.data.transforms import lowres_mask
from prompt_ris.miniature.synthetic import generate_synthetic

CLIP, SAM, LENGTH = 32, 64, 12


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, num_images=17, seed=1)
    prepare_refer(root, root / "prepared", check_images="none")
    return root / "prepared"


def _cfg(prepared: Path, **data: object) -> Config:
    return load_config(
        {
            "model": {"preset": "tiny", "clip": {"image_size": CLIP, "text_length": LENGTH},
                      "sam": {"image_size": SAM}},
            "data": {"prepared": str(prepared), "train": "synthetic:train", "num_workers": 0,
                     "images_per_step": 3, "expressions_per_image": 4, **data},
        }
    )  # fmt: skip


def _train(
    prepared: Path, b: int = 4, **kwargs: object
) -> tuple[ReferImageDataset, TrainBatchSampler]:
    table = load_split(prepared, "synthetic:train")
    groups = group_by_image(table)
    dataset = ReferImageDataset(table, groups, clip_size=CLIP, sam_size=SAM, text_length=LENGTH,
                                word_mask_prob=0.3, with_orig_masks=True)  # fmt: skip
    sampler = TrainBatchSampler(groups, images_per_batch=3, expressions_per_image=b, **kwargs)
    return dataset, sampler


def _rows_by_ref(dataset: ReferImageDataset) -> dict[int, dict]:
    return {row["ref_id"]: row for row in dataset.table}


def test_train_batches_are_images_by_expressions(prepared: Path) -> None:
    dataset, sampler = _train(prepared)
    rows = _rows_by_ref(dataset)
    batches = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate))
    assert len(batches) == len(sampler) == 4  # 12 train images / I = 3
    for batch in batches:
        assert isinstance(batch, Batch)
        assert batch.clip_images.shape == (3, 3, CLIP, CLIP)
        assert batch.sam_images.shape == (3, 3, SAM, SAM)
        assert batch.text_tokens.shape == (12, LENGTH)
        assert batch.text_tokens.dtype == batch.image_index.dtype == torch.long
        assert batch.image_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert batch.gt_masks.shape == (12, 1, SAM // 4, SAM // 4)
        assert not batch.word_masked.any()  # every synthetic image has >= 6 expressions
        pairs = list(zip(batch.ref_ids.tolist(), batch.sent_ids.tolist()))
        assert len(set(pairs)) == 12  # b distinct expressions per image
        torch.testing.assert_close(batch.text_tokens, tokenize(batch.texts, LENGTH))
        for k, (ref_id, sent_id) in enumerate(pairs):
            row = rows[ref_id]
            image = int(batch.image_index[k])
            assert batch.texts[k] == row["sentences"][row["sent_ids"].index(sent_id)]
            assert batch.object_ids[k] == row["ann_id"]
            assert batch.image_ids[k] == row["image_id"]
            assert batch.orig_sizes[image].tolist() == [row["height"], row["width"]]
            mask = decode_rle({"size": row["mask_size"], "counts": row["mask_counts"]})
            np.testing.assert_array_equal(batch.gt_masks_orig[k], mask)
            torch.testing.assert_close(batch.gt_masks[k, 0], lowres_mask(mask, SAM))


def test_few_expressions_are_filled_with_word_masked_resamples(prepared: Path) -> None:
    dataset, sampler = _train(prepared, b=16)  # more than any synthetic image has
    rows = _rows_by_ref(dataset)
    for request_batch in sampler:
        batch = collate([dataset[r] for r in request_batch])
        for image in range(len(request_batch)):
            idx = (batch.image_index == image).nonzero()[:, 0].tolist()
            group = dataset.groups[request_batch[image].group]
            real = [k for k in idx if not batch.word_masked[k]]
            assert len(idx) == 16 and len(real) == len(group.expressions)
            assert len({int(batch.sent_ids[k]) for k in real}) == len(real)
            for k in idx[len(real) :]:  # fillers come after the image's own expressions
                row = rows[int(batch.ref_ids[k])]
                original = row["sentences"][row["sent_ids"].index(int(batch.sent_ids[k]))]
                words, kept = original.split(), batch.texts[k].split()
                assert batch.word_masked[k] and batch.object_ids[k] == row["ann_id"]
                assert 1 <= len(kept) < len(words)
                it = iter(words)
                assert all(w in it for w in kept)  # a subsequence: words dropped, none added


def test_batches_are_a_function_of_seed_and_epoch(prepared: Path) -> None:
    _, a = _train(prepared, b=8, seed=4)
    _, b = _train(prepared, b=8, seed=4)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating again gives the same epoch
    b.set_epoch(3)
    assert list(a) != list(b)
    _, c = _train(prepared, b=8, seed=5)
    c.set_epoch(2)
    assert list(a) != list(c)


def test_two_processes_get_disjoint_images_and_equal_batches(prepared: Path) -> None:
    shards = []
    for rank in range(2):
        _, sampler = _train(prepared, num_replicas=2, rank=rank, seed=7)
        sampler.set_epoch(1)
        shards.append([[r.group for r in batch] for batch in sampler])
    assert len(shards[0]) == len(shards[1]) == 2  # 12 images -> 6 per process -> 2 batches of 3
    images = [[g for batch in shard for g in batch] for shard in shards]
    assert not set(images[0]) & set(images[1])
    assert len(images[0]) == len(images[1]) == 6 and set(images[0] + images[1]) == set(range(12))


def test_uneven_image_count_is_cut_to_whole_steps(prepared: Path) -> None:
    table = load_split(prepared, "synthetic:train")
    groups = group_by_image(table)[:11]
    seen = []
    for rank in range(2):
        sampler = TrainBatchSampler(groups, images_per_batch=2, expressions_per_image=2,
                                    num_replicas=2, rank=rank, images_per_step=8)  # fmt: skip
        batches = list(sampler)
        assert sampler.steps_per_epoch == 1 and sampler.accumulation == 2  # 11 // 8, 8 / (2 x 2)
        assert len(batches) == len(sampler) == 2 and [len(b) for b in batches] == [2, 2]
        seen += [r.group for batch in batches for r in batch]
    assert len(seen) == len(set(seen)) == 8  # three images sit this epoch out


def test_eval_shards_cover_every_expression_once(prepared: Path) -> None:
    cfg = _cfg(prepared)
    table = load_split(prepared, "synthetic:train")
    expected = sorted((r["ref_id"], s) for r in table for s in r["sent_ids"])
    got = []
    for rank in range(2):
        loader = build_eval_loader(cfg, "synthetic:train", num_replicas=2, rank=rank,
                                   images_per_batch=2, max_expressions=15)  # fmt: skip
        for batch in loader:
            assert len(batch.texts) <= 15 or batch.clip_images.shape[0] == 1
            assert len(batch.gt_masks_orig) == len(batch.texts)
            for k, mask in enumerate(batch.gt_masks_orig):
                image = int(batch.image_index[k])
                assert mask.shape == tuple(batch.orig_sizes[image].tolist())
            got += list(zip(batch.ref_ids.tolist(), batch.sent_ids.tolist()))
    assert sorted(got) == expected


def test_eval_limit_keeps_whole_images(prepared: Path) -> None:
    cfg = _cfg(prepared)
    full = sum(len(b.texts) for b in build_eval_loader(cfg, "synthetic:train"))
    limited = list(build_eval_loader(cfg, "synthetic:train", limit=30))
    count = sum(len(b.texts) for b in limited)
    assert 20 < count <= 30 < full  # whole images of 6-15 expressions, up to the limit
    again = [b.sent_ids.tolist() for b in build_eval_loader(cfg, "synthetic:train", limit=30)]
    assert again == [b.sent_ids.tolist() for b in limited]


def test_train_loader_resumes_with_accelerate_skip_first_batches(prepared: Path) -> None:
    loader = build_train_loader(_cfg(prepared), num_replicas=1, rank=0)
    loader.batch_sampler.set_epoch(3)
    full = [b.sent_ids.tolist() for b in loader]
    loader.batch_sampler.set_epoch(3)
    rest = [b.sent_ids.tolist() for b in skip_first_batches(loader, 2)]
    assert len(full) == 4 and rest == full[2:]


def test_bad_shard_arguments_are_rejected(prepared: Path) -> None:
    with pytest.raises(ValueError, match="rank 2"):
        build_train_loader(_cfg(prepared, images_per_step=4), num_replicas=2, rank=2)
    groups = group_by_image(load_split(prepared, "synthetic:train"))[:1]
    with pytest.raises(ValueError, match="1 training images give 1 draws per epoch"):
        TrainBatchSampler(groups, images_per_batch=1, expressions_per_image=1, num_replicas=2)
    with pytest.raises(ValueError, match="not a multiple of 2 processes x images_per_batch=2"):
        TrainBatchSampler(groups, images_per_batch=2, expressions_per_image=1, num_replicas=2,
                          images_per_step=6)  # fmt: skip
    assert len(EvalBatchSampler(groups, images_per_batch=4, num_replicas=2, rank=1)) == 0
