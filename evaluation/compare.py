"""Print two evaluation result files side by side, with the differences.

Both files use the schema written by ``evaluation/evaluate.py`` (and ``paper_results.json``):
``{"splits": {split: {output: {metric: value}}}, "entries": {name: {"splits": ...}}}``, where
``output`` is ``coarse``, ``final`` or ``random`` and values are percentages. ``--a-entry`` /
``--b-entry`` pick a named entry instead of the top-level splits, e.g. the paper's prompt ablation
row ``table5/point+text`` or the seen/unseen model ``seen_unseen``. Give the reference first and
your results second: the differences are B - A, positive where yours are higher::

    python evaluation/compare.py evaluation/paper_results.json \
        checkpoints/refcoco_combined/eval/best/results.json
    python evaluation/compare.py evaluation/paper_results.json my_no_mask.json \
        --a-entry table5/point+text
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRIC_ORDER = (
    "oIoU",
    "mIoU",
    "P@0.5",
    "P@0.6",
    "P@0.7",
    "P@0.8",
    "P@0.9",
    "ImgAcc",
    "InstAcc",
)


def load_splits(path: str | Path, entry: str | None = None) -> dict[str, dict[str, dict]]:
    """``{split: {output: {metric: value}}}`` of a result file, or of one of its entries."""
    data = json.loads(Path(path).read_text())
    if entry is not None:
        entries = data.get("entries", {})
        if entry not in entries:
            raise SystemExit(
                f"{path} has no entry '{entry}'; available entries: {sorted(entries) or 'none'}"
            )
        data = entries[entry]
    if "splits" not in data:
        raise SystemExit(f"{path} has no 'splits'; is it a results file of evaluation/evaluate.py?")
    return data["splits"]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def compare_rows(
    a: dict[str, dict[str, dict]], b: dict[str, dict[str, dict]], metrics: list[str] | None = None
) -> list[tuple[str, str, str, float, float]]:
    """Rows (split, output, metric, A, B) for every numeric metric both sides report."""
    rows = []
    for split in [s for s in a if s in b]:
        for output in [o for o in a[split] if o in b[split]]:
            shared = [m for m in METRIC_ORDER if m in a[split][output] and m in b[split][output]]
            for metric in shared:
                if metrics is None or metric in metrics:
                    rows.append(
                        (split, output, metric, a[split][output][metric], b[split][output][metric])
                    )
    return rows


def format_comparison(
    rows: list[tuple[str, str, str, float, float]], name_a: str, name_b: str
) -> str:
    """Markdown table with one line per (split, output, metric) and the difference B - A."""
    lines = [
        f"| split | output | metric | A: {name_a} | B: {name_b} | B - A |",
        "|---|---|---|---:|---:|---:|",
    ]
    for split, output, metric, va, vb in rows:
        lines.append(
            f"| {split} | {output} | {metric} | {_cell(va)} | {_cell(vb)} | {vb - va:+.2f} |"
        )
    return "\n".join(lines)


def _only_in(x: dict[str, dict], y: dict[str, dict]) -> list[str]:
    return [f"{s}/{o}" for s in x for o in x[s] if s not in y or o not in y[s]]


def main(argv: list[str] | None = None) -> str:
    """Parse the arguments, print the comparison table and return it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="A, the reference (e.g. evaluation/paper_results.json)")
    parser.add_argument("b", help="B, your results.json; the tables show B - A")
    parser.add_argument("--a-entry", help="named entry of A (e.g. table5/point+text)")
    parser.add_argument("--b-entry", help="named entry of B")
    parser.add_argument("--metrics", help="comma-separated metrics to show (default: all shared)")
    args = parser.parse_args(argv)
    a, b = load_splits(args.a, args.a_entry), load_splits(args.b, args.b_entry)
    metrics = args.metrics.split(",") if args.metrics else None
    rows = compare_rows(a, b, metrics)
    name_a = Path(args.a).name + (f"[{args.a_entry}]" if args.a_entry else "")
    name_b = Path(args.b).name + (f"[{args.b_entry}]" if args.b_entry else "")
    text = format_comparison(rows, name_a, name_b) if rows else "no metric is reported by both"
    for name, x, y in ((name_a, a, b), (name_b, b, a)):
        only = _only_in(x, y)
        if only:
            text += f"\n\nonly in {name}: {', '.join(only)}"
    sys.stdout.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
