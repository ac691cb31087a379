"""Named splits: the paper's combined training set, seen/unseen categories, published counts.

Split names (``DataConfig.train`` / ``DataConfig.val`` / ``EvalConfig.splits``):

- ``<dataset>[@<splitBy>]:<split>[_seen|_unseen]``, e.g. ``refcoco:val``, ``refcoco+:testA``,
  ``refcocog:test`` (UMD), ``refcocog@google:val``, ``refcoco:val_unseen``,
  ``refcocog:train_seen``, ``synthetic:testB``. ``<split>`` follows the refer API (``test`` =
  testA and testB; ``testA`` includes ``testAB`` refs). Without ``@<splitBy>`` the usual one is
  taken: unc for refcoco/refcoco+/synthetic, umd for refcocog. ``refcocog_umd`` and
  ``refcocog_google`` are accepted as dataset names too.
- ``combined``: the paper's training set (Sec. 4.2): the train refs of RefCOCO (unc), RefCOCO+
  (unc) and G-Ref (umd), minus every image found in any val/test split of RefCOCO (unc),
  RefCOCO+ (unc), G-Ref (umd) or G-Ref (google) val. ``combined_seen`` keeps its seen refs.

Seen/unseen (Table 2, following CGFormer): the 48 seen / 17 unseen COCO categories of the
open-vocabulary detection split; refs of the 15 other categories are in neither. Refs are
filtered by ``category_id`` only; all sentences of a ref stay together. A dataset with categories
of its own carries its split as data: ``category_split.json`` (``{"seen": [ids], "unseen":
[ids]}``) beside its refs file, copied into the prepared source by ``prepare.py`` and read by
``category_split_of``; RefCOCO, RefCOCO+ and G-Ref fall back to the COCO split above.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from prompt_ris.data.prepare import open_prepared, source_name
from prompt_ris.data.refer import CATEGORY_SPLIT_FILE, DEFAULT_SPLIT_BY, REFER_SPLITS, split_matches

logger = logging.getLogger(__name__)

# COCO ids of the open-vocabulary detection split (Bansal et al. 2018); docs/design.md, "Data and
# splits".
COCO_SEEN: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 7: "train", 8: "truck", 9: "boat",
    15: "bench", 16: "bird", 19: "horse", 20: "sheep", 23: "bear", 24: "zebra", 25: "giraffe",
    27: "backpack", 31: "handbag", 33: "suitcase", 34: "frisbee", 35: "skis", 38: "kite",
    42: "surfboard", 44: "bottle", 48: "fork", 50: "spoon", 51: "bowl", 52: "banana",
    53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 59: "pizza",
    60: "donut", 62: "chair", 65: "bed", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse",
    75: "remote", 78: "microwave", 79: "oven", 80: "toaster", 82: "refrigerator", 84: "book",
    85: "clock", 86: "vase", 90: "toothbrush",
}  # fmt: skip
COCO_UNSEEN: dict[int, str] = {
    5: "airplane", 6: "bus", 17: "cat", 18: "dog", 21: "cow", 22: "elephant", 28: "umbrella",
    32: "tie", 36: "snowboard", 41: "skateboard", 47: "cup", 49: "knife", 61: "cake",
    63: "couch", 76: "keyboard", 81: "sink", 87: "scissors",
}  # fmt: skip
COCO_UNUSED: dict[int, str] = {  # in neither set: dropped from every seen/unseen split
    10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter",
    37: "sports ball", 39: "baseball bat", 40: "baseball glove", 43: "tennis racket",
    46: "wine glass", 58: "hot dog", 64: "potted plant", 67: "dining table", 77: "cell phone",
    88: "teddy bear", 89: "hair drier",
}  # fmt: skip

CategorySplit = tuple[frozenset[int], frozenset[int]]  # (seen, unseen) category ids
COCO_SPLIT: CategorySplit = (frozenset(COCO_SEEN), frozenset(COCO_UNSEEN))
COCO_DATASETS = frozenset(DEFAULT_SPLIT_BY)  # refcoco, refcoco+, refcocog: COCO's categories
# splitBy taken when a split name gives none; "synthetic" is the generated demo data (unc).
SPLIT_BY_DEFAULTS = {**DEFAULT_SPLIT_BY, "synthetic": "unc"}
DATASET_ALIASES = {
    "refcocog_umd": ("refcocog", "umd"),
    "refcocog_google": ("refcocog", "google"),
    "refcocog_u": ("refcocog", "umd"),
    "refcocog_g": ("refcocog", "google"),
}

COMBINED = "combined"
PAPER_TRAIN_SOURCES = (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"))
PAPER_HELDOUT_SPLITS: dict[tuple[str, str], tuple[str, ...]] = {  # images removed from training
    ("refcoco", "unc"): ("val", "testA", "testB"),
    ("refcoco+", "unc"): ("val", "testA", "testB"),
    ("refcocog", "umd"): ("val", "test"),
    ("refcocog", "google"): ("val",),
}

# (refs, images, sentences) per split (docs/design.md, "Data and splits"). Refs are the dataset
# lengths public RIS code uses; images and sentences are the commonly reported numbers.
PUBLISHED_COUNTS: dict[tuple[str, str], dict[str, tuple[int, int, int]]] = {
    ("refcoco", "unc"): {
        "train": (42404, 16994, 120624),
        "val": (3811, 1500, 10834),
        "testA": (1975, 750, 5657),
        "testB": (1810, 750, 5095),
    },
    ("refcoco+", "unc"): {
        "train": (42278, 16992, 120191),
        "val": (3805, 1500, 10758),
        "testA": (1975, 750, 5726),
        "testB": (1798, 750, 4889),
    },
    ("refcocog", "umd"): {
        "train": (42226, 21899, 80512),
        "val": (2573, 1300, 4896),
        "test": (5023, 2600, 9602),
    },
    ("refcocog", "google"): {"train": (44822, 24698, 85474), "val": (5000, 4650, 9536)},
}
# Refs per seen/unseen split as CGFormer publishes them (its open-vocabulary dataset lengths).
PUBLISHED_SEEN_UNSEEN_REFS: dict[tuple[str, str], dict[str, int]] = {
    ("refcoco", "unc"): {
        "train_seen": 35473,
        "val_seen": 3175,
        "val_unseen": 445,
        "test_seen": 3200,
        "test_unseen": 394,
    },
    ("refcoco+", "unc"): {
        "train_seen": 35375,
        "val_seen": 3171,
        "val_unseen": 444,
        "test_seen": 3189,
        "test_unseen": 394,
    },
    ("refcocog", "umd"): {
        "train_seen": 33093,
        "val_seen": 2000,
        "val_unseen": 386,
        "test_seen": 3935,
        "test_unseen": 759,
    },
    ("refcocog", "google"): {"train_seen": 35105, "val_seen": 3923, "val_unseen": 760},
}


@dataclass(frozen=True)
class SplitSpec:
    """A parsed split name. ``dataset == "combined"`` for the paper's training set."""

    dataset: str
    split_by: str
    split: str  # refer split: train, val, test, testA, testB, ...
    categories: str | None = None  # None (all), "seen" or "unseen"

    @property
    def is_combined(self) -> bool:
        return self.dataset == COMBINED

    @property
    def name(self) -> str:
        """Canonical name: ``refcoco:val``, ``refcocog_google:val_unseen``, ``mine@x:train``."""
        suffix = f"_{self.categories}" if self.categories else ""
        if self.is_combined:
            return COMBINED + suffix
        source = f"{self.dataset}@{self.split_by}"
        if SPLIT_BY_DEFAULTS.get(self.dataset) == self.split_by:
            source = self.dataset
        elif (self.dataset, self.split_by) == ("refcocog", "google"):
            source = "refcocog_google"
        return f"{source}:{self.split}{suffix}"


def parse_split(name: str) -> SplitSpec:
    """Parse a split name (see the module docstring); raises ValueError with the valid forms."""
    name = name.strip()
    if name in (COMBINED, f"{COMBINED}_seen"):
        return SplitSpec(COMBINED, "", "train", "seen" if name.endswith("_seen") else None)
    form = (
        "use '<dataset>[@<splitBy>]:<split>[_seen|_unseen]' (e.g. 'refcoco:val', "
        "'refcocog@google:val', 'refcoco+:test_unseen') or 'combined' / 'combined_seen'"
    )
    if name.count(":") != 1:
        raise ValueError(f"split name '{name}' is malformed; {form}")
    source, split = name.split(":")
    categories = None
    for suffix in ("_seen", "_unseen"):
        if split.endswith(suffix):
            split, categories = split[: -len(suffix)], suffix[1:]
    if split not in REFER_SPLITS:
        raise ValueError(f"split '{split}' in '{name}' is not a refer split {REFER_SPLITS}; {form}")
    if "@" in source:
        dataset, split_by = source.split("@", 1)
    elif source in DATASET_ALIASES:
        dataset, split_by = DATASET_ALIASES[source]
    elif source in SPLIT_BY_DEFAULTS:
        dataset, split_by = source, SPLIT_BY_DEFAULTS[source]
    else:
        raise ValueError(
            f"dataset '{source}' in '{name}' has no default splitBy; write it as "
            f"'{source}@<splitBy>:{split}' (known: {sorted(SPLIT_BY_DEFAULTS)})"
        )
    return SplitSpec(dataset, split_by, split, categories)


def category_split_of(prepared_dir: str | Path, dataset: str, split_by: str) -> CategorySplit:
    """The (seen, unseen) category ids of a prepared source: its ``category_split.json`` when it
    has one, else the COCO split for RefCOCO, RefCOCO+ and G-Ref.

    Raises:
        ValueError: the source has neither; the message names the file to write.
    """
    path = Path(prepared_dir) / source_name(dataset, split_by) / CATEGORY_SPLIT_FILE
    if path.is_file():
        return read_category_split(path)
    if dataset in COCO_DATASETS:
        return COCO_SPLIT
    raise ValueError(
        f"no seen/unseen category split for dataset '{dataset}': '{path}' does not exist; "
        f'put {{"seen": [category ids], "unseen": [category ids]}} in '
        f"<data root>/{dataset}/{CATEGORY_SPLIT_FILE} and prepare the data again "
        "(scripts/make_synthetic.py writes it for the synthetic data)"
    )


def read_category_split(path: str | Path) -> CategorySplit:
    """(seen, unseen) category ids from a ``category_split.json``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    parts = [data.get(key) if isinstance(data, dict) else None for key in ("seen", "unseen")]
    if not all(isinstance(p, list) and all(type(i) is int for i in p) for p in parts):
        raise ValueError(
            f"'{path}' is not a category split; write it as "
            f'{{"seen": [category ids], "unseen": [category ids]}} (integers)'
        )
    return frozenset(parts[0]), frozenset(parts[1])


def select_refs(
    ref_splits: Sequence[str],
    category_ids: Sequence[int],
    split: str,
    categories: str | None = None,
    category_split: CategorySplit = COCO_SPLIT,
) -> np.ndarray:
    """Row indices of the refs in ``split`` (refer semantics), optionally seen/unseen only.

    Args:
        ref_splits: the raw ``split`` field of every ref.
        category_ids: the category id of every ref.
        split: refer split name.
        categories: None, "seen" or "unseen".
        category_split: (seen, unseen) category ids (``category_split_of``).

    Returns:
        (N,) int64 indices in ascending order.
    """
    keep = np.array([split_matches(s, split) for s in ref_splits], dtype=bool)
    if categories is not None:
        seen, unseen = category_split
        allowed = seen if categories == "seen" else unseen
        keep &= np.isin(np.asarray(category_ids, dtype=np.int64), list(allowed))
    return np.flatnonzero(keep)


def heldout_image_ids(
    sources: dict[tuple[str, str], tuple[Sequence[str], Sequence[int]]],
) -> set[int]:
    """Image ids that appear in any held-out (val/test) split of ``PAPER_HELDOUT_SPLITS``.

    Args:
        sources: (dataset, split_by) -> (ref splits, ref image ids) for every held-out source.
    """
    ids: set[int] = set()
    for key, splits in PAPER_HELDOUT_SPLITS.items():
        if key not in sources:
            raise KeyError(f"{key[0]}({key[1]}) is needed to remove its {splits} images")
        ref_splits, image_ids = sources[key]
        for split in splits:
            ids.update(int(image_ids[i]) for i in select_refs(ref_splits, [], split))
    return ids


def combined_train_rows(
    sources: dict[tuple[str, str], tuple[Sequence[str], Sequence[int], Sequence[int]]],
    categories: str | None = None,
) -> dict[tuple[str, str], np.ndarray]:
    """The paper's combined training set, as row indices per training source.

    Args:
        sources: (dataset, split_by) -> (ref splits, image ids, category ids), for the three
            training sources and every held-out source (``PAPER_HELDOUT_SPLITS``).
        categories: None, or "seen" for ``combined_seen``.

    Returns:
        (dataset, split_by) -> ascending row indices of its kept train refs.
    """
    removed = heldout_image_ids({k: (v[0], v[1]) for k, v in sources.items()})
    rows = {}
    for key in PAPER_TRAIN_SOURCES:
        ref_splits, image_ids, category_ids = sources[key]
        train = select_refs(ref_splits, category_ids, "train", categories)
        image_ids = np.asarray(image_ids, dtype=np.int64)
        rows[key] = train[~np.isin(image_ids[train], list(removed))]
        logger.info(
            "combined: %s(%s) keeps %d of %d train refs", key[0], key[1], len(rows[key]), len(train)
        )
    return rows


def load_split(prepared_dir: str | Path, name: str) -> datasets.Dataset:
    """Open a named split from the prepared data: one row per reference.

    Args:
        prepared_dir: ``DataConfig.prepared``.
        name: a split name (module docstring).

    Returns:
        The refs of the split (rows of one or more prepared sources, memory-mapped).
    """
    spec = parse_split(name)
    if spec.is_combined:
        needed = list(dict.fromkeys([*PAPER_TRAIN_SOURCES, *PAPER_HELDOUT_SPLITS]))
        tables = {key: open_prepared(prepared_dir, *key) for key in needed}
        columns = {
            key: (t["split"][:], t["image_id"][:], t["category_id"][:]) for key, t in tables.items()
        }
        rows = combined_train_rows(columns, spec.categories)
        if not any(len(r) for r in rows.values()):
            raise ValueError(
                f"split '{name}' is empty: no train ref of {PAPER_TRAIN_SOURCES} in "
                f"'{prepared_dir}' is left once the held-out images are removed; prepare the "
                "complete datasets with scripts/prepare_data.py (README.md, section 'Data')"
            )
        parts = [tables[key].select(rows[key]) for key in PAPER_TRAIN_SOURCES]
        return datasets.concatenate_datasets(parts)
    table = open_prepared(prepared_dir, spec.dataset, spec.split_by)
    category_split = COCO_SPLIT
    if spec.categories is not None:
        category_split = category_split_of(prepared_dir, spec.dataset, spec.split_by)
    rows = select_refs(
        table["split"][:], table["category_id"][:], spec.split, spec.categories, category_split
    )
    if len(rows) == 0:
        raise ValueError(empty_split_message(name, prepared_dir, table["split"][:]))
    return table.select(rows)


def empty_split_message(name: str, prepared_dir: str | Path, ref_splits: Sequence[str]) -> str:
    """One line: the split has no refs, which splits its source holds, and the fix."""
    spec = parse_split(name)
    held = sorted(set(ref_splits))
    what = f" of {spec.categories} categories" if spec.categories else ""
    return (
        f"split '{name}' is empty: {spec.dataset}({spec.split_by}) in '{prepared_dir}' has no "
        f"'{spec.split}' refs{what} (it holds {', '.join(held)}); name one of those, or prepare "
        f"the {spec.split} refs again with scripts/prepare_data.py (its manifest.json lists "
        "what was left out)"
    )


def count_refs(
    image_ids: Sequence[int], num_sentences: Sequence[int], rows: np.ndarray
) -> tuple[int, int, int]:
    """(refs, distinct images, sentences) of the refs at ``rows``."""
    image_ids = np.asarray(image_ids)
    num_sentences = np.asarray(num_sentences)
    return len(rows), len(set(image_ids[rows].tolist())), int(num_sentences[rows].sum())
