"""Train the text prompter alone on a trained model, with text as SAM's only prompt, and measure
what it learns.

The rest of the model is taken from an export (a run's ``stage1/``: CLIP with CMP and the coarse
decoder trained, SAM frozen) and frozen; a fresh text prompter, built as
``model.prompts.text_start`` / ``text_position`` / ``text_keys`` say, is trained on the run's
training split with the stage-2 loss on the final mask (BCE + Dice, ICL as the run's
``train.icl_weight``), AdamW and the poly schedule. Then, on ``--split`` (a validation split,
never a test split):

- text-alone mIoU / oIoU beside the random object and the coarse CLIP mask
  (``prompt_ris.evaluate``);
- where each block's cross-attention looks: its weight on the referent's cells of F_IS's grid,
  against the referent's share of the grid (what attention spread evenly would give);
- the gradient reaching the prompter's first layer in the first steps, and the scale of its final
  LayerNorm at the end (0 at the padding start).

With ``--oracle-attention`` every cross-attention reads the referent's cells of F_IS, weighted by
its ground-truth mask, instead of where its weights point: what the prompter gives once it has
found the referent, and so whether finding it is what it lacks; ``--oracle-share P`` puts only P
of that weight on the referent and spreads the rest evenly over the grid. With the
override ``train.text_grounding_weight=W`` the learnt attention is also taught the referent's
cells (W x ``losses.text_grounding_loss``, the cross-entropy of each block's weights against
them): whether it can find the referent in F_IS when told where it is.

Figures go to the log and to ``<out>/probe.json``::

    python scripts/probe_text_prompter.py --checkpoint runs/demo/train/stage1 --out runs/probe \\
        model.prompts.text_position=keys+values model.prompts.text_start=random \\
        model.prompts.text_keys=mlp train.text_grounding_weight=1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prompt_ris import PromptRIS, evaluate
from prompt_ris.config import Config, load_config
from prompt_ris.data.batch import Batch
from prompt_ris.data.loader import build_eval_loader, build_train_loader
from prompt_ris.engine.evaluation import EvaluationResults
from prompt_ris.losses import Stage, referent_share, stage_loss
from prompt_ris.miniature.synthetic import expression_form
from prompt_ris.models.build import build_text_prompter
from prompt_ris.models.layers import CrossAttention
from prompt_ris.models.prompt_ris import EncodedBatch, PromptRISOutput
from prompt_ris.models.text_prompter import TextPrompter
from prompt_ris.prompt_switches import PromptSwitches

logger = logging.getLogger("probe_text_prompter")
TEXT = PromptSwitches.parse("text")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="export whose CLIP side is kept")
    parser.add_argument("--out", required=True, help="folder for probe.json")
    parser.add_argument("--split", default="synthetic:val", help="validation split to measure on")
    parser.add_argument(
        "--steps", type=int, default=952, help="optimizer steps (the demo's stage 2)"
    )
    parser.add_argument("--lr", type=float, default=None, help="default: the run's train.lr / 2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention-batches", type=int, default=8)
    parser.add_argument(
        "--oracle-attention", action="store_true",
        help="cross-attention reads the referent's ground-truth cells (a diagnosis, not a model)",
    )  # fmt: skip
    parser.add_argument(
        "--oracle-share",
        type=float,
        default=1.0,
        metavar="P",
        help="with --oracle-attention: put only P of the weight on the referent's cells and "
        "spread the rest evenly (what attention that finds the referent in part reads)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides key=value (model.prompts.*, train.*, data.*)"
    )
    return parser.parse_args(argv)


def fresh_prompter(model: PromptRIS, overrides: list[str]) -> None:
    """Replace the model's text prompter by one built as the overridden config says."""
    assert model.config is not None
    cfg = load_config(base=model.config, overrides=overrides)
    model.text_prompter = build_text_prompter(cfg.model, model.sam.pad_embed[0])
    model.config = cfg


class OracleAttention:
    """Replaces each cross-attention's weights by the referent's ground-truth mask on F_IS's
    grid (set per batch with ``show``); values, projections and the rest are the prompter's."""

    def __init__(self, prompter: TextPrompter, share: float = 1.0) -> None:
        self.weights: torch.Tensor | None = None  # (B, hw), rows summing to 1
        self.share = share
        for block in prompter.blocks:
            block.cross_attn.forward = self._forward_of(block.cross_attn)

    def show(self, gt_masks: torch.Tensor, grid: tuple[int, int]) -> None:
        referent = referent_share(gt_masks, grid)  # (B, hw)
        self.weights = self.share * referent + (1 - self.share) / referent.shape[1]

    def _forward_of(self, module: CrossAttention) -> Callable[..., torch.Tensor]:
        def forward(
            query: torch.Tensor,
            context: torch.Tensor,
            context_pad_mask: torch.Tensor | None = None,
            context_pos: torch.Tensor | None = None,
            value_pos: torch.Tensor | None = None,
            key_context: torch.Tensor | None = None,
        ) -> torch.Tensor:
            assert self.weights is not None, "show() the batch's ground truth first"
            kv = module.norm_kv(context)
            v = kv if value_pos is None else kv + value_pos
            attn = module.attn
            dim = attn.embed_dim
            values = F.linear(v, attn.in_proj_weight[2 * dim :], attn.in_proj_bias[2 * dim :])
            read = torch.einsum("bk,bkd->bd", self.weights, values)  # (B, D)
            return attn.out_proj(read)[:, None].expand(-1, query.shape[1], -1)  # (B, Q, D)

        return forward


def attention_and_referent(
    model: PromptRIS, encoded: EncodedBatch, gt_masks: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Each block's cross-attention weights (B, L, hw), averaged over heads; the referent's share
    of each F_IS cell (B, hw); and the expression's tokens (B, L), 1 before padding."""
    maps: list[torch.Tensor] = []
    model.text_prompter(
        encoded.text_tokens, encoded.text_pad_mask, encoded.sam_img_embed,
        encoded.image_index, model.sam.dense_pe(), maps,
    )  # fmt: skip
    grid = encoded.sam_img_embed.shape[-2:]
    cells = F.adaptive_avg_pool2d(gt_masks.float(), grid).flatten(1)  # (B, hw)
    return maps, cells, (~encoded.text_pad_mask).float()


def train_prompter(
    model: PromptRIS,
    steps: int,
    lr: float,
    oracle: OracleAttention | None = None,
) -> list[float]:
    """Train only the text prompter; returns the gradient norm at its first layer per step."""
    cfg = model.config
    assert cfg is not None
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.text_prompter.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, 1 - s / steps) ** cfg.train.poly_power
    )
    loader = build_train_loader(cfg)
    model.eval()
    model.text_prompter.train()
    grads, step, epoch, started = [], 0, 0, time.perf_counter()
    while step < steps:
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            with torch.no_grad():
                encoded = model.encode(batch, with_sam=True)
            if oracle is not None:
                oracle.show(batch.gt_masks, encoded.sam_img_embed.shape[-2:])
            grounding = cfg.train.text_grounding_weight
            maps: list[torch.Tensor] | None = [] if grounding else None
            final = model.decode(encoded, TEXT, prompt_dropout=False, text_attention=maps)
            out = PromptRISOutput(  # final: (B, 1, h, w)
                encoded.coarse_logits, encoded.coarse_lowres, final, encoded.text_global,
                text_attention=torch.stack(maps, 1) if maps else None,
                text_pad_mask=encoded.text_pad_mask,
            )  # fmt: skip
            loss, terms = stage_loss(out, batch, Stage.FULL, cfg.train.icl_weight, grounding)
            loss = loss - terms["clipseg"] - terms["icl_coarse"]  # the frozen side's terms
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads.append(float(model.text_prompter.in_proj.weight.grad.norm()))
            optimizer.step()
            schedule.step()
            step += 1
            if step % 100 == 0 or step == steps:
                logger.info(
                    "step %d/%d loss %.4f (%.1f s)", step, steps, float(loss.detach()),
                    time.perf_counter() - started,
                )  # fmt: skip
            if step == steps:
                break
        epoch += 1
    model.eval()
    return grads


@torch.no_grad()
def attention_on_referent(model: PromptRIS, split: str, batches: int) -> dict[str, list[float]]:
    """Per block: mean cross-attention weight on the referent's F_IS cells, and the referent's
    mean share of the cells (the weight attention spread evenly would put there)."""
    cfg = model.config
    assert cfg is not None
    loader = build_eval_loader(cfg, split)
    on, share = [], []
    for i, batch in enumerate(loader):
        if i == batches:
            break
        encoded = model.encode(batch, with_sam=True)
        maps, gt, words = attention_and_referent(model, encoded, batch.gt_masks)
        per_block = [
            ((m * gt[:, None]).sum(-1) * words).sum(1) / words.sum(1)  # (B,)
            for m in maps  # (B, L, hw)
        ]
        on.append(torch.stack(per_block, 1))  # (B, blocks)
        share.append(gt.mean(1))  # (B,)
    return {
        "on_referent": torch.cat(on).mean(0).tolist(),
        "referent_share": [float(torch.cat(share).mean())],
    }


def evaluate_with_oracle(
    model: PromptRIS, split: str, cfg: Config, oracle: OracleAttention
) -> EvaluationResults:
    """``evaluate`` with the oracle shown each batch's ground truth before SAM's side runs."""
    encode = model.encode

    def encode_showing(inputs: Batch, **kwargs: Any) -> EncodedBatch:
        encoded = encode(inputs, **kwargs)
        oracle.show(inputs.gt_masks, encoded.sam_img_embed.shape[-2:])
        return encoded

    model.encode = encode_showing  # type: ignore[method-assign]
    try:
        return evaluate(model, split, [TEXT], config=cfg)
    finally:
        del model.encode


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)
    model = PromptRIS.from_pretrained(args.checkpoint)
    fresh_prompter(model, args.overrides)
    cfg = model.config
    assert cfg is not None
    cfg.eval.num_overlays = 0
    lr = args.lr if args.lr is not None else cfg.train.lr / 2
    if args.oracle_attention and cfg.train.text_grounding_weight > 0:
        logger.error(
            "--oracle-attention replaces the attention that train.text_grounding_weight "
            "teaches; drop one of them"
        )
        return 1
    oracle = (
        OracleAttention(model.text_prompter, args.oracle_share) if args.oracle_attention else None
    )
    grads = train_prompter(model, args.steps, lr, oracle)
    if oracle is None:
        attention = attention_on_referent(model, args.split, args.attention_batches)
        results = evaluate(model, args.split, [TEXT], config=cfg)
    else:
        attention = {}
        results = evaluate_with_oracle(model, args.split, cfg, oracle)
    metrics = results.metrics[TEXT.name][args.split]
    report = {
        "checkpoint": args.checkpoint,
        "overrides": args.overrides,
        "oracle_attention": args.oracle_attention,
        "oracle_share": args.oracle_share if args.oracle_attention else None,
        "text_grounding_weight": cfg.train.text_grounding_weight,
        "split": args.split,
        "steps": args.steps,
        "lr": lr,
        "seed": args.seed,
        "mIoU": {o: round(m["mIoU"], 2) for o, m in metrics.items()},
        "oIoU": {o: round(m["oIoU"], 2) for o, m in metrics.items()},
        "mIoU_by_form": {
            form: {o: round(m["mIoU"], 2) for o, m in outputs.items()}
            for form, outputs in results.by_group(
                args.split, lambda r: expression_form(r["text"]), ["final", "coarse", "random"]
            ).items()
        },
        "attention": attention,
        "grad_first_layer": {
            "first_10_steps": sum(grads[:10]) / max(len(grads[:10]), 1),
            "last_10_steps": sum(grads[-10:]) / max(len(grads[-10:]), 1),
        },
        "out_norm_scale": float(model.text_prompter.out_norm.weight.detach().abs().mean()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("%s", json.dumps(report))
    return 0 if all(math.isfinite(g) for g in grads) else 1


if __name__ == "__main__":
    sys.exit(main())
