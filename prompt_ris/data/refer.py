"""Reader for the refer-format datasets (RefCOCO, RefCOCO+, RefCOCOg) as users download them.

Layout (lichengunc/refer): ``<root>/<dataset>/refs(<splitBy>).p`` (a pickled list of refs) and
``<root>/<dataset>/instances.json`` (COCO ``images``, ``annotations``, ``categories``); the images
are COCO train2014 under ``<root>/images/mscoco/images/train2014/`` unless another folder is given.

A ref is ``{ref_id, ann_id, image_id, category_id, split, sent_ids, sentences, file_name}``, each
sentence ``{sent, raw, tokens, sent_id}``. The image file name comes from ``instances.json``
(``ref['file_name']`` carries an annotation suffix). Masks come from the COCO annotation of
``ann_id`` through pycocotools; polygon parts are united (a pixel is foreground when *any* part
covers it, i.e. ``sum > 0``: refer's ``getMask`` sums parts, and ``== 1`` would drop the pixels
where parts overlap).

The refs pickles are Python-2 pickles. They are the only pickles read anywhere in this project,
once, by ``scripts/prepare_data.py``; training reads the prepared Arrow files. They come from the
internet, and a pickle can name any function to call while it loads (``os.system`` included), so
they are read by a restricted unpickler that builds only what a refs file holds (lists, dicts,
tuples, strings, numbers, booleans, None, sets) and refuses any other global with
:class:`UnsafeRefsError` before calling it.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from prompt_ris.data.rle import decode_rle

logger = logging.getLogger(__name__)

REFER_IMAGE_DIR = Path("images/mscoco/images/train2014")  # relative to the data root
# Optional, beside refs(<splitBy>).p: a dataset's own seen/unseen category ids (splits.py).
CATEGORY_SPLIT_FILE = "category_split.json"
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
REFER_SPLITS = ("train", "val", "test", "testA", "testB", "testC", "testAB", "testBC", "testAC")
# Where the data comes from (README.md, "Data").
REFER_PROJECT = "https://github.com/lichengunc/refer"
REFER_ZIP_URL = "https://bvisionweb1.cs.unc.edu/licheng/referit/data/{dataset}.zip"
COCO_TRAIN2014_URL = "http://images.cocodataset.org/zips/train2014.zip"
COCO_TRAIN2014_IMAGES = 82783
REFER_DOWNLOAD_HINT = (
    "download refcoco.zip, refcoco+.zip and refcocog.zip (the refer project, "
    f"{REFER_PROJECT}: {REFER_ZIP_URL.format(dataset='<dataset>')}; README.md, section 'Data', "
    "says how to check a copy when that server is down) and unzip them into the data root"
)


def refs_path(root: str | Path, dataset: str, split_by: str) -> Path:
    """``<root>/<dataset>/refs(<split_by>).p``."""
    return Path(root) / dataset / f"refs({split_by}).p"


def split_matches(ref_split: str, split: str) -> bool:
    """Whether a ref whose ``split`` field is ``ref_split`` belongs to ``split`` (refer API).

    ``train``/``val``: exact match; ``testA``/``testB``/``testC``: ``split[-1] in ref_split``
    (so a ``testAB`` ref counts for both); ``testAB``/``testBC``/``testAC``: exact match;
    ``test``: every ref whose split contains "test" (testA and testB for RefCOCO/RefCOCO+).
    """
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    if split in ("testAB", "testBC", "testAC", "train", "val"):
        return ref_split == split
    if split == "test":
        return "test" in ref_split
    raise ValueError(f"unknown refer split '{split}'; use one of {', '.join(REFER_SPLITS)}")


def _repair_text(obj: Any) -> Any:
    """Undo a latin-1 fallback decode: Python-2 byte strings holding UTF-8 become proper text."""
    if isinstance(obj, str):
        try:
            return obj.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return obj  # a real unicode string, or bytes that were never UTF-8
    if isinstance(obj, list):
        return [_repair_text(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_repair_text(v) for v in obj)
    if isinstance(obj, dict):
        return {_repair_text(k): _repair_text(v) for k, v in obj.items()}
    return obj


class UnsafeRefsError(pickle.UnpicklingError):
    """A refs file asks for something other than plain data (it could run code)."""


# The only globals a refs pickle may name: builtin containers without side effects (a Python-2
# pickle names the builtins module "__builtin__").
_SAFE_GLOBALS = {
    (module, name)
    for module in ("builtins", "__builtin__")
    for name in ("set", "frozenset", "list", "dict", "tuple")
}


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds lists, dicts, tuples, strings, numbers, booleans, None and sets; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeRefsError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeRefsError(f"persistent id {pid!r}")


def _unpickle_plain(f: Any, path: Path, encoding: str) -> Any:
    try:
        return _PlainDataUnpickler(f, encoding=encoding).load()
    except UnsafeRefsError as err:
        raise UnsafeRefsError(
            f"'{path}' is not a plain refs file: it asks to call {err} while loading, which "
            "could run code on this machine, so it was not loaded. A refs file holds only lists, "
            f"dicts, strings and numbers; delete it and download it again ({REFER_DOWNLOAD_HINT})"
        ) from None


def load_refs(path: str | Path) -> list[dict[str, Any]]:
    """Load a ``refs(<splitBy>).p`` pickle written by Python 2 or 3, as plain data only.

    Python-2 byte strings do not decode as ASCII when a sentence is non-ASCII; the file is then
    read again with ``encoding='latin1'`` (which maps every byte) and the strings are re-decoded
    as UTF-8, so non-ASCII expressions come back as the text that was written.

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeRefsError: the pickle names a function or class (module docstring); nothing it
            names is called.
        ValueError: it holds something other than a list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"refs file '{path}' not found; {REFER_DOWNLOAD_HINT}")
    with path.open("rb") as f:
        try:
            refs = _unpickle_plain(f, path, encoding="ASCII")
        except UnicodeDecodeError:
            f.seek(0)
            refs = _repair_text(_unpickle_plain(f, path, encoding="latin1"))
    if not isinstance(refs, list):
        raise ValueError(f"'{path}' holds a {type(refs).__name__}, not a list of refs")
    return refs


def segmentation_to_rle(segmentation: list | dict, height: int, width: int) -> dict[str, Any]:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> one compressed RLE.

    Polygon parts are united (``sum > 0``). Parts with fewer than 3 points are dropped (they
    cover nothing, and pycocotools would read a 4-number part as a box).

    Returns:
        ``{"size": [H, W], "counts": str}`` (COCO compressed RLE, counts as ASCII text).
    """
    if isinstance(segmentation, list):
        parts = [[float(v) for v in part] for part in segmentation if len(part) >= 6]
        if not parts:
            rle = mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        else:
            rle = mask_utils.merge(mask_utils.frPyObjects(parts, height, width), intersect=0)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(
                f"RLE size {segmentation['size']} differs from the image size {[height, width]}"
            )
        if isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)  # uncompressed -> compressed
        else:
            rle = {"size": [height, width], "counts": segmentation["counts"]}
    else:
        raise ValueError(f"unknown COCO segmentation of type {type(segmentation).__name__}")
    counts = rle["counts"]
    return {
        "size": [height, width],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def sentence_text(sentence: dict[str, Any]) -> str:
    """The expression of one refer sentence: ``sent`` (cleaned), else ``raw``; stripped."""
    text = sentence.get("sent") or sentence.get("raw") or ""
    return str(text).strip()


class Refer:
    """One refer-format dataset (e.g. RefCOCO with the UNC split).

    Args:
        root: data root holding ``<dataset>/refs(<split_by>).p`` and ``instances.json``.
        dataset: "refcoco", "refcoco+", "refcocog" or any folder in the same format.
        split_by: "unc", "umd", "google", ...
        image_dir: image folder; default ``<root>/images/mscoco/images/train2014``.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        split_by: str,
        image_dir: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.split_by = split_by
        self.image_dir = Path(image_dir) if image_dir is not None else self.root / REFER_IMAGE_DIR
        self.refs: list[dict[str, Any]] = load_refs(refs_path(root, dataset, split_by))
        instances = self.root / dataset / "instances.json"
        if not instances.is_file():
            raise FileNotFoundError(f"'{instances}' not found; {REFER_DOWNLOAD_HINT}")
        with instances.open(encoding="utf-8") as f:
            coco = json.load(f)
        self.images: dict[int, dict[str, Any]] = {img["id"]: img for img in coco["images"]}
        self.annotations: dict[int, dict[str, Any]] = {a["id"]: a for a in coco["annotations"]}
        self.categories: dict[int, str] = {c["id"]: c["name"] for c in coco["categories"]}
        self._by_id = {ref["ref_id"]: ref for ref in self.refs}
        logger.info(
            "%s(%s): %d refs, %d images, %d annotations",
            dataset,
            split_by,
            len(self.refs),
            len(self.images),
            len(self.annotations),
        )

    def ref(self, ref_id: int) -> dict[str, Any]:
        return self._by_id[ref_id]

    def ref_ids(self, split: str | None = None) -> list[int]:
        """Ids of the refs in ``split`` with the refer API's semantics (see ``split_matches``)."""
        return [r["ref_id"] for r in self.refs if split is None or split_matches(r["split"], split)]

    def image_path(self, ref: dict[str, Any]) -> Path:
        """Image file of a ref, named by ``instances.json`` (not by ``ref['file_name']``)."""
        return self.image_dir / self.images[ref["image_id"]]["file_name"]

    def image_hw(self, ref: dict[str, Any]) -> tuple[int, int]:
        """Annotated (H, W) of a ref's image."""
        img = self.images[ref["image_id"]]
        return int(img["height"]), int(img["width"])

    def mask_rle(self, ref: dict[str, Any]) -> dict[str, Any]:
        """The ref's object mask as compressed RLE in the original image frame."""
        height, width = self.image_hw(ref)
        ann = self.annotations[ref["ann_id"]]
        return segmentation_to_rle(ann["segmentation"], height, width)

    def mask(self, ref: dict[str, Any]) -> np.ndarray:
        """The ref's object mask, (H, W) bool."""
        return decode_rle(self.mask_rle(ref))

    def sentences(self, ref: dict[str, Any]) -> list[tuple[int, str]]:
        """(sent_id, expression) for every sentence of a ref, in stored order."""
        return [(int(s["sent_id"]), sentence_text(s)) for s in ref.get("sentences", [])]
