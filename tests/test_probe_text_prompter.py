"""scripts/probe_text_prompter.py: a fresh text prompter trained alone on an export, measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from repo_scripts import load_script
from tiny_random import TINY_RANDOM_ARGS

from prompt_ris.config import load_config
from prompt_ris.data.prepare import prepare_refer
from prompt_ris.losses import text_grounding_loss
from prompt_ris.miniature.synthetic import SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY, generate_synthetic
from prompt_ris.models import PromptRIS

probe = load_script("scripts/probe_text_prompter.py")


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probe")
    generate_synthetic(root, num_images=16, seed=0)
    prepare_refer(
        root, root / "prepared", [(SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY)], check_images="none"
    )
    torch.manual_seed(0)
    PromptRIS.from_config(load_config(overrides=TINY_RANDOM_ARGS).model).save_pretrained(
        root / "ckpt"
    )
    return {"root": root, "checkpoint": root / "ckpt", "prepared": root / "prepared"}


@pytest.mark.parametrize("oracle", [False, True])
def test_probe_trains_a_fresh_prompter_and_reports(export: dict[str, Path], oracle: bool) -> None:
    out = export["root"] / f"out_{oracle}"
    args = [
        "--checkpoint", str(export["checkpoint"]), "--out", str(out), "--steps", "3",
        "--attention-batches", "1", "--split", "synthetic:val",
        f"data.prepared={export['prepared']}", "data.train=synthetic:train", "data.num_workers=0",
        "data.images_per_step=2", "model.prompts.text_start=random",
        "model.prompts.text_position=keys+values", "model.prompts.text_keys=mlp",
    ] + (["--oracle-attention"] if oracle else ["train.text_grounding_weight=1"])  # fmt: skip
    assert probe.main(args) == 0
    report = json.loads((out / "probe.json").read_text())
    assert report["steps"] == 3 and report["oracle_attention"] is oracle
    assert report["text_grounding_weight"] == (0.0 if oracle else 1.0)
    assert {"coarse", "final", "random"} <= set(report["mIoU"])
    assert report["grad_first_layer"]["first_10_steps"] > 0  # a random start learns at once
    if oracle:
        assert report["attention"] == {}
    else:
        on, share = report["attention"]["on_referent"], report["attention"]["referent_share"]
        assert len(on) == 2 and all(0.0 <= x <= 1.0 for x in on) and 0.0 < share[0] < 1.0


def test_the_oracle_and_the_grounding_loss_are_not_combined(export: dict[str, Path]) -> None:
    args = [
        "--checkpoint", str(export["checkpoint"]), "--out", str(export["root"] / "both"),
        "--oracle-attention", f"data.prepared={export['prepared']}",
        "train.text_grounding_weight=1",
    ]  # fmt: skip
    assert probe.main(args) == 1
    assert not (export["root"] / "both" / "probe.json").exists()


def test_text_grounding_loss_moves_attention_onto_the_referent(export: dict[str, Path]) -> None:
    """The model returns where its text tokens read F_IS, and the grounding loss on it teaches
    the prompter (mlp keys included) to look at the referent."""
    cfg = load_config(
        overrides=[
            *TINY_RANDOM_ARGS, f"data.prepared={export['prepared']}", "data.num_workers=0",
            "data.images_per_step=2", "data.train=synthetic:train",
        ]
    )  # fmt: skip
    torch.manual_seed(0)
    model = PromptRIS.from_pretrained(export["checkpoint"])
    probe.fresh_prompter(model, ["model.prompts.text_start=random", "model.prompts.text_keys=mlp"])
    batch = next(iter(probe.build_train_loader(cfg)))
    out = model(batch, text_attention=True)
    blocks, length = len(model.text_prompter.blocks), batch.text_tokens.shape[1]
    assert out.text_attention is not None and out.text_attention.shape[:3] == (
        batch.num_expressions, blocks, length)  # fmt: skip
    assert model(batch).text_attention is None  # only on request
    optimizer = torch.optim.Adam(model.text_prompter.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        out = model(batch, text_attention=True, prompt_dropout=False)
        loss = text_grounding_loss(out.text_attention, out.text_pad_mask, batch.gt_masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    reader = model.text_prompter.key_reader[1].fc2.weight
    assert reader.grad is not None and float(reader.grad.abs().sum()) > 0
    assert losses[-1] < 0.8 * losses[0]  # the cross-entropy falls as attention finds the referent


grounding = load_script("scripts/probe_grounding.py")


def test_grounding_scorers_find_a_referent_that_the_text_names() -> None:
    # Cells carry one of four "colours" (one-hot features); the text names the referent's colour:
    # each scorer must learn to point at it, and the score must say so.
    torch.manual_seed(0)
    n, hw, dim = 256, 16, 8
    colours = torch.randint(0, 4, (n, hw))
    cells = F.one_hot(colours, dim).float() + 0.05 * torch.randn(n, hw, dim)
    named = colours[:, 0]  # the referent is every cell of the first cell's colour
    referent = (colours == named[:, None]).float()
    text = F.one_hot(named, 4).float()
    data = {"text": text, "cells": cells, "referent": referent, "form": ["colour"] * n}
    for scorer in (grounding.Bilinear(4, dim, None), grounding.Joint(4, dim)):
        grounding.fit(scorer, data, steps=300)
        with torch.no_grad():
            result = grounding.score(scorer(text, cells), data)
        assert result["all"]["pointing"] == 100.0 and result["colour"]["expressions"] == n
        assert result["all"]["mass"] > 90.0
    chance = grounding.score(torch.zeros(n, hw), data)["all"]["mass"]
    assert abs(chance - 100 * float(referent.mean())) < 0.1  # flat logits spread the mass evenly


def test_grounding_probe_reports_on_an_export(export: dict[str, Path]) -> None:
    out = export["root"] / "grounding"
    assert grounding.main([
        "--checkpoint", str(export["checkpoint"]), "--out", str(out), "--batches", "2",
        "--steps", "5", f"data.prepared={export['prepared']}", "data.train=synthetic:train",
        "data.num_workers=0", "data.images_per_step=2",
    ]) == 0  # fmt: skip
    report = json.loads((out / "grounding.json").read_text())
    for name in ("coarse", "bilinear", "bilinear+pos", "mlp"):
        assert 0.0 <= report[name]["all"]["pointing"] <= 100.0
        assert report[name]["all"]["expressions"] > 0


def test_oracle_share_spreads_the_rest_evenly() -> None:
    prompter = probe.TextPrompter(text_dim=8, dim=8, num_blocks=1, num_heads=2)
    oracle = probe.OracleAttention(prompter, share=0.25)
    gt = torch.zeros(1, 1, 4, 4)
    gt[..., :2, :2] = 1  # the referent: the top-left 2 x 2 cells of a 4 x 4 grid
    oracle.show(gt, (4, 4))
    assert oracle.weights is not None
    weights = oracle.weights.reshape(4, 4)
    assert torch.allclose(weights.sum(), torch.tensor(1.0))
    assert torch.allclose(weights[:2, :2], torch.full((2, 2), 0.25 / 4 + 0.75 / 16))
    assert torch.allclose(weights[2:, 2:], torch.full((2, 2), 0.75 / 16))
