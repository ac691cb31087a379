"""Refer folder -> prepared format: one Arrow record per reference, written with HF ``datasets``.

``prepare_refer(root, out)`` reads every ``<root>/<dataset>/refs(<splitBy>).p`` it finds (or
the sources it is given) through :class:`~prompt_ris.data.refer.Refer` and writes
``<out>/<dataset>_<splitBy>/`` with ``Dataset.save_to_disk``, plus ``<out>/manifest.json`` (counts
and problems per source). A dataset's ``<root>/<dataset>/category_split.json`` (its own
seen/unseen categories, read by ``splits.category_split_of``) is copied into each of its sources.
Training and evaluation open these memory-mapped Arrow files with ``load_from_disk``; the workers
of a DataLoader share them, and no pickle or lmdb is involved.

A record (``PREPARED_FEATURES``) holds the identities (dataset, split_by, ref_id, ann_id,
image_id, category_id, the raw refer split), the image (file_name from instances.json, the
resolved image_path, width, height), the mask as COCO compressed RLE (``mask_counts`` +
``mask_size`` = [H, W], the union of the annotation's parts) and the sentences with their ids.

Problems are reported by id: refs whose image is missing, unreadable or of another size than
annotated, refs whose annotation is missing, and refs with no non-empty sentence are left out;
empty sentences are dropped; refs with an empty mask are kept and listed. A source of which a
split would come out empty, or lose more than ``max_dropped`` of its refs, is not written: the
preparation stops with :class:`IncompleteSourceError`, one line naming the causes, the image
folder looked in and the layout expected. ``format_counts_table`` compares the counts with the
published ones when it is given them (``splits.PUBLISHED_COUNTS``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, UnidentifiedImageError

from prompt_ris.data.refer import (
    CATEGORY_SPLIT_FILE,
    COCO_TRAIN2014_IMAGES,
    COCO_TRAIN2014_URL,
    REFER_DOWNLOAD_HINT,
    REFER_IMAGE_DIR,
    Refer,
)
from prompt_ris.data.rle import rle_area
from prompt_ris.data.transforms import ImageLoadError, load_image

logger = logging.getLogger(__name__)

PREPARED_VERSION = 1
MANIFEST = "manifest.json"
CHECK_IMAGES = ("none", "header", "full")  # how much of every image file is read
_SPLIT_ORDER = ("train", "val", "test", "testA", "testB", "testC")
_EXIF_SWAPS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
DEFAULT_MAX_DROPPED = 0.01  # share of a split's refs that may be left out before preparation stops
PREPARED_FEATURES = datasets.Features(
    {
        "dataset": datasets.Value("string"),
        "split_by": datasets.Value("string"),
        "ref_id": datasets.Value("int64"),
        "ann_id": datasets.Value("int64"),
        "image_id": datasets.Value("int64"),
        "category_id": datasets.Value("int64"),
        "split": datasets.Value("string"),  # raw refer split ("train", "testA", "testAB", ...)
        "file_name": datasets.Value("string"),
        "image_path": datasets.Value("string"),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "mask_counts": datasets.Value("string"),  # COCO compressed RLE of the object
        "mask_size": datasets.List(datasets.Value("int32")),  # [H, W]
        "sentences": datasets.List(datasets.Value("string")),
        "sent_ids": datasets.List(datasets.Value("int64")),
    }
)


@dataclass
class SplitCounts:
    refs: int = 0
    images: int = 0
    sentences: int = 0


@dataclass
class SourceReport:
    """What was written for one (dataset, split_by), and what was left out, by id."""

    dataset: str
    split_by: str
    path: str
    num_refs: int = 0
    counts: dict[str, SplitCounts] = field(default_factory=dict)
    refs_in_file: dict[str, int] = field(default_factory=dict)  # raw split -> refs in the refs file
    missing_images: dict[int, str] = field(default_factory=dict)  # image_id -> path
    unreadable_images: dict[int, str] = field(default_factory=dict)  # image_id -> reason
    refs_without_image: list[int] = field(default_factory=list)
    refs_without_annotation: list[int] = field(default_factory=list)
    refs_without_sentences: list[int] = field(default_factory=list)
    empty_sentences: list[int] = field(default_factory=list)  # sent_ids
    empty_masks: list[int] = field(default_factory=list)  # ref_ids (kept)

    @property
    def name(self) -> str:
        return source_name(self.dataset, self.split_by)


class IncompleteSourceError(ValueError):
    """A split of a source would come out empty or lose more of its refs than allowed."""


def source_name(dataset: str, split_by: str) -> str:
    """Folder name of a prepared source: ``<dataset>_<split_by>``."""
    return f"{dataset}_{split_by}"


def find_sources(root: str | Path) -> list[tuple[str, str]]:
    """Every (dataset, split_by) with a ``<root>/<dataset>/refs(<split_by>).p``."""
    found = []
    for path in sorted(Path(root).glob("*/refs(*).p")):
        found.append((path.parent.name, path.name[len("refs(") : -len(").p")]))
    return found


def _check_image(path: Path, expected_hw: tuple[int, int], mode: str) -> str | None:
    """None if the image is usable, else the reason."""
    if mode == "none":
        return None
    if mode == "full":
        try:
            load_image(path, expected_hw)
        except ImageLoadError as err:
            return str(err)
        return None
    try:
        with Image.open(path) as img:
            hw = (img.height, img.width)
            orientation = img.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"cannot open ({type(err).__name__}: {err})"
    if hw == expected_hw or (hw[::-1] == expected_hw and orientation in _EXIF_SWAPS):
        return None
    return f"size {hw[0]}x{hw[1]} differs from the annotated {expected_hw[0]}x{expected_hw[1]}"


def _source_columns(refer: Refer, report: SourceReport, check_images: str) -> dict[str, list]:
    """Build the record columns of one source, filling the report's problem lists."""
    cols: dict[str, list] = {name: [] for name in PREPARED_FEATURES}
    image_ok: dict[int, bool] = {}
    for ref in refer.refs:
        ref_id, image_id = int(ref["ref_id"]), int(ref["image_id"])
        if ref["ann_id"] not in refer.annotations or image_id not in refer.images:
            report.refs_without_annotation.append(ref_id)
            continue
        sentences = refer.sentences(ref)
        report.empty_sentences.extend(sid for sid, text in sentences if not text)
        sentences = [(sid, text) for sid, text in sentences if text]
        if not sentences:
            report.refs_without_sentences.append(ref_id)
            continue
        path, hw = refer.image_path(ref), refer.image_hw(ref)
        if image_id not in image_ok:
            if not path.is_file():
                report.missing_images[image_id] = str(path)
                image_ok[image_id] = False
            else:
                reason = _check_image(path, hw, check_images)
                if reason is not None:
                    report.unreadable_images[image_id] = f"{path}: {reason}"
                image_ok[image_id] = reason is None
        if not image_ok[image_id]:
            report.refs_without_image.append(ref_id)
            continue
        rle = refer.mask_rle(ref)
        if rle_area(rle) == 0:
            report.empty_masks.append(ref_id)
        row = {
            "dataset": refer.dataset,
            "split_by": refer.split_by,
            "ref_id": ref_id,
            "ann_id": int(ref["ann_id"]),
            "image_id": image_id,
            "category_id": int(ref["category_id"]),
            "split": str(ref["split"]),
            "file_name": refer.images[image_id]["file_name"],
            "image_path": str(path.resolve()),
            "width": hw[1],
            "height": hw[0],
            "mask_counts": rle["counts"],
            "mask_size": list(hw),
            "sentences": [text for _, text in sentences],
            "sent_ids": [sid for sid, _ in sentences],
        }
        for name, value in row.items():
            cols[name].append(value)
    return cols


def _count(cols: dict[str, list]) -> dict[str, SplitCounts]:
    counts: dict[str, SplitCounts] = {}
    images: dict[str, set[int]] = {}
    for split, image_id, sents in zip(cols["split"], cols["image_id"], cols["sentences"]):
        c = counts.setdefault(split, SplitCounts())
        c.refs += 1
        c.sentences += len(sents)
        images.setdefault(split, set()).add(image_id)
    for split, ids in images.items():
        counts[split].images = len(ids)
    order = {s: i for i, s in enumerate(_SPLIT_ORDER)}
    return dict(sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def prepare_source(
    refer: Refer,
    out_dir: str | Path,
    check_images: str = "header",
    max_dropped: float = DEFAULT_MAX_DROPPED,
) -> SourceReport:
    """Write one source to ``<out_dir>/<dataset>_<split_by>`` (with the dataset's
    ``category_split.json`` when it has one) and report what was written.

    Args:
        refer: the loaded refer dataset.
        out_dir: prepared root.
        check_images: "header" opens every image (size vs annotation), "full" decodes it,
            "none" only checks that the file exists.
        max_dropped: the share of any split's refs that may be left out (0 to 1); 1 writes
            whatever is left, empty splits included.

    Raises:
        IncompleteSourceError: a split would come out empty or lose more than ``max_dropped``
            of its refs; nothing is written for the source.
    """
    if check_images not in CHECK_IMAGES:
        raise ValueError(f"check_images='{check_images}'; use one of {CHECK_IMAGES}")
    if not 0 <= max_dropped <= 1:
        raise ValueError(f"max_dropped={max_dropped}; give a share from 0 to 1")
    out_dir = Path(out_dir)
    dest = out_dir / source_name(refer.dataset, refer.split_by)
    report = SourceReport(refer.dataset, refer.split_by, str(dest))
    in_file: dict[str, int] = {}
    for ref in refer.refs:
        in_file[str(ref["split"])] = in_file.get(str(ref["split"]), 0) + 1
    order = {s: i for i, s in enumerate(_SPLIT_ORDER)}
    ranked = sorted(in_file.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    report.refs_in_file = dict(ranked)
    cols = _source_columns(refer, report, check_images)
    report.num_refs = len(cols["ref_id"])
    report.counts = _count(cols)
    for problem, ids in _problems(report).items():
        logger.warning("%s: %d %s: %s", report.name, len(ids), problem, _abbrev(ids))
    loss = loss_problem(report, refer, max_dropped)
    if loss is not None:
        raise IncompleteSourceError(loss)
    table = datasets.Dataset.from_dict(cols, features=PREPARED_FEATURES)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    table.save_to_disk(str(tmp))
    category_split = refer.root / refer.dataset / CATEGORY_SPLIT_FILE
    if category_split.is_file():
        shutil.copyfile(category_split, tmp / CATEGORY_SPLIT_FILE)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return report


def images_hint(root: str | Path) -> str:
    """Where the refer layout expects the COCO train2014 images under ``root``, and the fix."""
    folder = Path(root) / REFER_IMAGE_DIR
    return (
        f"the refer layout expects COCO train2014 as '{folder}/COCO_train2014_<12-digit id>.jpg': "
        f"unzip {COCO_TRAIN2014_URL} ({COCO_TRAIN2014_IMAGES:,} images) into '{folder.parent}', "
        "or give --image-dir <the folder holding those files> (README.md, section 'Data')"
    )


def loss_problem(report: SourceReport, refer: Refer, max_dropped: float) -> str | None:
    """One line when a split of ``report`` came out empty or lost more than ``max_dropped`` of
    its refs: which splits, why their refs were left out and the fix; else None."""
    short, worst = [], 0.0
    for split, total in report.refs_in_file.items():
        kept = report.counts[split].refs if split in report.counts else 0
        lost = (total - kept) / total
        if lost > max_dropped:
            short.append(f"{split} keeps {kept:,} of {total:,}")
            worst = max(worst, lost)
    if not short:
        return None
    causes = []
    if report.missing_images:
        example = next(iter(report.missing_images.values()))
        causes.append(
            f"{len(report.missing_images):,} images are not in '{refer.image_dir}' (e.g. "
            f"'{example}'); {images_hint(refer.root)}"
        )
    if report.unreadable_images:
        example = next(iter(report.unreadable_images.values()))
        causes.append(
            f"{len(report.unreadable_images):,} images cannot be read or have another size than "
            f"annotated (e.g. {example}); copy them again"
        )
    if report.refs_without_annotation:
        causes.append(
            f"{len(report.refs_without_annotation):,} refs name an annotation or image that "
            f"'{refer.root / refer.dataset / 'instances.json'}' lacks; take the refs file and "
            "instances.json from the same zip"
        )
    if report.refs_without_sentences:
        causes.append(f"{len(report.refs_without_sentences):,} refs have no non-empty sentence")
    allow = math.ceil(worst * 100 - 1e-9) / 100
    return (
        f"{report.dataset}({report.split_by}) was not written: refs per split ("
        f"{', '.join(short)}) lost more than --max-dropped {max_dropped:g} allows; "
        f"{'; '.join(causes)}; or give --max-dropped {allow:g} to write what is left"
    )


def _problems(report: SourceReport) -> dict[str, list]:
    found = {
        "missing images (image_id)": sorted(report.missing_images),
        "unreadable images (image_id)": sorted(report.unreadable_images),
        "refs left out for their image (ref_id)": report.refs_without_image,
        "refs left out for a missing annotation (ref_id)": report.refs_without_annotation,
        "refs left out with no sentence (ref_id)": report.refs_without_sentences,
        "empty sentences dropped (sent_id)": report.empty_sentences,
        "refs with an empty mask, kept (ref_id)": report.empty_masks,
    }
    return {k: v for k, v in found.items() if v}


def _abbrev(ids: list, limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more; see {MANIFEST})" if len(ids) > limit else "")


def _write_manifest(out_dir: Path, reports: list[SourceReport]) -> None:
    path = out_dir / MANIFEST
    manifest: dict[str, Any] = {"version": PREPARED_VERSION, "sources": {}}
    if path.is_file():
        manifest["sources"] = json.loads(path.read_text(encoding="utf-8")).get("sources", {})
    for report in reports:
        manifest["sources"][report.name] = asdict(report)
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")


def prepare_refer(
    root: str | Path,
    out_dir: str | Path,
    sources: list[tuple[str, str]] | None = None,
    image_dir: str | Path | None = None,
    check_images: str = "header",
    max_dropped: float = DEFAULT_MAX_DROPPED,
) -> list[SourceReport]:
    """Prepare refer-format datasets found under ``root`` (see the module docstring).

    Args:
        root: refer data root (``<root>/<dataset>/refs(<splitBy>).p`` + ``instances.json``).
        out_dir: prepared root (``DataConfig.prepared``).
        sources: (dataset, split_by) pairs; None = every refs file under ``root``.
        image_dir: image folder; default ``<root>/images/mscoco/images/train2014``.
        check_images: see :func:`prepare_source`.
        max_dropped: see :func:`prepare_source`.

    Returns:
        One report per source, in order.

    Raises:
        FileNotFoundError: no refs file under ``root``, or (``max_dropped`` below 1) no image
            folder, found once the first refs file has loaded.
        IncompleteSourceError: see :func:`prepare_source`; the sources before it are written.
    """
    sources = find_sources(root) if sources is None else sources
    if not sources:
        raise FileNotFoundError(
            f"no '<dataset>/refs(<splitBy>).p' under '{root}'; point --root at the folder holding "
            f"refcoco/, refcoco+/, refcocog/, or {REFER_DOWNLOAD_HINT} (or run "
            "scripts/make_synthetic.py for demo data)"
        )
    out_dir = Path(out_dir)
    reports = []
    for dataset, split_by in sources:
        refer = Refer(root, dataset, split_by, image_dir=image_dir)
        if max_dropped < 1 and not refer.image_dir.is_dir():
            where = "--image-dir" if image_dir is not None else "image folder"
            raise FileNotFoundError(
                f"{where} '{refer.image_dir}' does not exist; {images_hint(root)}"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        reports.append(prepare_source(refer, out_dir, check_images, max_dropped))
        _write_manifest(out_dir, reports)
    return reports


PublishedCounts = dict[tuple[str, str], dict[str, tuple[int, int, int]]]


def published_status(
    report: SourceReport, split: str, published: PublishedCounts
) -> tuple[str, bool | None]:
    """(status text, complete?) of one prepared split against its published (refs, images,
    sentences): ``complete``, ``incomplete: refs -120, ...``, or ``-`` (None) when unpublished."""
    expected = published.get((report.dataset, report.split_by), {}).get(split)
    if expected is None:
        return "-", None
    c = report.counts.get(split, SplitCounts())
    diffs = [
        f"{what} {have - want:+,}"
        for what, have, want in zip(("refs", "images", "sents"), (c.refs, c.images, c.sentences),
                                    expected)  # fmt: skip
        if have != want
    ]
    return ("complete", True) if not diffs else (f"incomplete: {', '.join(diffs)}", False)


def format_counts_table(
    reports: list[SourceReport], published: PublishedCounts | None = None
) -> str:
    """Refs / images / sentences per dataset and split, then the problems, as plain text.

    With ``published`` ((dataset, split_by) -> split -> (refs, images, sentences)), each split
    also gets its status against those counts, and a last line says whether the copy is complete.
    """
    header = f"{'dataset':<12} {'splitBy':<8} {'split':<8} {'refs':>8} {'images':>8} {'sents':>9}"
    lines = [header + ("  published" if published is not None else "")]
    verdicts: list[tuple[str, bool]] = []
    for report in reports:
        splits = list(report.counts)
        if published is not None:
            known = published.get((report.dataset, report.split_by), {})
            splits += [s for s in known if s not in report.counts]
        for split in splits:
            c = report.counts.get(split, SplitCounts())
            line = (
                f"{report.dataset:<12} {report.split_by:<8} {split:<8} "
                f"{c.refs:>8} {c.images:>8} {c.sentences:>9}"
            )
            if published is not None:
                status, complete = published_status(report, split, published)
                line += f"  {status}"
                if complete is not None:
                    verdicts.append((f"{report.dataset}({report.split_by}) {split}", complete))
            lines.append(line)
    for report in reports:
        for problem, ids in _problems(report).items():
            lines.append(f"{report.name}: {len(ids)} {problem}: {_abbrev(ids)}")
    if verdicts:
        short = [name for name, complete in verdicts if not complete]
        if short:
            lines.append(
                f"incomplete: {len(short)} of {len(verdicts)} splits differ from the published "
                f"counts ({', '.join(short)}); README.md, section 'Data', says where a complete "
                "copy comes from"
            )
        else:
            lines.append(f"complete: all {len(verdicts)} splits match the published counts")
    return "\n".join(lines)


def open_prepared(prepared_dir: str | Path, dataset: str, split_by: str) -> datasets.Dataset:
    """Open one prepared source (memory-mapped).

    Raises:
        FileNotFoundError: it was not prepared.
        ValueError: it was written by another version, or holds no refs.
    """
    path = Path(prepared_dir) / source_name(dataset, split_by)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(
            f"prepared data for {dataset}({split_by}) not found at '{path}'; run "
            f"`python scripts/prepare_data.py --root <refer data root> --out {prepared_dir}` "
            "(or scripts/make_synthetic.py for the synthetic data)"
        )
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    # A table written with no rows: newer datasets write no data file (and cannot load it back),
    # older ones write an empty one.
    table = datasets.load_from_disk(str(path)) if state.get("_data_files") else None
    if table is None or len(table) == 0:
        raise ValueError(
            f"prepared data for {dataset}({split_by}) at '{path}' holds no refs (every ref was "
            f"left out, most often for missing images: '{Path(prepared_dir) / MANIFEST}' lists "
            "them by id); put the COCO train2014 images where the refer layout expects them "
            "(README.md, section 'Data') and run scripts/prepare_data.py again"
        )
    missing = set(PREPARED_FEATURES) - set(table.column_names)
    if missing:
        raise ValueError(
            f"'{path}' lacks columns {sorted(missing)}: it was written by another version; "
            "run scripts/prepare_data.py again"
        )
    return table
