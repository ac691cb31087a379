"""The typed batch (data/batch.py): ModelInputs / Batch, ``collate`` building one, ``.to``, and
``random_batch``, the random batch of the tests and the benchmark."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from accelerate.utils import send_to_device

from prompt_ris.config import Config, load_config
from prompt_ris.data.batch import Batch, ModelInputs, random_batch
from prompt_ris.data.loader import collate
from prompt_ris.data.text import EOT_TOKEN, SOT_TOKEN
from tiny_random import TINY_RANDOM_ARGS


def _item(image: int, texts: list[str], orig_masks: bool) -> dict:
    """One dataset item (``ReferImageDataset.__getitem__``) of an image with len(texts)
    expressions, filled with recognisable values."""
    b = len(texts)
    item = {
        "clip_image": torch.full((3, 8, 8), float(image)),
        "sam_image": torch.full((3, 16, 16), float(image) + 0.5),
        "input_size": torch.tensor([16, 12 + image]),
        "orig_size": torch.tensor([40, 30 + image]),
        "texts": texts,
        "text_tokens": torch.arange(b * 5).reshape(b, 5) + 100 * image,
        "object_ids": torch.arange(b) + 10 * image,
        "ref_ids": torch.arange(b) + 20 * image,
        "image_ids": torch.full((b,), 1000 + image),
        "category_ids": torch.full((b,), 7),
        "sent_ids": torch.arange(b) + 30 * image,
        "word_masked": torch.tensor([False] * (b - 1) + [True]),
        "gt_masks": torch.rand(b, 1, 4, 4),
    }
    if orig_masks:
        item["gt_masks_orig"] = [np.full((40, 30 + image), k % 2 == 0) for k in range(b)]
    return item


def test_collate_builds_a_batch_in_item_order() -> None:
    items = [_item(0, ["a", "b"], True), _item(1, ["c"], True)]
    batch = collate(items)
    assert isinstance(batch, Batch) and isinstance(batch, ModelInputs)
    assert (batch.num_images, batch.num_expressions) == (2, 3)
    assert batch.clip_images.shape == (2, 3, 8, 8) and batch.sam_images.shape == (2, 3, 16, 16)
    assert batch.clip_images[:, 0, 0, 0].tolist() == [0.0, 1.0]
    assert batch.sam_images[:, 0, 0, 0].tolist() == [0.5, 1.5]
    assert batch.image_index.tolist() == [0, 0, 1] and batch.image_index.dtype == torch.long
    assert batch.texts == ["a", "b", "c"]
    assert batch.text_tokens.shape == (3, 5)
    assert batch.text_tokens[:, 0].tolist() == [0, 5, 100]
    assert batch.object_ids.tolist() == [10 * 0, 1, 10]
    assert batch.ref_ids.tolist() == [0, 1, 20] and batch.sent_ids.tolist() == [0, 1, 30]
    assert batch.image_ids.tolist() == [1000, 1000, 1001]
    assert batch.category_ids.tolist() == [7, 7, 7]
    assert batch.word_masked.tolist() == [False, True, True]
    assert batch.input_sizes.tolist() == [[16, 12], [16, 13]]
    assert batch.orig_sizes.tolist() == [[40, 30], [40, 31]]
    torch.testing.assert_close(
        batch.gt_masks, torch.cat([items[0]["gt_masks"], items[1]["gt_masks"]])
    )
    assert [m.shape for m in batch.gt_masks_orig] == [(40, 30), (40, 30), (40, 31)]
    assert [bool(m[0, 0]) for m in batch.gt_masks_orig] == [True, False, True]


def test_collate_without_orig_masks_leaves_none() -> None:
    assert collate([_item(0, ["a"], False), _item(1, ["b"], True)]).gt_masks_orig is None


def test_to_moves_every_tensor_and_shares_the_rest(tiny_cfg: Config) -> None:
    batch = random_batch(tiny_cfg, 2, 2)
    batch = dataclasses.replace(batch, gt_masks_orig=[np.zeros((4, 4), bool)] * 4)
    moved = batch.to("meta")
    assert type(moved) is Batch and moved is not batch
    for field in dataclasses.fields(Batch):
        value, original = getattr(moved, field.name), getattr(batch, field.name)
        if isinstance(original, torch.Tensor):
            assert value.device.type == "meta" and value.shape == original.shape, field.name
            assert original.device.type == "cpu", field.name  # a copy: the batch is unchanged
        else:
            assert value is original, field.name
    inputs = ModelInputs(batch.clip_images, batch.sam_images, batch.text_tokens, batch.image_index)
    assert type(inputs.to("meta")) is ModelInputs
    # accelerate's send_to_device (evaluation, trainer) goes through .to and keeps the type.
    sent = send_to_device(batch, torch.device("meta"))
    assert type(sent) is Batch and sent.text_tokens.device.type == "meta"
    assert sent.texts == batch.texts


def test_random_batch_follows_the_batch_contract() -> None:
    cfg = load_config(overrides=TINY_RANDOM_ARGS)
    batch = random_batch(cfg, 3, 2)
    length = cfg.model.clip.text_length
    assert isinstance(batch, Batch) and (batch.num_images, batch.num_expressions) == (3, 6)
    assert batch.clip_images.shape == (3, 3, 128, 128)
    assert batch.sam_images.shape == (3, 3, 256, 256)
    assert batch.gt_masks.shape == (6, 1, 64, 64) and batch.gt_masks.sum() > 0
    assert batch.image_index.tolist() == [0, 0, 1, 1, 2, 2]
    tokens = batch.text_tokens
    assert (SOT_TOKEN, EOT_TOKEN) == (49406, 49407)
    assert tokens.shape == (6, length) and (tokens[:, 0] == 49406).all()
    eos = tokens.argmax(-1)  # CLIP finds [EOS] as the highest id
    assert (tokens[torch.arange(6), eos] == 49407).all()
    assert (eos >= 2).all()  # at least one word
    assert all((row[1:e] > 0).all() for row, e in zip(tokens, eos, strict=True))
    assert all((row[e + 1 :] == 0).all() for row, e in zip(tokens, eos, strict=True))
    # 480 x 640 letterboxed into 256: longest side 256, other int(480 * 0.4 + 0.5) = 192.
    assert batch.input_sizes.tolist() == [[192, 256]] * 3
    assert batch.orig_sizes.tolist() == [[480, 640]] * 3
    # Two objects per image in turn, so ICL sees same- and other-object pairs.
    assert batch.object_ids.tolist() == [0, 1, 10, 11, 20, 21]
    assert batch.texts == [f"random expression {k}" for k in range(6)]
    assert batch.ref_ids.tolist() == list(range(6))
    assert batch.sent_ids.tolist() == list(range(100, 106))
    assert batch.image_ids.tolist() == [1000, 1000, 1001, 1001, 1002, 1002]
    assert batch.category_ids.tolist() == [1] * 6 and not batch.word_masked.any()
    assert batch.gt_masks_orig is None
    # Box ground truths: binary, a 21 x 32 box (lowres // 3 x lowres // 2) each.
    assert set(batch.gt_masks.unique().tolist()) == {0.0, 1.0}
    assert batch.gt_masks.flatten(1).sum(1).tolist() == [21.0 * 32.0] * 6


def test_random_batch_is_seeded_and_sized(tiny_cfg: Config) -> None:
    a, b = random_batch(tiny_cfg, 2, 2, seed=3), random_batch(tiny_cfg, 2, 2, seed=3)
    for field in dataclasses.fields(Batch):
        x, y = getattr(a, field.name), getattr(b, field.name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, field.name
    c = random_batch(tiny_cfg, 2, 2, seed=4)
    assert not torch.equal(a.clip_images, c.clip_images)
    assert not torch.equal(a.text_tokens, c.text_tokens)
    # A 480 x 640 original, letterboxed into the 256-pixel SAM frame of the tiny preset.
    assert a.orig_sizes.tolist() == [[480, 640]] * 2 and a.input_sizes.tolist() == [[192, 256]] * 2
