"""Can the referent be found from what the text prompter is given? Fit small scorers of F_IS's
cells against the expression's CLIP text tokens F_T, with the referent's cells as the target, and
measure how often they point at it.

The model is an export (a run's ``stage1/`` or ``final/``) and stays frozen. From ``--batches``
training batches it collects F_T and SAM's image embedding F_IS (and the referent's share of each
F_IS cell), fits each scorer with the cross-entropy against that share, then on ``--split`` (a
validation split, never a test split) reports per scorer:

- *pointing*: how often its highest cell lies on the referent (over half the cell covered);
- *mass*: the softmax weight it puts on the referent's cells (what attention with these logits
  would read from the referent);

by expression form where the texts are the synthetic grammar's, beside the coarse CLIP mask's
own highest cell. The scorers:

- ``bilinear``: ``q(F_T) . k(LN(F_IS))``, the form of the prompter's cross-attention logits;
- ``bilinear+pos``: the same with SAM's dense position encoding added to the keys, as the
  prompter's ``text_position=keys`` does;
- ``mlp``: an MLP of ``a(F_T) + b(LN(F_IS))`` per cell, a non-linear reading of the same inputs.

F_T is summarised by its mean over the expression's tokens (``--text eos`` takes the [EOS]
token). Figures go to the log and to ``<out>/grounding.json``::

    python scripts/probe_grounding.py --checkpoint runs/demo/train/stage1 --out runs/grounding
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prompt_ris import PromptRIS
from prompt_ris.config import load_config
from prompt_ris.data.loader import build_eval_loader, build_train_loader
from prompt_ris.miniature.synthetic import expression_form

logger = logging.getLogger("probe_grounding")
ALL = "all"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="export whose F_T and F_IS are read")
    parser.add_argument("--out", required=True, help="folder for grounding.json")
    parser.add_argument("--split", default="synthetic:val", help="validation split to measure on")
    parser.add_argument("--batches", type=int, default=150, help="training batches to fit on")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps per scorer")
    parser.add_argument("--text", choices=("mean", "eos"), default="mean")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (data.*)")
    return parser.parse_args(argv)


def form_of(text: str) -> str:
    """The synthetic grammar's expression form, or ``"all"`` for other texts."""
    try:
        return expression_form(text)
    except ValueError:
        return ALL


@torch.no_grad()
def collect(model: PromptRIS, loader: Any, batches: int, text: str) -> dict[str, Any]:
    """F_T summaries (N, D_T), F_IS cells (N, hw, D_S), the referent's share of each cell and
    the coarse mask on the same grid (N, hw), and the forms, for ``batches`` batches."""
    out: dict[str, list[Any]] = {k: [] for k in ("text", "cells", "referent", "coarse", "form")}
    for i, batch in enumerate(loader):
        if i == batches:
            break
        encoded = model.encode(batch, with_sam=True)
        assert encoded.sam_img_embed is not None
        words = (~encoded.text_pad_mask).float()[..., None]  # (B, L, 1)
        if text == "eos":
            last = words[..., 0].sum(1).long() - 1  # (B,)
            out["text"].append(encoded.text_tokens[torch.arange(len(last)), last])  # (B, D_T)
        else:
            out["text"].append((encoded.text_tokens * words).sum(1) / words.sum(1))  # (B, D_T)
        grid = encoded.sam_img_embed.shape[-2:]
        cells = encoded.sam_img_embed[encoded.image_index].flatten(2).transpose(1, 2)
        out["cells"].append(cells)  # (B, hw, D_S)
        out["referent"].append(F.adaptive_avg_pool2d(batch.gt_masks.float(), grid).flatten(1))
        out["coarse"].append(F.adaptive_avg_pool2d(encoded.coarse_lowres.float(), grid).flatten(1))
        out["form"].extend(form_of(t) for t in batch.texts)
    return {k: v if k == "form" else torch.cat(v) for k, v in out.items()}


class Bilinear(nn.Module):
    """``q(t) . k(LN(f) [+ pos])`` per cell: attention logits."""

    def __init__(self, text_dim: int, cell_dim: int, pos: torch.Tensor | None, width: int = 64):
        super().__init__()
        self.q = nn.Linear(text_dim, width)
        self.k = nn.Linear(cell_dim, width)
        self.norm = nn.LayerNorm(cell_dim)
        self.register_buffer("pos", pos if pos is not None else torch.zeros(1, cell_dim))

    def forward(self, text: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        keys = self.k(self.norm(cells) + self.pos)  # (N, hw, width)
        return torch.einsum("nk,nck->nc", self.q(text), keys)  # (N, hw)


class Joint(nn.Module):
    """``MLP(a(t) + b(LN(f)))`` per cell."""

    def __init__(self, text_dim: int, cell_dim: int, width: int = 128) -> None:
        super().__init__()
        self.a = nn.Linear(text_dim, width)
        self.b = nn.Linear(cell_dim, width)
        self.norm = nn.LayerNorm(cell_dim)
        self.head = nn.Sequential(
            nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1)
        )

    def forward(self, text: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        joint = self.a(text)[:, None] + self.b(self.norm(cells))  # (N, hw, width)
        return self.head(joint)[..., 0]  # (N, hw)


def fit(
    scorer: nn.Module, train: dict[str, Any], steps: int, batch: int = 64, lr: float = 3e-3
) -> nn.Module:
    """Fit ``scorer`` with the cross-entropy against the referent's share of each cell."""
    target = train["referent"] / train["referent"].sum(1, keepdim=True).clamp_min(1e-6)
    optimizer = torch.optim.Adam(scorer.parameters(), lr=lr)
    for _ in range(steps):
        rows = torch.randint(0, len(target), (batch,))
        logits = scorer(train["text"][rows], train["cells"][rows])  # (batch, hw)
        loss = -(target[rows] * logits.log_softmax(-1)).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return scorer


def score(logits: torch.Tensor, data: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Pointing and mass (%) overall and per form."""
    on = (data["referent"] > 0.5).float()  # (N, hw)
    hit = on.gather(1, logits.argmax(-1, keepdim=True))[:, 0]  # (N,)
    mass = (logits.softmax(-1) * on).sum(-1)  # (N,)
    groups: dict[str, list[int]] = {ALL: list(range(len(hit)))}
    for i, form in enumerate(data["form"]):
        if form != ALL:
            groups.setdefault(form, []).append(i)
    return {
        group: {
            "pointing": round(100 * float(hit[rows].mean()), 1),
            "mass": round(100 * float(mass[rows].mean()), 1),
            "expressions": len(rows),
        }
        for group, rows in groups.items()
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)
    model = PromptRIS.from_pretrained(args.checkpoint).eval()
    if args.overrides:
        model.config = load_config(base=model.config, overrides=args.overrides)
    cfg = model.config
    assert cfg is not None
    started = time.perf_counter()
    train = collect(model, build_train_loader(cfg), args.batches, args.text)
    val = collect(model, build_eval_loader(cfg, args.split), sys.maxsize, args.text)
    logger.info(
        "collected %d training and %d %s expressions (%.0f s)",
        len(train["form"]), len(val["form"]), args.split, time.perf_counter() - started,
    )  # fmt: skip
    text_dim, cell_dim = train["text"].shape[-1], train["cells"].shape[-1]
    pos = model.sam.dense_pe().flatten(2).transpose(1, 2)[0]  # (hw, D_S)
    scorers: dict[str, Callable[[], nn.Module]] = {
        "bilinear": lambda: Bilinear(text_dim, cell_dim, None),
        "bilinear+pos": lambda: Bilinear(text_dim, cell_dim, pos),
        "mlp": lambda: Joint(text_dim, cell_dim),
    }
    report: dict[str, Any] = {
        "checkpoint": args.checkpoint,
        "split": args.split,
        "text": args.text,
        "batches": args.batches,
        "steps": args.steps,
        "seed": args.seed,
        "coarse": score(val["coarse"], val),
    }
    logger.info("coarse CLIP mask: %s", report["coarse"][ALL])
    for name, make in scorers.items():
        scorer = fit(make(), train, args.steps)
        with torch.no_grad():
            report[name] = score(scorer(val["text"], val["cells"]), val)
        logger.info("%s: %s", name, report[name])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grounding.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("%s", json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
