"""Evaluation: a model (or checkpoint) on named splits and prompt switch sets -> metrics.

One call, :func:`evaluate`, scores every sentence of every reference of each split for the
coarse mask (S_C) and the final mask (S') of each prompt switch set (the model's own by default;
``switches.ablation()`` gives the paper's Table 5), beside the random-object baseline
(:mod:`prompt_ris.engine.baseline`). Per batch, CLIP, the coarse decoder and SAM's image encoder
run once and SAM's prompt and decoder side once per switch set (``PromptRIS.segment_batch``). A
split whose expressions all lie in another requested split (``synthetic:test_seen`` in
``synthetic:test``) is scored from that split's predictions, not run again.

Every expression becomes one record (:mod:`prompt_ris.metrics`) of intersection / union counts
in its image's original frame. Records are gathered across processes with
``accelerate.utils.gather_object`` and deduplicated by (split, ref_id, sent_id), so the result
is the same on 1 and N processes. :class:`EvaluationResults` holds the metrics, the records and
the overlays, writes ``results.json`` / ``results.md`` / ``records.jsonl`` / ``masks.jsonl`` into
a folder that keeps the splits of earlier evaluations (:mod:`prompt_ris.engine.results_folder`),
and makes its tables with :mod:`prompt_ris.engine.tables`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, send_to_device
from tqdm.auto import tqdm

from prompt_ris.config import Config
from prompt_ris.data.batch import Batch
from prompt_ris.data.loader import build_eval_loader
from prompt_ris.data.rle import encode_rle
from prompt_ris.data.splits import load_split, parse_split
from prompt_ris.engine.baseline import (
    dataset_expressions,
    expression_identity,
    random_object_baseline,
    referred_objects,
)
from prompt_ris.engine.results_folder import (
    MASKS_NAME,
    OVERLAYS_NAME,
    RECORDS_NAME,
    RESULTS_NAME,
    TABLES_NAME,
    merged,
    replace_file,
    safe_name,
    start_outputs,
)
from prompt_ris.engine.tables import format_results
from prompt_ris.metrics import (
    DEFAULT_THRESHOLD,
    deduplicate,
    intersection_union,
    score_output,
    summarize,
    threshold_logit,
)
from prompt_ris.models import PromptRIS
from prompt_ris.prompt_switches import PromptSwitches, parse_switch_sets

logger = logging.getLogger(__name__)

OUTPUTS = ("coarse", "final")  # scored model outputs: S_C (CLIP) and S' (SAM)
RECORD_IDS = ("split", "ref_id", "sent_id", "image_id")  # the keys of a masks.jsonl line


@dataclass
class ModelPasses:
    """Expressions run through the model by this process: ``encoded`` through CLIP, the coarse
    decoder and SAM's image encoder; ``decoded`` through SAM's prompt and decoder side (once
    per switch set)."""

    encoded: int = 0
    decoded: int = 0


# --------------------------------------------------------------------------------------------
# One loader
# --------------------------------------------------------------------------------------------
def score_batch(
    coarse: list[torch.Tensor] | None,
    final: list[torch.Tensor] | None,
    batch: Batch,
    split: str,
    threshold: float = DEFAULT_THRESHOLD,
    keep_masks: bool = False,
) -> list[dict[str, Any]]:
    """Per-expression records of one batch (I/U of each output against ``gt_masks_orig``).

    Args:
        coarse: B (H, W) coarse logits at the original size, or None.
        final: B (H, W) final logits at the original size, or None.
        batch: the batch the logits belong to (identities and ``gt_masks_orig``).
        split: split name stored in each record (e.g. ``refcoco:val``).
        threshold: probability threshold (foreground is strictly above it).
        keep_masks: store each thresholded mask as COCO RLE under ``<output>_rle``.
    """
    if batch.gt_masks_orig is None:
        raise ValueError("the batch has no original-size masks; build the loader with_orig_masks")
    logits = {name: maps for name, maps in (("coarse", coarse), ("final", final)) if maps}
    records = []
    for k, gt in enumerate(batch.gt_masks_orig):
        record = expression_identity(batch, k, split)
        for output, masks in logits.items():
            inter, union = intersection_union(masks[k], gt, threshold)
            score_output(record, output, inter, union)
            if keep_masks:  # the same rule as the counts: logits > logit(threshold)
                fg = masks[k].detach().float().cpu().numpy() > threshold_logit(threshold)
                record[f"{output}_rle"] = encode_rle(fg)
        records.append(record)
    return records


def score_loader(
    model: torch.nn.Module,
    loader: Iterable[Batch],
    accelerator: Accelerator,
    split: str,
    switch_sets: Sequence[PromptSwitches],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    keep_masks: bool = False,
    passes: ModelPasses | None = None,
) -> list[list[dict[str, Any]]]:
    """Records of every expression of a loader, one list per switch set.

    Runs in eval mode (argmax point, no prompt dropout) under ``no_grad`` and the accelerator's
    autocast; the model's mode is restored afterwards. Records from all processes are gathered
    and deduplicated, so every process returns the same, complete lists.

    Args:
        model: PromptRIS, possibly wrapped by ``accelerator.prepare``.
        loader: evaluation loader (``with_orig_masks=True``), sharded or not.
        accelerator: the run's Accelerator.
        split: split name stored in the records.
        switch_sets: the prompt switch sets; empty: the coarse mask only, without SAM (stage 1).
        threshold: probability threshold of a foreground pixel.
        keep_masks: keep RLE masks in the records.
        passes: counts of the model passes, added to.

    Returns:
        For each switch set, records with the coarse and final scores sorted by (split, ref_id,
        sent_id); with no switch set, one list with the coarse scores only.
    """
    unwrapped: PromptRIS = accelerator.unwrap_model(model)
    per_set: list[list[dict[str, Any]]] = [[] for _ in switch_sets or [None]]
    progress = tqdm(loader, desc=f"eval {split}", disable=not accelerator.is_local_main_process)
    for batch in progress:
        batch = send_to_device(batch, accelerator.device)
        with accelerator.autocast():
            frames = unwrapped.segment_batch(
                batch, batch.input_sizes, batch.orig_sizes, list(switch_sets)
            )
        if passes is not None:
            passes.encoded += batch.num_expressions
            passes.decoded += batch.num_expressions * len(switch_sets)
        coarse = score_batch(frames.coarse, None, batch, split, threshold, keep_masks)
        if not switch_sets:
            per_set[0].extend(coarse)
        for records, maps in zip(per_set, frames.final.values()):
            finals = score_batch(None, maps, batch, split, threshold, keep_masks)
            records.extend({**c, **f} for c, f in zip(coarse, finals))
    return [deduplicate(gather_object(records)) for records in per_set]


def summarize_outputs(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{output: metrics}`` for each output the records score (coarse, final, random)."""
    outputs = [o for o in (*OUTPUTS, "random") if f"{o}_intersection" in records[0]]
    return {output: summarize(records, output) for output in outputs}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass
class EvaluationResults:
    """Metrics per switch set, split and output; records; overlays.

    Attributes:
        switch_sets: the prompt switch sets, the main one first.
        metrics: ``{switch set name: {split: {output: metrics}}}``; the main set's splits also
            hold ``random`` (the baseline); outputs are ``coarse``, ``final`` and ``random``.
        records: ``{split: records}`` of the main switch set (with the baseline's scores).
        overlays: ``{split: overlay image paths}`` (when asked for).
        passes: the model passes this process ran.
        checkpoint: the evaluated checkpoint, when given by path.
        settings: the evaluation settings (``Config.eval`` as a dict).
        complete: every split is in.
    """

    switch_sets: list[PromptSwitches]
    metrics: dict[str, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    overlays: dict[str, list[Path]] = field(default_factory=dict)
    passes: ModelPasses = field(default_factory=ModelPasses)
    checkpoint: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    complete: bool = False

    @property
    def switches(self) -> PromptSwitches:
        """The main switch set."""
        return self.switch_sets[0]

    @property
    def splits(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{split: {output: metrics}}`` of the main switch set."""
        return self.metrics.get(self.switches.name, {})

    def ablation(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{switch set name: {split: final metrics}}`` (Table 5 when the sets are
        ``switches.ablation()``)."""
        return {
            name: {split: outputs["final"] for split, outputs in splits.items()}
            for name, splits in self.metrics.items()
        }

    def by_group(
        self, split: str, group_of: Callable[[dict[str, Any]], Any], outputs: Sequence[str]
    ) -> dict[Any, dict[str, dict[str, float]]]:
        """Metrics of ``split`` per group of expressions (e.g. by expression form, with
        ``group_of = lambda r: form(r["text"])``): ``{group: {output: metrics}}``."""
        groups: dict[Any, list[dict[str, Any]]] = {}
        for record in self.records[split]:
            groups.setdefault(group_of(record), []).append(record)
        return {g: {o: summarize(rows, o) for o in outputs} for g, rows in groups.items()}

    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` schema (that of ``evaluation/paper_results.json``)."""
        out: dict[str, Any] = {
            "checkpoint": self.checkpoint,
            "switches": self.switches.name,
            "eval": self.settings,
            "complete": self.complete,
            "splits": self.splits,
        }
        if len(self.switch_sets) > 1:
            out["ablation"] = self.ablation()
        return out

    def table(self) -> str:
        """Markdown: the split tables, then the switch-set table when there are several."""
        return format_results(self.to_dict())

    def save(self, out_dir: str | Path, save_masks: bool = False) -> None:
        """Write ``results.json``, ``results.md``, ``records.jsonl`` and (``save_masks``)
        ``masks.jsonl`` (COCO RLE) into ``out_dir``, keeping the splits of earlier evaluations
        there that these results do not hold (:mod:`prompt_ris.engine.results_folder`)."""
        out_dir = Path(out_dir)
        drawn_here = [  # splits whose overlays evaluate() drew into this folder: kept
            split
            for split, paths in self.overlays.items()
            if paths and _same_folder(paths[0].parent, out_dir / OVERLAYS_NAME / safe_name(split))
        ]
        earlier = start_outputs(out_dir, list(self.records), save_masks, drawn_here)
        for records in self.records.values():
            append_records(out_dir, records, save_masks)
        write_results(out_dir, self, earlier)


def _same_folder(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def append_records(out_dir: Path, records: list[dict[str, Any]], save_masks: bool) -> None:
    """One split's records.jsonl lines (and masks.jsonl lines, COCO RLE)."""
    with open(out_dir / RECORDS_NAME, "a") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if not k.endswith("_rle")}) + "\n")
    if save_masks:
        with open(out_dir / MASKS_NAME, "a") as f:
            for r in records:
                masks = {k: v for k, v in r.items() if k.endswith("_rle")}
                f.write(json.dumps({**{k: r[k] for k in RECORD_IDS}, **masks}) + "\n")


def write_results(
    out_dir: Path, results: EvaluationResults, earlier: dict[str, Any] | None = None
) -> None:
    """results.json and results.md as they stand, merged with the ``earlier`` results of the
    folder (``results_folder.start_outputs``), each replaced atomically."""
    data = merged(earlier, results.to_dict())
    replace_file(out_dir / RESULTS_NAME, json.dumps(data, indent=2) + "\n")
    replace_file(out_dir / TABLES_NAME, format_results(data) + "\n")


def save_overlays(
    records: list[dict[str, Any]],
    dataset: Any,
    out_dir: Path,
    count: int,
    order: str,
    model: PromptRIS,
    switches: PromptSwitches,
) -> list[Path]:
    """The method's picture (``method_picture``: image | coarse mask with the point | final
    mask | ground truth) for ``count`` expressions of one split: the first ones (ref_id,
    sent_id order) or the worst by final IoU. The final mask is the one scored; the coarse
    heat map and the point are predicted again for the picture."""
    from prompt_ris.data.rle import decode_rle
    from prompt_ris.data.transforms import load_image
    from prompt_ris.method_picture import method_picture

    chosen = sorted(records, key=lambda r: r["final_iou"]) if order == "worst" else records
    rows = {int(ref): row for row, ref in enumerate(dataset.table["ref_id"][:])}
    paths = []
    for rank, record in enumerate(chosen[:count]):
        ref = dataset.table[rows[record["ref_id"]]]
        image = np.asarray(
            load_image(dataset.image_path(ref), (int(ref["height"]), int(ref["width"])))
        )  # (H, W, 3)
        gt = decode_rle({"size": ref["mask_size"], "counts": ref["mask_counts"]})
        coarse = model.predict(
            image, record["text"], switches=switches, return_coarse=True, return_probs=True
        )
        canvas = method_picture(
            image, record["text"], decode_rle(record["final_rle"]), coarse.coarse_probs[0],
            coarse.points[0], gt,
        )  # fmt: skip
        paths.append(out_dir / f"{rank:03d}_ref{record['ref_id']}_sent{record['sent_id']}.png")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        canvas.save(paths[-1])
    return paths


# --------------------------------------------------------------------------------------------
# Named splits
# --------------------------------------------------------------------------------------------
def _expression_keys(dataset: Any) -> set[tuple[Any, ...]]:
    """(ref_id, sent_id, image_id, text) of every expression of an evaluation dataset."""
    return {
        (e["ref_id"], e["sent_id"], e["image_id"], e["text"]) for e in dataset_expressions(dataset)
    }


def _containing_split(
    split: str, keys: dict[str, set[tuple[Any, ...]]], order: Sequence[str]
) -> str | None:
    """The largest split of ``order`` that holds every expression of ``split`` (of two equal
    ones, the earlier holds the later); None when no other split does."""
    best = None
    for other in order:
        if other == split or not keys[split] <= keys[other]:
            continue
        if keys[other] == keys[split] and order.index(other) > order.index(split):
            continue
        if best is None or len(keys[other]) > len(keys[best]):
            best = other
    return best


def _baseline(
    cfg: Config, split: str, dataset: Any
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The random-object baseline's metrics and records of a split (no model, no images: every
    process computes it and gets the same result)."""
    spec = parse_split(split)
    candidates: Any = ()
    if spec.categories is not None:  # test_unseen: the image's other objects count too
        whole = dataclasses.replace(spec, categories=None).name
        candidates = referred_objects(load_split(cfg.data.prepared, whole))
    return random_object_baseline(
        dataset_expressions(dataset), split, cfg.eval.baseline_seed, candidates
    )


def _with_random(record: dict[str, Any], drawn: dict[str, Any]) -> dict[str, Any]:
    """A record with the baseline's scores of the same expression added."""
    return {**record, **{k: v for k, v in drawn.items() if k.startswith("random_")}}


def evaluate(
    model_or_checkpoint: PromptRIS | str | Path,
    splits: Sequence[str] | str,
    switch_sets: Sequence[PromptSwitches | str] | None = None,
    *,
    config: Config | None = None,
    accelerator: Accelerator | None = None,
    overlay_dir: str | Path | None = None,
    on_split: Callable[[str, EvaluationResults], None] | None = None,
) -> EvaluationResults:
    """Score a model on named splits, for one or more prompt switch sets.

    Args:
        model_or_checkpoint: a PromptRIS, or a checkpoint folder (``PromptRIS.from_pretrained``).
        splits: split names (``"refcoco:val"``), a list or comma-separated.
        switch_sets: prompt switch sets (or names like ``"mask + text"``), the main one first;
            default: the model's own (``model.prompts.switches``).
        config: data and evaluation settings (``data``, ``eval``); default: the model's own
            config. Its model section is replaced by the model's.
        accelerator: default: one process, on CUDA when available.
        overlay_dir: where ``eval.num_overlays`` overlay images per split go (``<split>/``).
        on_split: called with each split's name and the results so far, once it is scored.

    Returns:
        The :class:`EvaluationResults`, the same on every process.
    """
    if isinstance(model_or_checkpoint, PromptRIS):
        model, checkpoint = model_or_checkpoint, None
    else:
        model = PromptRIS.from_pretrained(model_or_checkpoint)
        checkpoint = str(model_or_checkpoint)
    if config is None and model.config is None:
        raise ValueError("this model has no config; pass config=load_config(...) to evaluate")
    cfg = dataclasses.replace(config or model.config)
    if model.config is not None:
        cfg.model = model.config.model  # the data frames follow the model's own config
    if isinstance(splits, str):
        splits = [s.strip() for s in splits.split(",") if s.strip()]
    sets = parse_switch_sets(switch_sets or [model.default_switches])
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    model.to(accelerator.device)
    was_training = model.training
    model.eval()
    ev = cfg.eval
    keep_masks = ev.save_masks or ev.num_overlays > 0
    results = EvaluationResults(
        switch_sets=sets, checkpoint=checkpoint, settings=dataclasses.asdict(ev)
    )
    loaders = {
        split: build_eval_loader(
            cfg, split, num_replicas=accelerator.num_processes,
            rank=accelerator.process_index, limit=ev.max_expressions,
        )  # fmt: skip
        for split in dict.fromkeys(splits)
    }
    order = list(loaders)
    keys = {split: _expression_keys(loader.dataset) for split, loader in loaders.items()}
    source = {split: _containing_split(split, keys, order) for split in order}
    scored: dict[str, list[list[dict[str, Any]]]] = {}

    def score(split: str) -> list[list[dict[str, Any]]]:
        """The split's records per switch set, run through the model only when no larger
        split holds them."""
        if split in scored:
            return scored[split]
        if source[split] is None:
            scored[split] = score_loader(
                model, loaders[split], accelerator, split, sets, threshold=ev.threshold,
                keep_masks=keep_masks, passes=results.passes,
            )  # fmt: skip
        else:  # every expression of this split is scored with the larger split
            wanted = {k[:2] for k in keys[split]}
            scored[split] = [
                [{**r, "split": split} for r in records if (r["ref_id"], r["sent_id"]) in wanted]
                for records in score(source[split])
            ]
        return scored[split]

    for split in order:
        for switches, records in zip(sets, score(split)):
            results.metrics.setdefault(switches.name, {})[split] = summarize_outputs(records)
        records = score(split)[0]
        if ev.random_baseline:
            base, base_records = _baseline(cfg, split, loaders[split].dataset)
            results.metrics[sets[0].name][split]["random"] = base
            drawn = {(r["ref_id"], r["sent_id"]): r for r in base_records}
            records = [_with_random(r, drawn[r["ref_id"], r["sent_id"]]) for r in records]
        results.records[split] = records
        if overlay_dir is not None and ev.num_overlays > 0 and accelerator.is_main_process:
            folder = Path(overlay_dir) / safe_name(split)
            results.overlays[split] = save_overlays(
                records, loaders[split].dataset, folder, ev.num_overlays, ev.overlay_order,
                model, sets[0],
            )  # fmt: skip
        logger.info(
            "%s: %s", split,
            {o: round(m["mIoU"], 2) for o, m in results.metrics[sets[0].name][split].items()},
        )  # fmt: skip
        if on_split is not None:
            on_split(split, results)
    model.train(was_training)
    results.complete = True
    return results
