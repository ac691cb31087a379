"""An evaluation's output folder, shared by runs: results merged by split, none lost.

A folder holds ``results.json`` and ``results.md`` (metrics), ``records.jsonl`` (one line per
expression), optionally ``masks.jsonl`` (COCO RLE) and ``overlays/<split>/``. A run into a folder
that already holds results replaces the splits it scores and keeps every other split: the newer
run's splits win, and what was kept is logged. Runs merge only when they score the same
checkpoint with the same main prompt switch set and the same scoring settings
(:data:`SCORING`); :func:`merge_problem` says, before anything is scored, when they would not.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
TABLES_NAME = "results.md"
RECORDS_NAME = "records.jsonl"
MASKS_NAME = "masks.jsonl"
OVERLAYS_NAME = "overlays"
# eval.* settings that change the numbers; runs that differ in them are not merged.
SCORING = ("threshold", "max_expressions", "random_baseline", "baseline_seed")


def safe_name(name: str) -> str:
    """A split name as a folder name."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def read_results(out_dir: str | Path) -> dict[str, Any] | None:
    """The ``results.json`` of ``out_dir``, or None when there is none.

    Raises:
        ValueError: the file is not a results file (one line naming it and the fix).
    """
    path = Path(out_dir) / RESULTS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        data, reason = None, f"not valid JSON ({err})"
    else:
        reason = "not an evaluation's results (no \"splits\" mapping)"
    if not isinstance(data, dict) or not isinstance(data.get("splits"), dict):
        raise ValueError(
            f"'{path}' is {reason}; move it away or choose another --output, so that no "
            "results are overwritten"
        )
    return data


def merge_problem(
    out_dir: str | Path, checkpoint: str | None, switches: str, settings: Mapping[str, Any]
) -> str | None:
    """Why a run cannot merge into ``out_dir`` (one line with the fix), or None.

    Args:
        out_dir: the output folder.
        checkpoint: the checkpoint the run scores.
        switches: the name of its main prompt switch set.
        settings: its ``eval`` settings.
    """
    try:
        earlier = read_results(out_dir)
    except ValueError as err:
        return str(err)
    if earlier is None:
        return None
    differences = []
    before = earlier.get("checkpoint")
    if before is not None and checkpoint is not None and not _same_path(before, checkpoint):
        differences.append(f"checkpoint '{before}' (this run: '{checkpoint}')")
    if earlier.get("switches", switches) != switches:
        differences.append(f"switches '{earlier['switches']}' (this run: '{switches}')")
    earlier_eval = earlier.get("eval") if isinstance(earlier.get("eval"), dict) else {}
    for key in SCORING:
        if key in earlier_eval and key in settings and earlier_eval[key] != settings[key]:
            differences.append(f"eval.{key}={earlier_eval[key]} (this run: {settings[key]})")
    if not differences:
        return None
    return (
        f"'{Path(out_dir) / RESULTS_NAME}' holds results of {', '.join(differences)}, which "
        "would mix with this run's; choose another --output (or move that folder away)"
    )


def start_outputs(
    out_dir: str | Path,
    splits: Collection[str],
    save_masks: bool,
    fresh_overlays: Collection[str] = (),
) -> dict[str, Any] | None:
    """Prepare ``out_dir`` for a run scoring ``splits``: drop their lines from records.jsonl and
    masks.jsonl and their overlays (except those of ``fresh_overlays``, the splits whose
    overlays this run has already drawn there), keep every other split's, and log what is kept.

    Returns:
        The earlier ``results.json`` (to pass to :func:`merged`), or None.
    """
    out_dir = Path(out_dir)
    earlier = read_results(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (RECORDS_NAME, MASKS_NAME):
        path = out_dir / name
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            replace_file(path, "".join(f"{x}\n" for x in lines if _split_of(x) not in splits))
        elif name == RECORDS_NAME or save_masks:
            path.touch()
    for split in set(splits) - set(fresh_overlays):
        shutil.rmtree(out_dir / OVERLAYS_NAME / safe_name(split), ignore_errors=True)
    if earlier is not None:
        kept = [s for s in earlier["splits"] if s not in splits]
        replaced = [s for s in earlier["splits"] if s in splits]
        if kept:
            logger.info("keeping the earlier results of %s in %s", ", ".join(kept), out_dir)
        if replaced:
            logger.info("replacing the earlier results of %s in %s", ", ".join(replaced), out_dir)
    return earlier


def merged(earlier: Mapping[str, Any] | None, current: Mapping[str, Any]) -> dict[str, Any]:
    """``current`` (a ``results.json`` dict) with the splits of ``earlier`` it does not score,
    earlier splits first; the same for the ``ablation`` table."""
    out = dict(current)
    if not earlier:
        return out
    new = current["splits"]
    out["splits"] = {**_without(earlier["splits"], new), **new}
    before, now = earlier.get("ablation") or {}, current.get("ablation") or {}
    ablation = {
        name: {**_without(before.get(name, {}), new), **now.get(name, {})}
        for name in dict.fromkeys([*now, *before])
    }
    ablation = {name: splits for name, splits in ablation.items() if splits}
    if ablation:
        out["ablation"] = ablation
    return out


def replace_file(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` at once (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _without(splits: Mapping[str, Any], new: Collection[str]) -> dict[str, Any]:
    return {split: value for split, value in splits.items() if split not in new}


def _split_of(line: str) -> str | None:
    try:
        return json.loads(line).get("split")
    except (json.JSONDecodeError, AttributeError):
        return None


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)
