"""Markdown tables of evaluation results, in the layouts of the paper's tables.

Every table of ``results.md``, of ``evaluation/evaluate.py``'s output and of the demo's
``demo_results.md`` is made here from plain metric dicts (``{split: {output: metrics}}`` and
``{switch set name: {split: metrics}}``, as :class:`~prompt_ris.engine.evaluation.EvaluationResults`
holds them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prompt_ris.metrics import P_THRESHOLDS, summarize

OUTPUT_NAMES = {"coarse": "coarse (CLIP)", "final": "final (SAM)", "random": "random object"}
PROMPTS_HEADER = "prompts to SAM"

Metrics = Mapping[str, float]


def _cells(m: Metrics, keys: Sequence[str]) -> str:
    return " | ".join(f"{m[k]:.2f}" for k in keys)


def format_tables(splits: Mapping[str, Mapping[str, Metrics]]) -> str:
    """oIoU / mIoU by split (Tables 1-2 layout), then P@X etc. by split and output (Tables 3-5)."""
    detail_metrics = (*(f"P@{x}" for x in P_THRESHOLDS), "oIoU", "mIoU", "ImgAcc", "InstAcc")
    names = list(splits)
    outputs = [o for o in OUTPUT_NAMES if any(o in splits[s] for s in names)]
    lines = ["| metric | output | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for metric in ("oIoU", "mIoU"):
        for output in outputs:
            cells = [
                f"{splits[s][output][metric]:.2f}" if output in splits[s] else "-" for s in names
            ]
            lines.append(f"| {metric} | {OUTPUT_NAMES[output]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| split | output | " + " | ".join(detail_metrics) + " | expressions |",
        "|---|---|" + "---:|" * (len(detail_metrics) + 1),
    ]
    for split in names:
        for output in [o for o in outputs if o in splits[split]]:
            m = splits[split][output]
            cells = [f"{m[k]:.2f}" for k in detail_metrics] + [str(m["num_expressions"])]
            lines.append(f"| {split} | {OUTPUT_NAMES[output]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_ablation(ablation: Mapping[str, Mapping[str, Metrics]]) -> str:
    """The final mask per prompt switch set and split, in the layout of the paper's Table 5."""
    keys = ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9")
    lines = [
        f"| {PROMPTS_HEADER} | split | " + " | ".join(keys) + " |",
        "|---|---|" + "---:|" * len(keys),
    ]
    for name, splits in ablation.items():
        for split, m in splits.items():
            lines.append(f"| {name} | {split} | {_cells(m, keys)} |")
    return "\n".join(lines)


def format_results(results: Mapping[str, Any]) -> str:
    """results.md: the split tables, then the switch-set table when there are several sets."""
    tables = format_tables(results["splits"])
    if "ablation" in results:
        tables += "\n\n" + format_ablation(results["ablation"])
    return tables


def split_table(
    splits: Mapping[str, Mapping[str, Metrics]], output_names: Mapping[str, str]
) -> str:
    """One row per split and output (``output_names``: output -> label, in row order)."""
    keys = ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9")
    rows = [
        "| split | output | " + " | ".join(keys) + " | expressions |",
        "|---|---|" + "---:|" * (len(keys) + 1),
    ]
    for split, outputs in splits.items():
        for key, label in output_names.items():
            m = outputs[key]
            rows.append(f"| {split} | {label} | {_cells(m, keys)} | {m['num_expressions']} |")
    return "\n".join(rows)


def switch_table(
    ablation: Mapping[str, Mapping[str, Metrics]],
    split: str,
    reference: tuple[str, Mapping[str, float]] | None = None,
) -> str:
    """The final mask of one split per prompt switch set (Table 5 on one split), in the order of
    ``ablation``; ``reference`` = (column name, {switch set name: value}) adds a column ("-"
    where it has no value), e.g. the paper's mIoU."""
    keys = ("oIoU", "mIoU", "P@0.5", "P@0.9")
    extra = [reference[0]] if reference else []
    rows = [
        f"| {PROMPTS_HEADER} | " + " | ".join([*keys, *extra]) + " |",
        "|---" + "|---:" * (len(keys) + len(extra)) + "|",
    ]
    for name, splits in ablation.items():
        cells = [_cells(splits[split], keys)]
        if reference:
            value = reference[1].get(name)
            cells.append("-" if value is None else f"{value:.2f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def group_table(
    records: Sequence[dict[str, Any]],
    group_of: Callable[[dict[str, Any]], str],
    groups: Mapping[str, str],
    outputs: Sequence[str],
    header: str = "expression form",
) -> str:
    """mIoU per group of expressions (``group_of(record)``; ``groups``: group -> example), for
    each output; groups with no expression are left out."""
    rows = [
        f"| {header} | example | expressions | " + " | ".join(f"{o} mIoU" for o in outputs) + " |",
        "|---|---|---:|" + "---:|" * len(outputs),
    ]
    for group, example in groups.items():
        members = [r for r in records if group_of(r) == group]
        if members:
            cells = " | ".join(f"{summarize(members, o)['mIoU']:.2f}" for o in outputs)
            rows.append(f"| {group} | {example} | {len(members)} | {cells} |")
    return "\n".join(rows)
