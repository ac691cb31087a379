"""Shared fixtures: the tiny config, a tiny random-weight model and a random batch; an empty
weights folder for every test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from prompt_ris.config import Config, load_config
from prompt_ris.data.batch import Batch, random_batch
from prompt_ris.models import PromptRIS
from tiny_random import TINY_RANDOM


@pytest.fixture(scope="session", autouse=True)
def empty_weights_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """$PROMPT_RIS_WEIGHTS points at an empty folder (subprocesses inherit it), so that base
    weights in the developer's ~/.cache/prompt_ris cannot change what a test sees."""
    previous = os.environ.get("PROMPT_RIS_WEIGHTS")
    os.environ["PROMPT_RIS_WEIGHTS"] = str(tmp_path_factory.mktemp("weights"))
    yield
    if previous is None:
        del os.environ["PROMPT_RIS_WEIGHTS"]
    else:
        os.environ["PROMPT_RIS_WEIGHTS"] = previous


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a shared 2-core machine, 2 OpenMP threads competing with another busy process make small
    training steps up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_cfg() -> Config:
    """The ``tiny`` preset on random base weights (frozen as the preset freezes them)."""
    return load_config({"model": TINY_RANDOM})


@pytest.fixture
def tiny_model(tiny_cfg: Config) -> PromptRIS:
    """A seeded random-weight tiny PromptRIS built by the real open_clip / segment_anything."""
    torch.manual_seed(0)
    return PromptRIS.from_config(tiny_cfg.model)


@pytest.fixture
def synthetic_batch(tiny_cfg: Config) -> Batch:
    """A seeded random batch for the tiny preset: I = 2 images x b = 2 expressions."""
    return random_batch(tiny_cfg, num_images=2, expressions_per_image=2, seed=0)
