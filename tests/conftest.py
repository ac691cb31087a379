"""Shared fixtures: the tiny config, a tiny random-weight model and a random batch."""

from __future__ import annotations

import pytest
import torch

from prompt_ris.config import Config, load_config
from prompt_ris.data.batch import Batch, random_batch
from prompt_ris.models import PromptRIS, build_prompt_ris


@pytest.fixture
def tiny_cfg() -> Config:
    """The ``tiny`` preset (random base weights, everything trainable)."""
    return load_config({"model": {"preset": "tiny"}})


@pytest.fixture
def tiny_model(tiny_cfg: Config) -> PromptRIS:
    """A seeded random-weight tiny PromptRIS built by the real open_clip / segment_anything."""
    torch.manual_seed(0)
    return build_prompt_ris(tiny_cfg.model)


@pytest.fixture
def synthetic_batch(tiny_cfg: Config) -> Batch:
    """A seeded random batch for the tiny preset: I = 2 images x b = 2 expressions."""
    return random_batch(tiny_cfg, num_images=2, expressions_per_image=2, seed=0)
