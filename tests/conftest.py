"""Shared fixtures: the tiny config, a tiny random-weight model and a synthetic batch."""

from __future__ import annotations

import pytest
import torch

from prompt_ris.config import Config, load_config
from prompt_ris.data.text import tokenize
from prompt_ris.models import PromptRIS, build_prompt_ris

SYNTHETIC_TEXTS = ["the red square", "square on the left", "blue circle", "the small round thing"]
SYNTHETIC_IMAGE_INDEX = [0, 0, 1, 1]
SYNTHETIC_OBJECT_IDS = [11, 12, 21, 21]


@pytest.fixture
def tiny_cfg() -> Config:
    """The ``tiny`` preset (random base weights, everything trainable)."""
    return load_config({"model": {"preset": "tiny"}})


@pytest.fixture
def tiny_model(tiny_cfg: Config) -> PromptRIS:
    """A seeded random-weight tiny PromptRIS built by the real open_clip / segment_anything."""
    torch.manual_seed(0)
    return build_prompt_ris(tiny_cfg.model)


def make_synthetic_batch(cfg: Config, seed: int = 0) -> dict[str, object]:
    """Random tensors in the batch contract of CONTRIBUTING.md: I = 2 images x b = 2 expressions."""
    gen = torch.Generator().manual_seed(seed)
    clip_size, sam_size = cfg.model.clip.image_size, cfg.model.sam.image_size
    num_images, batch = 2, len(SYNTHETIC_TEXTS)
    lowres = sam_size // 4
    gt = (torch.rand(batch, 1, lowres, lowres, generator=gen) > 0.7).float()
    return {
        "clip_images": torch.randn(num_images, 3, clip_size, clip_size, generator=gen),
        "sam_images": torch.randn(num_images, 3, sam_size, sam_size, generator=gen),
        "text_tokens": tokenize(SYNTHETIC_TEXTS, cfg.model.clip.text_length),
        "image_index": torch.tensor(SYNTHETIC_IMAGE_INDEX),
        "object_ids": torch.tensor(SYNTHETIC_OBJECT_IDS),
        "gt_masks": gt,
        "input_sizes": torch.tensor([[sam_size, sam_size * 3 // 4], [sam_size // 2, sam_size]]),
        "orig_sizes": torch.tensor([[120, 90], [50, 100]]),
        "texts": list(SYNTHETIC_TEXTS),
        "ref_ids": torch.arange(batch),
        "sent_ids": torch.arange(batch) + 100,
        "image_ids": torch.tensor(SYNTHETIC_IMAGE_INDEX) + 1000,
        "category_ids": torch.tensor([1, 1, 2, 2]),
    }


@pytest.fixture
def synthetic_batch(tiny_cfg: Config) -> dict[str, object]:
    """A seeded synthetic batch for the tiny preset (2 images x 2 expressions)."""
    return make_synthetic_batch(tiny_cfg)
