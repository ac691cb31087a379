"""The model shipped in ``checkpoints/tiny_synthetic_demo/`` loads through the public API from any
folder and reproduces the figures its card states, on the fixed scenes it was measured on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from repo_scripts import REPO, load_script

SHIPPED = REPO / "checkpoints" / "tiny_synthetic_demo"


@pytest.fixture(scope="module")
def ship_model():  # noqa: ANN201 - a script module
    return load_script("scripts/ship_model.py")


def test_shipped_config_names_no_path_of_the_machine_it_was_made_on() -> None:
    text = (SHIPPED / "config.json").read_text()
    meta = json.loads(text)
    model = meta["config"]["model"]
    assert model["clip"]["pretrained"] == "checkpoints/tiny_synthetic/clip_tiny_synthetic.pt"
    assert model["sam"]["checkpoint"] == "checkpoints/tiny_synthetic/sam_tiny_synthetic.pth"
    assert "/work/" not in text and "/home/" not in text and "/tmp/" not in text


def test_shipped_model_reproduces_its_stated_figures(
    ship_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths must not lean on the current folder
    stated = json.loads((SHIPPED / "results.json").read_text())
    assert stated["subset"] == ship_model.SUBSET
    measured = ship_model.score_on_subset(SHIPPED)  # PromptRIS.from_pretrained + evaluate
    split = ship_model.SUBSET["split"]
    card = (SHIPPED / "README.md").read_text()
    for output in ("final", "coarse"):
        want, got = stated["splits"][split][output], measured["splits"][split][output]
        assert got["num_expressions"] == want["num_expressions"]
        for metric in ("mIoU", "oIoU"):
            assert abs(got[metric] - want[metric]) <= stated["tolerance"], (output, metric)
            assert f"{want[metric]:.2f}" in card  # the card states the figures checked here
    assert ship_model.REMAKE in card
