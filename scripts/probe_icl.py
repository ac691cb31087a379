"""What Instance Contrastive Learning does to the masks: a checkpoint trained with ICL beside one
trained without it, on the same split.

For each checkpoint (``--with``, ``--without``), the model's own forward runs over every
expression of ``--split`` (default ``synthetic:val``; a diagnosis may also read a test split,
nothing is chosen on it), and for the coarse mask S_C and the final mask S' it reports:

- *what ICL acts on*: for pairs of expressions of one image that refer to different objects,
  the overlap O_ij of their soft masks in the low-res frame the loss reads (eq. 7, from
  ``losses.icl_pairs``, the pairs the loss sums), its mean and distribution, and each group's
  share of the pairs' eq. (8) terms (where the loss pushes); grouped by whether the two objects
  share a colour, a shape, both or neither; same-object pairs beside them. For the pairs where
  one mask lies more on the other's object than on its own, the weight w of each side's term
  and, for the pair alone (training draws b = 2 expressions per image), whether ICL's step
  raises the wrong mask on the wrong object and lowers the right one on its referent;
- *where ICL's step moves the masks*: the gradient of eq. (8) w.r.t. the logits, the share of
  its push down and of its push up on each mask's referent, on the image's other objects and
  elsewhere; and the loss itself;
- *confusions*: the share of expressions whose mask (thresholded, original frame) has a higher
  IoU with another object of its image than with its referent, by expression form, and what
  the other object shares with the referent;
- *the mask itself*: mIoU, predicted area over the referent's area, mean probability inside and
  outside the referent, the share of the probability mass on the image's other objects;
- oIoU, mIoU, ImgAcc and InstAcc as evaluation computes them (``engine.evaluation``), also
  for the referents of seen and of unseen categories when the data has a category split.

The objects of an image are the referred objects of the split (its expressions' ``ann_id`` and
masks, from the prepared data); shape is the category, colour is read from the image's pixels
under the object's mask (the synthetic world's four flat colours). The data is each checkpoint's
own (its config's ``data.prepared``) unless an override says otherwise. Writes
``<out>/icl.json`` and ``<out>/icl.md``; a problem (a missing checkpoint or split) is one line
on stderr and exit status 1::

    python scripts/probe_icl.py --with runs/g5/train/final --without runs/g5_noicl/train/final \\
        --out runs/probe_icl/seed42_val [--split synthetic:test] [data.prepared=...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from prompt_ris import PromptRIS
from prompt_ris.config import Config, load_config
from prompt_ris.data.batch import Batch
from prompt_ris.data.loader import build_eval_loader
from prompt_ris.data.splits import category_split_of, parse_split
from prompt_ris.data.transforms import load_image
from prompt_ris.engine.evaluation import score_batch
from prompt_ris.losses import icl_pairs, instance_contrastive_loss
from prompt_ris.metrics import summarize, threshold_logit
from prompt_ris.miniature.synthetic import COLOURS, SHAPES, expression_form

logger = logging.getLogger("probe_icl")
OUTPUTS = ("coarse", "final")
RELATIONS = ("same colour", "same shape", "same colour and shape", "neither")
SAME_OBJECT = "same object"
ALL = "all"
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
BINS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0)  # histogram edges of O (the last bin is closed)
SHAPE_NAMES = {i: name for name, i in SHAPES.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--with", dest="with_icl", required=True, help="export trained with ICL")
    parser.add_argument("--without", required=True, help="export trained without ICL")
    parser.add_argument("--out", required=True, help="folder for icl.json and icl.md")
    parser.add_argument("--split", default="synthetic:val", help="split to measure on")
    parser.add_argument("--max-images", type=int, default=None, help="first N images only")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (data.*, eval.*)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Objects and their attributes
# --------------------------------------------------------------------------------------------
@dataclass
class SceneObject:
    """One referred object of an image: its mask in the original frame and its look."""

    object_id: int
    mask: np.ndarray  # (H, W) bool
    colour: str
    shape: str


def object_colour(pixels: np.ndarray, mask: np.ndarray) -> str:
    """The synthetic colour nearest to the mean of the object's pixels ((H, W, 3), (H, W))."""
    mean = pixels[mask].reshape(-1, 3).astype(np.float64).mean(0)  # (3,)
    return min(COLOURS, key=lambda name: float(np.square(mean - COLOURS[name]).sum()))


def relation(a: SceneObject, b: SceneObject) -> str:
    """What two different objects share: one of ``RELATIONS``."""
    colour, shape = a.colour == b.colour, a.shape == b.shape
    if colour and shape:
        return "same colour and shape"
    return "same colour" if colour else "same shape" if shape else "neither"


def form_of(text: str) -> str:
    """The synthetic grammar's expression form, or ``"all"`` for other texts."""
    try:
        return expression_form(text)
    except ValueError:
        return ALL


def batch_objects(batch: Batch, pixels: Sequence[np.ndarray]) -> list[SceneObject]:
    """The referent of each of the B expressions, one shared object per (image, ann_id);
    ``pixels`` holds each image's (H, W, 3) original pixels."""
    assert batch.gt_masks_orig is not None
    made: dict[tuple[int, int], SceneObject] = {}
    referents = []
    for k, (image, object_id) in enumerate(zip(batch.image_index.tolist(), batch.object_ids)):
        key = (int(image), int(object_id))
        if key not in made:
            mask = np.asarray(batch.gt_masks_orig[k], dtype=bool)
            category = int(batch.category_ids[k])
            made[key] = SceneObject(
                int(object_id), mask, object_colour(pixels[key[0]], mask),
                SHAPE_NAMES.get(category, str(category)),
            )  # fmt: skip
        referents.append(made[key])
    return referents


# --------------------------------------------------------------------------------------------
# Pairs (what ICL acts on) and expressions (what it should change)
# --------------------------------------------------------------------------------------------
REGIONS = ("referent", "other objects", "elsewhere")


def icl_push(logits: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a descent step on L_icl moves each mask (low-res frame): the gradient of eq. (8)
    w.r.t. the logits, its positive part (the step lowers the mask there) and its negative part
    (raises it), each summed over the mask's own referent, the other objects of its image and
    the rest of the frame (``REGIONS``): two (B, 3) tensors, down and up. ``batch`` needs
    ``object_ids``, ``image_index`` and ``gt_masks``."""
    x = logits.detach().float().requires_grad_(True)  # (B, 1, h, w)
    with torch.enable_grad():
        loss = instance_contrastive_loss(x, batch.object_ids, batch.image_index, batch.gt_masks)
        (grad,) = torch.autograd.grad(loss, x)  # (B, 1, h, w)
    referent = batch.gt_masks > 0.5  # (B, 1, h, w)
    others = torch.zeros_like(referent)
    for k in range(len(referent)):
        mates = (batch.image_index == batch.image_index[k]) & (
            batch.object_ids != batch.object_ids[k]
        )  # (B,)
        others[k] = referent[mates].any(0) & ~referent[k]
    regions = torch.stack([referent, others, ~referent & ~others], 1).flatten(2)  # (B, 3, hw)
    down, up = grad.clamp_min(0).flatten(1), (-grad).clamp_min(0).flatten(1)  # (B, hw)
    return (down[:, None] * regions).sum(-1), (up[:, None] * regions).sum(-1)  # (B, 3)


def pair_rows(
    logits: torch.Tensor,
    batch: Batch,
    referents: Sequence[SceneObject],
    confused_onto: Sequence[int | None],
) -> list[dict[str, Any]]:
    """One row per unordered pair i < j of expressions of one image (low-res frame): its group
    (a ``RELATIONS`` entry, or ``SAME_OBJECT``), O_ij and the two eq. (8) terms summed.

    When one mask of a different-object pair lies more on the other's object (``confused_onto``:
    per expression the id of that object, else None), the row also holds the weights w of the
    confused side's term and of the other side's, and what ICL's step does to the two masks
    when the pair is the image's only expressions (as training's b = 2 draws it):
    ``raises_wrong`` when it raises the confused mask on the wrong object (net over it),
    ``lowers_right`` when it lowers the other mask on its own referent."""
    pairs = icl_pairs(logits, batch.object_ids, batch.image_index, batch.gt_masks)
    rows = []
    for i, j in torch.nonzero(torch.triu(pairs.same_image, diagonal=1)).tolist():
        a, b = referents[i], referents[j]
        row = {
            "group": SAME_OBJECT if a.object_id == b.object_id else relation(a, b),
            "overlap": float(pairs.overlap[i, j]),
            "terms": float(pairs.terms[i, j] + pairs.terms[j, i]),
        }
        if row["group"] != SAME_OBJECT:
            for confused, other in ((i, j), (j, i)):
                if confused_onto[confused] != referents[other].object_id:
                    continue
                row["w_confused"] = float(pairs.weights[confused])
                row["w_other"] = float(pairs.weights[other])
                index = torch.tensor([confused, other])
                alone = SimpleNamespace(
                    object_ids=batch.object_ids[index], image_index=torch.zeros_like(index),
                    gt_masks=batch.gt_masks[index],
                )  # fmt: skip
                down, up = icl_push(logits[index], alone)  # (2, 3)
                net = up - down  # (2, 3) > 0: the step raises the mask there
                row["raises_wrong"] = bool(net[0, REGIONS.index("other objects")] > 0)
                row["lowers_right"] = bool(net[1, REGIONS.index("referent")] < 0)
        rows.append(row)
    return rows


def expression_row(
    logits: torch.Tensor,
    referent: SceneObject,
    others: Sequence[SceneObject],
    threshold: float,
) -> dict[str, Any]:
    """What one mask ((H, W) logits, original frame) covers: IoU with its referent and with the
    object of its image it overlaps most otherwise (``confused_onto`` when that IoU is higher),
    predicted over referent area, mean probability inside / outside the referent and the share
    of its probability mass on the image's other objects."""
    probs = logits.float().sigmoid().numpy()  # (H, W)
    pred = logits.float().numpy() > threshold_logit(threshold)  # (H, W)

    def iou(mask: np.ndarray) -> float:
        union = (pred | mask).sum()
        return float((pred & mask).sum() / union) if union else 1.0

    on_ref = referent.mask
    ious = [iou(o.mask) for o in others]
    best = int(np.argmax(ious)) if others else -1
    row: dict[str, Any] = {
        "iou": iou(on_ref),
        "area_ratio": float(pred.sum() / max(on_ref.sum(), 1)),
        "p_inside": float(probs[on_ref].mean()),
        "p_outside": float(probs[~on_ref].mean()) if (~on_ref).any() else 0.0,
        "confused_onto": None,
        "confused_relation": None,
    }
    other_pixels = np.zeros_like(on_ref)
    for o in others:
        other_pixels |= o.mask & ~on_ref
    row["leak"] = float(probs[other_pixels].sum() / max(probs.sum(), 1e-12))
    if others and ious[best] > row["iou"]:
        row["confused_onto"] = others[best].object_id
        row["confused_relation"] = relation(referent, others[best])
    return row


# --------------------------------------------------------------------------------------------
# One checkpoint over a split
# --------------------------------------------------------------------------------------------
def image_pixels(dataset: Any, rows: dict[int, int], batch: Batch) -> list[np.ndarray]:
    """Each image of the batch as (H, W, 3) uint8, read as ``dataset`` reads it; ``rows`` maps
    a ref_id to its table row."""
    pixels = []
    for image in range(batch.num_images):
        k = int(torch.nonzero(batch.image_index == image)[0, 0])
        record = dataset.table[rows[int(batch.ref_ids[k])]]
        hw = (int(record["height"]), int(record["width"]))
        pixels.append(np.asarray(load_image(dataset.image_path(record), hw)))
    return pixels


@torch.no_grad()
def measure(
    model: PromptRIS, cfg: Config, split: str, max_images: int | None = None
) -> dict[str, Any]:
    """Pairs, expression rows and evaluation records of every expression of ``split``."""
    threshold = cfg.eval.threshold
    loader = build_eval_loader(cfg, split)
    rows_of = {int(ref): row for row, ref in enumerate(loader.dataset.table["ref_id"][:])}
    pairs: dict[str, list[dict[str, Any]]] = {o: [] for o in OUTPUTS}
    exprs: dict[str, list[dict[str, Any]]] = {o: [] for o in OUTPUTS}
    records: list[dict[str, Any]] = []
    icl = {o: 0.0 for o in OUTPUTS}  # eq. (8) summed over images
    push = {o: {d: dict.fromkeys(REGIONS, 0.0) for d in ("down", "up")} for o in OUTPUTS}
    images = 0
    model.eval()
    for batch in loader:
        if max_images is not None and images >= max_images:
            break
        images += batch.num_images
        out = model(batch, prompt_dropout=False)
        lowres = {"coarse": out.coarse_lowres, "final": out.mask_logits}  # (B, 1, S_s/4, S_s/4)
        frames = model.original_logits(out, batch.input_sizes, batch.orig_sizes, batch.image_index)
        records += score_batch(frames["coarse"], frames["final"], batch, split, threshold)
        referents = batch_objects(batch, image_pixels(loader.dataset, rows_of, batch))
        index = batch.image_index.tolist()
        for output in OUTPUTS:
            rows = []
            for k, referent in enumerate(referents):
                others = {
                    o.object_id: o
                    for o, image in zip(referents, index)
                    if image == index[k] and o.object_id != referent.object_id
                }
                row = expression_row(frames[output][k], referent, list(others.values()), threshold)
                category = int(batch.category_ids[k])
                rows.append({**row, "form": form_of(batch.texts[k]), "category_id": category})
            exprs[output] += rows
            onto = [r["confused_onto"] for r in rows]
            pairs[output] += pair_rows(lowres[output], batch, referents, onto)
            loss = instance_contrastive_loss(
                lowres[output], batch.object_ids, batch.image_index, batch.gt_masks
            )
            icl[output] += float(loss) * batch.num_images  # the loss is a mean over images
            for way, sums in zip(("down", "up"), icl_push(lowres[output], batch)):
                for region, value in zip(REGIONS, sums.sum(0).tolist()):
                    push[output][way][region] += value
    return {
        "pairs": pairs,
        "expressions": exprs,
        "records": records,
        "icl_loss": {o: value / max(images, 1) for o, value in icl.items()},
        "push": push,
    }


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------
def overlap_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, quantiles and histogram of O over pairs, and each group's share of the summed
    different-object terms (%)."""
    different = [r for r in rows if r["group"] != SAME_OBJECT]
    total_terms = sum(r["terms"] for r in different)
    groups: dict[str, list[dict[str, Any]]] = {ALL: different}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    out: dict[str, Any] = {}
    for group in (ALL, *RELATIONS, SAME_OBJECT):
        members = groups.get(group, [])
        values = np.array([r["overlap"] for r in members])
        entry: dict[str, Any] = {"pairs": len(members)}
        if len(values):
            counts, _ = np.histogram(values, bins=BINS)
            entry |= {
                "mean": float(values.mean()),
                "quantiles": {str(q): float(np.quantile(values, q)) for q in QUANTILES},
                "histogram": {
                    f"[{lo}, {hi})": round(100 * int(c) / len(values), 2)
                    for lo, hi, c in zip(BINS[:-1], BINS[1:], counts)
                },
            }
        if group != SAME_OBJECT and members and total_terms > 0:
            entry["term_share"] = 100 * sum(r["terms"] for r in members) / total_terms
        out[group] = entry
    confused = [r for r in different if "w_confused" in r]
    out["confused_pairs"] = {
        "pairs": len(confused),
        "raises_wrong": 100 * float(np.mean([r["raises_wrong"] for r in confused]))
        if confused
        else None,
        "lowers_right": 100 * float(np.mean([r["lowers_right"] for r in confused]))
        if confused
        else None,
        "overlap": float(np.mean([r["overlap"] for r in confused])) if confused else None,
        "w_confused": float(np.mean([r["w_confused"] for r in confused])) if confused else None,
        "w_other": float(np.mean([r["w_other"] for r in confused])) if confused else None,
        "term_share": 100 * sum(r["terms"] for r in confused) / total_terms
        if total_terms > 0
        else None,
    }
    return out


def confusion_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Share of expressions (%) whose mask lies more on another object, by form, and onto what."""
    groups: dict[str, list[dict[str, Any]]] = {ALL: list(rows)}
    for r in rows:
        if r["form"] != ALL:
            groups.setdefault(r["form"], []).append(r)
    out = {}
    for group, members in groups.items():
        n = len(members)
        onto = defaultdict(int)
        for r in members:
            if r["confused_relation"] is not None:
                onto[r["confused_relation"]] += 1
        out[group] = {
            "expressions": n,
            "confused": 100 * sum(onto.values()) / n,
            "onto": {rel: 100 * onto[rel] / n for rel in RELATIONS},
        }
    return out


def mask_summary(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Means over expressions (probabilities and the leak in %)."""
    ratios = np.array([r["area_ratio"] for r in rows])
    return {
        "area_ratio_mean": float(ratios.mean()),
        "area_ratio_median": float(np.median(ratios)),
        "p_inside": 100 * float(np.mean([r["p_inside"] for r in rows])),
        "p_outside": 100 * float(np.mean([r["p_outside"] for r in rows])),
        "leak": 100 * float(np.mean([r["leak"] for r in rows])),
    }


METRICS = ("oIoU", "mIoU", "ImgAcc", "InstAcc")


def push_shares(push: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each region's share (%) of ICL's push down and of its push up."""
    out = {}
    for way, sums in push.items():
        total = sum(sums.values())
        out[way] = {r: 100 * v / total if total > 0 else 0.0 for r, v in sums.items()}
    return out


def category_summary(
    records: Sequence[dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    output: str,
    unseen: frozenset[int],
) -> dict[str, Any]:
    """Metrics and the confused share (%) of the expressions about seen and unseen categories
    (``records`` and ``rows`` in the same order)."""
    out = {}
    for name, wanted in (("seen", False), ("unseen", True)):
        keep = [k for k, r in enumerate(rows) if (r["category_id"] in unseen) == wanted]
        if not keep:
            continue
        metrics = summarize([records[k] for k in keep], output)
        confused = sum(rows[k]["confused_onto"] is not None for k in keep)
        out[name] = {
            **{m: metrics[m] for m in METRICS},
            "confused": 100 * confused / len(keep),
            "expressions": len(keep),
        }
    return out


def summary(measured: dict[str, Any], unseen: frozenset[int] | None = None) -> dict[str, Any]:
    """The report of one checkpoint: per output, metrics, the ICL loss, overlaps, confusions,
    the mask and (given the ``unseen`` category ids) metrics by seen / unseen category."""
    out = {}
    for output in OUTPUTS:
        metrics = summarize(measured["records"], output)
        rows = measured["expressions"][output]
        out[output] = {
            "metrics": {m: metrics[m] for m in METRICS},
            "icl_loss": measured["icl_loss"][output],
            "push": push_shares(measured["push"][output]),
            "overlap": overlap_summary(measured["pairs"][output]),
            "confusions": confusion_summary(rows),
            "mask": mask_summary(rows),
        }
        if unseen is not None:
            out[output]["categories"] = category_summary(measured["records"], rows, output, unseen)
    out["expressions"] = len(measured["records"])
    return out


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The report's tables, with and without ICL side by side; a row that is empty in every
    column is left out, and so is a breakdown row (a group, a category) that is 0 in every one."""
    runs = report["runs"]
    names = list(runs)
    head = "| | " + " | ".join(f"{o} {n}" for o in OUTPUTS for n in names) + " |"
    rule = "|---|" + "---:|" * (len(OUTPUTS) * len(names))
    lines: list[str] = []

    def row(label: str, get: Any, digits: int = 2, breakdown: bool = False) -> None:
        values = [get(runs[n][o]) for o in OUTPUTS for n in names]
        if any(v for v in values) or (not breakdown and any(v is not None for v in values)):
            lines.append(f"| {label} | " + " | ".join(_f(v, digits) for v in values) + " |")

    def table(title: str) -> None:
        lines.extend(["", f"## {title}", "", head, rule])

    first, second = (runs[n] for n in names)
    lines += [
        f"# ICL probe on {report['split']}",
        "",
        f"{names[0]}: `{first['checkpoint']}`; {names[1]}: `{second['checkpoint']}`; "
        f"{first['expressions']} expressions, {report['seconds']:.0f} s.",
    ]
    table("Metrics and the mask (original frame, threshold as evaluation)")
    for m in METRICS:
        row(m, lambda r, m=m: r["metrics"][m])
    for part in ("seen", "unseen"):
        for m in ("ImgAcc", "InstAcc", "confused"):
            row(f"{part}: {m}", lambda r, p=part, m=m: r.get("categories", {}).get(p, {}).get(m))
    for key, label in (
        ("area_ratio_mean", "area / referent area, mean"),
        ("area_ratio_median", "area / referent area, median"),
        ("p_inside", "mean probability inside the referent (%)"),
        ("p_outside", "mean probability outside the referent (%)"),
        ("leak", "probability mass on other objects (%)"),
    ):
        row(label, lambda r, k=key: r["mask"][k])
    table("What ICL acts on: pairs of one image (low-res frame, eqs. 7-8)")
    row("L_icl (eq. 8), mean over images", lambda r: r["icl_loss"], 4)
    for way, verb in (("down", "lowers"), ("up", "raises")):
        for region in REGIONS:
            row(
                f"where its step {verb} the masks: {region} (%)",
                lambda r, w=way, x=region: r["push"][w][x], 1,
            )  # fmt: skip
    for group in (ALL, *RELATIONS, SAME_OBJECT):
        label = "different objects" if group == ALL else group
        row(f"{label}: pairs", lambda r, g=group: r["overlap"][g]["pairs"], 0, breakdown=True)
        row(f"{label}: mean O", lambda r, g=group: r["overlap"][g].get("mean"), 4)
        row(
            f"{label}: median O",
            lambda r, g=group: r["overlap"][g].get("quantiles", {}).get("0.5"), 4,
        )  # fmt: skip
        if group not in (ALL, SAME_OBJECT):
            row(f"{label}: share of the terms (%)", lambda r, g=group: r["overlap"][g].get(
                "term_share"), 1)  # fmt: skip
    for key, label, digits in (
        ("pairs", "pairs with a confused mask", 0),
        ("overlap", "their mean O", 4),
        ("w_confused", "w of the confused side", 4),
        ("w_other", "w of the other side", 4),
        ("term_share", "their share of the terms (%)", 1),
        ("raises_wrong", "the pair alone: step raises the wrong mask on the wrong object (%)", 1),
        ("lowers_right", "the pair alone: step lowers the right mask on its referent (%)", 1),
    ):
        row(label, lambda r, k=key: r["overlap"]["confused_pairs"][k], digits)
    table("Confusions: mask nearer another object of its image (% of expressions)")
    for form in first["final"]["confusions"]:
        count = first["final"]["confusions"][form]["expressions"]
        row(f"{form} ({count})", lambda r, f=form: r["confusions"][f]["confused"], 1)
        for rel in RELATIONS:
            onto = lambda r, f=form, x=rel: r["confusions"][f]["onto"][x]  # noqa: E731
            row(f"{form}: onto {rel}", onto, 1, breakdown=True)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def load(checkpoint: str, overrides: list[str]) -> tuple[PromptRIS, Config]:
    """The export and its config with the overrides applied (the model section stays its own)."""
    model = PromptRIS.from_pretrained(checkpoint).eval()
    assert model.config is not None, f"{checkpoint} has no config"
    cfg = load_config(base=model.config, overrides=overrides) if overrides else model.config
    cfg.model = model.config.model
    return model, cfg


def unseen_categories(cfg: Config, split: str) -> frozenset[int] | None:
    """The split's unseen category ids, or None when its source has no category split."""
    spec = parse_split(split)
    try:
        return frozenset(category_split_of(cfg.data.prepared, spec.dataset, spec.split_by)[1])
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs = {}
    for name, checkpoint in (("with ICL", args.with_icl), ("without ICL", args.without)):
        try:
            model, cfg = load(checkpoint, args.overrides)
            measured = measure(model, cfg, args.split, args.max_images)
        except (OSError, ValueError, KeyError) as err:
            print(f"probe_icl.py: {checkpoint}: {err}".splitlines()[0], file=sys.stderr)
            return 1
        runs[name] = {
            "checkpoint": checkpoint,
            "icl_weight": cfg.train.icl_weight,
            **summary(measured, unseen_categories(cfg, args.split)),
        }
        logger.info(
            "%s: final ImgAcc %.2f, confused %.1f%%, mean O (different objects) %.4f",
            name, runs[name]["final"]["metrics"]["ImgAcc"],
            runs[name]["final"]["confusions"][ALL]["confused"],
            runs[name]["final"]["overlap"][ALL].get("mean", float("nan")),
        )  # fmt: skip
    report = {"split": args.split, "seconds": time.perf_counter() - started, "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "icl.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "icl.md").write_text(markdown(report))
    logger.info("written to %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
