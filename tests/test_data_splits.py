"""Split names, seen/unseen categories, the combined training set and the published counts."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import numpy as np
import pytest

from prompt_ris.data.loader import group_by_image
from prompt_ris.data.prepare import PREPARED_FEATURES, prepare_refer, source_name
from prompt_ris.data.refer import CATEGORY_SPLIT_FILE, load_refs, refs_path
from prompt_ris.data.rle import decode_rle
from prompt_ris.data.splits import (
    COCO_SEEN,
    COCO_UNSEEN,
    COCO_UNUSED,
    PUBLISHED_COUNTS,
    PUBLISHED_SEEN_UNSEEN_REFS,
    SplitSpec,
    category_split_of,
    count_refs,
    load_split,
    parse_split,
    select_refs,
)
from prompt_ris.miniature.synthetic import SYNTHETIC_SEEN, SYNTHETIC_UNSEEN, generate_synthetic

REPO = Path(__file__).resolve().parents[1]
# The 80 COCO ids, and CRIS's contiguous 0..79 seen/unseen lists (docs/design.md, "Data and
# splits").
COCO_IDS = sorted(set(range(1, 91)) - {12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
CONTIGUOUS_SEEN = [0, 1, 2, 3, 6, 7, 8, 13, 14, 17, 18, 21, 22, 23, 24, 26, 28, 29, 30, 33, 37, 39,
                   42, 44, 45, 46, 47, 48, 49, 50, 51, 53, 54, 56, 59, 61, 62, 63, 64, 65, 68, 69,
                   70, 72, 73, 74, 75, 79]  # fmt: skip
EMPTY_4X4 = "`0"  # COCO compressed RLE of 16 background pixels
CONTIGUOUS_UNSEEN = [4, 5, 15, 16, 19, 20, 25, 27, 31, 36, 41, 43, 55, 57, 66, 71, 76]


def test_category_split_is_48_17_15_of_coco() -> None:
    assert (len(COCO_SEEN), len(COCO_UNSEEN), len(COCO_UNUSED)) == (48, 17, 15)
    assert sorted({**COCO_SEEN, **COCO_UNSEEN, **COCO_UNUSED}) == COCO_IDS
    assert [COCO_IDS.index(i) for i in sorted(COCO_SEEN)] == CONTIGUOUS_SEEN
    assert [COCO_IDS.index(i) for i in sorted(COCO_UNSEEN)] == CONTIGUOUS_UNSEEN
    assert (COCO_SEEN[1], COCO_UNSEEN[18], COCO_UNUSED[67]) == ("person", "dog", "dining table")


def test_parse_split_names() -> None:
    assert parse_split("refcoco:val") == SplitSpec("refcoco", "unc", "val")
    assert parse_split("refcocog:test_unseen") == SplitSpec("refcocog", "umd", "test", "unseen")
    assert parse_split("refcocog@google:val_seen") == SplitSpec("refcocog", "google", "val", "seen")
    assert parse_split("refcocog_google:val") == parse_split("refcocog@google:val")
    assert parse_split("refcoco+@unc:testA").name == "refcoco+:testA"
    assert parse_split("refcocog@google:val_seen").name == "refcocog_google:val_seen"
    assert parse_split("mine@x:train").name == "mine@x:train"
    assert parse_split("synthetic:train_seen") == SplitSpec("synthetic", "unc", "train", "seen")
    assert parse_split("combined").is_combined and parse_split("combined_seen").categories == "seen"
    for bad, message in [
        ("refcoco", "malformed"),
        ("refcoco:validation", "not a refer split"),
        ("mydata:val", "no default splitBy"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_split(bad)


def test_select_refs_by_split_and_category() -> None:
    splits = ["train", "train", "train", "val", "val", "testA", "testB", "testAB", "testB"]
    cats = [1, 5, 10, 1, 17, 1, 18, 2, 67]  # person seen, airplane unseen, traffic light unused...
    assert select_refs(splits, cats, "train").tolist() == [0, 1, 2]
    assert select_refs(splits, cats, "train", "seen").tolist() == [0]
    assert select_refs(splits, cats, "val", "unseen").tolist() == [4]
    assert select_refs(splits, cats, "test").tolist() == [5, 6, 7, 8]
    assert select_refs(splits, cats, "testB", "seen").tolist() == [7]
    assert select_refs(splits, cats, "test", "unseen").tolist() == [6]  # 67 is in neither set
    own = (frozenset({10, 67}), frozenset({1}))  # a dataset's own split: ids mean other things
    assert select_refs(splits, cats, "train", "seen", own).tolist() == [2]
    assert select_refs(splits, cats, "test", "seen", own).tolist() == [8]
    assert select_refs(splits, cats, "test", "unseen", own).tolist() == [5]


def _write_source(root: Path, dataset: str, split_by: str, refs: list[tuple]) -> None:
    """A prepared source from (ref_id, image_id, split, category_id) tuples."""
    cols: dict[str, list] = {name: [] for name in PREPARED_FEATURES}
    for ref_id, image_id, split, category in refs:
        row = {
            "dataset": dataset, "split_by": split_by, "ref_id": ref_id, "ann_id": ref_id + 1000,
            "image_id": image_id, "category_id": category, "split": split,
            "file_name": f"{image_id}.jpg", "image_path": f"/coco/{image_id}.jpg", "width": 4,
            "height": 4, "mask_counts": EMPTY_4X4, "mask_size": [4, 4],
            "sentences": [f"{dataset} ref {ref_id}"], "sent_ids": [ref_id * 10],
        }  # fmt: skip
        for key, value in row.items():
            cols[key].append(value)
    table = datasets.Dataset.from_dict(cols, features=PREPARED_FEATURES)
    table.save_to_disk(str(root / source_name(dataset, split_by)))


@pytest.fixture(scope="module")
def four_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Image 2 is refcoco+ val and image 3 is refcocog google val: both leave training."""
    root = tmp_path_factory.mktemp("prepared")
    _write_source(root, "refcoco", "unc", [
        (1, 1, "train", 1), (2, 2, "train", 1), (3, 3, "train", 5), (4, 4, "val", 1),
        (5, 5, "testA", 1), (6, 6, "testB", 3),
    ])  # fmt: skip
    _write_source(root, "refcoco+", "unc", [
        (11, 1, "train", 5), (12, 7, "train", 1), (13, 2, "val", 1), (14, 8, "testA", 1),
        (15, 9, "testB", 1),
    ])  # fmt: skip
    _write_source(root, "refcocog", "umd", [
        (21, 1, "train", 1), (22, 3, "train", 1), (23, 10, "train", 67), (24, 11, "val", 1),
        (25, 12, "test", 1), (26, 6, "train", 1),
    ])  # fmt: skip
    _write_source(root, "refcocog", "google", [
        (31, 1, "train", 1), (32, 13, "train", 1), (33, 3, "val", 1),
    ])  # fmt: skip
    return root


def test_combined_set_drops_every_heldout_image(four_sources: Path) -> None:
    table = load_split(four_sources, "combined")
    kept = list(zip(table["dataset"][:], table["ref_id"][:]))
    # Removed: images 2 (refcoco+ val), 3 (google val), 6 (refcoco testB), 4/5/8/9/11/12 are
    # not train; refcocog google train refs are never used.
    assert kept == [("refcoco", 1), ("refcoco+", 11), ("refcoco+", 12), ("refcocog", 21),
                    ("refcocog", 23)]  # fmt: skip
    groups = group_by_image(table)  # image 1 gathers the expressions of all three datasets
    assert [len(g.expressions) for g in groups] == [3, 1, 1]
    seen = load_split(four_sources, "combined_seen")
    assert seen["ref_id"][:] == [1, 12, 21]  # 5 (airplane) is unseen, 67 (table) unused


def test_combined_set_needs_google_val(four_sources: Path, tmp_path: Path) -> None:
    for name in ("refcoco_unc", "refcoco+_unc", "refcocog_umd"):
        (tmp_path / name).symlink_to(four_sources / name)
    with pytest.raises(FileNotFoundError, match=r"refcocog\(google\)"):
        load_split(tmp_path, "combined")


def test_per_dataset_splits_from_prepared(four_sources: Path) -> None:
    assert load_split(four_sources, "refcoco:test")["ref_id"][:] == [5, 6]
    assert load_split(four_sources, "refcocog@google:val")["ref_id"][:] == [33]
    assert load_split(four_sources, "refcoco:train_unseen")["ref_id"][:] == [3]
    with pytest.raises(ValueError, match="empty"):
        load_split(four_sources, "refcoco:testA_unseen")


def test_a_dataset_of_its_own_reads_its_category_split_file(tmp_path: Path) -> None:
    _write_source(tmp_path, "mydata", "x", [
        (1, 1, "val", 1), (2, 2, "val", 2), (3, 3, "val", 3), (4, 4, "train", 2),
    ])  # fmt: skip
    with pytest.raises(ValueError, match=r"no seen/unseen category split .*category_split\.json"):
        load_split(tmp_path, "mydata@x:val_seen")
    assert load_split(tmp_path, "mydata@x:val")["ref_id"][:] == [1, 2, 3]  # no split needed
    path = tmp_path / source_name("mydata", "x") / CATEGORY_SPLIT_FILE
    path.write_text('{"seen": [2, 3], "unseen": [1]}')
    assert category_split_of(tmp_path, "mydata", "x") == (frozenset({2, 3}), frozenset({1}))
    assert load_split(tmp_path, "mydata@x:val_seen")["ref_id"][:] == [2, 3]
    assert load_split(tmp_path, "mydata@x:val_unseen")["ref_id"][:] == [1]
    path.write_text('{"seen": ["star"], "unseen": []}')
    with pytest.raises(ValueError, match="is not a category split"):
        category_split_of(tmp_path, "mydata", "x")


def test_coco_datasets_fall_back_to_the_coco_split(four_sources: Path) -> None:
    seen, unseen = category_split_of(four_sources, "refcocog", "google")
    assert (seen, unseen) == (frozenset(COCO_SEEN), frozenset(COCO_UNSEEN))


def test_synthetic_seen_unseen(tmp_path: Path) -> None:
    generate_synthetic(tmp_path, num_images=30, seed=2)
    prepare_refer(tmp_path, tmp_path / "prepared", check_images="none")
    prepared = tmp_path / "prepared"
    written = (tmp_path / "synthetic" / CATEGORY_SPLIT_FILE).read_bytes()
    assert (prepared / "synthetic_unc" / CATEGORY_SPLIT_FILE).read_bytes() == written
    assert category_split_of(prepared, "synthetic", "unc") == (
        frozenset(SYNTHETIC_SEEN),
        frozenset(SYNTHETIC_UNSEEN),
    )
    val = load_split(prepared, "synthetic:val")
    seen = load_split(prepared, "synthetic:val_seen")
    unseen = load_split(prepared, "synthetic:val_unseen")
    assert set(seen["category_id"][:]) <= set(SYNTHETIC_SEEN)
    assert set(unseen["category_id"][:]) <= set(SYNTHETIC_UNSEEN) and len(unseen) > 0
    assert sorted(seen["ref_id"][:] + unseen["ref_id"][:]) == sorted(val["ref_id"][:])
    train = load_split(prepared, "synthetic:train_seen")
    assert set(train["split"][:]) == {"train"}
    assert set(train["category_id"][:]) <= set(SYNTHETIC_SEEN)


# ---------------------------------------------------------------------------------------------
# Published counts on the real annotation files (skipped with the reason when they are absent).
# ---------------------------------------------------------------------------------------------
def _real_root() -> Path:
    return Path(os.environ.get("PROMPT_RIS_REFER_ROOT", REPO / "data"))


@pytest.fixture(scope="module")
def real_refs() -> dict[tuple[str, str], list[dict]]:
    root = _real_root()
    missing = [refs_path(root, *key) for key in PUBLISHED_COUNTS]
    missing = [str(p) for p in missing if not p.is_file()]
    if missing:
        pytest.skip(
            f"real refer annotations not found ({', '.join(missing)}); set PROMPT_RIS_REFER_ROOT "
            "to the folder holding refcoco/, refcoco+/ and refcocog/ to check the published counts"
        )
    return {key: load_refs(refs_path(root, *key)) for key in PUBLISHED_COUNTS}


def _columns(refs: list[dict]) -> tuple[list[str], list[int], list[int], list[int]]:
    return (
        [r["split"] for r in refs],
        [r["category_id"] for r in refs],
        [r["image_id"] for r in refs],
        [len(r["sentences"]) for r in refs],
    )


def test_published_split_counts(real_refs: dict[tuple[str, str], list[dict]]) -> None:
    wrong = []
    for key, table in PUBLISHED_COUNTS.items():
        splits, cats, images, sents = _columns(real_refs[key])
        for split, expected in table.items():
            got = count_refs(images, sents, select_refs(splits, cats, split))
            if got != expected:
                wrong.append(f"{key} {split}: (refs, images, sentences) {got} != {expected}")
    assert not wrong, "\n".join(wrong)


def test_published_seen_unseen_counts(real_refs: dict[tuple[str, str], list[dict]]) -> None:
    wrong = []
    for key, table in PUBLISHED_SEEN_UNSEEN_REFS.items():
        splits, cats, _, _ = _columns(real_refs[key])
        for name, expected in table.items():
            spec = parse_split(f"{key[0]}@{key[1]}:{name}")
            got = len(select_refs(splits, cats, spec.split, spec.categories))
            if got != expected:
                wrong.append(f"{key} {name}: {got} refs != {expected}")
    assert not wrong, "\n".join(wrong)


def test_count_refs_by_hand() -> None:
    assert not decode_rle({"size": [4, 4], "counts": EMPTY_4X4}).any()
    rows = np.array([0, 2, 3])
    assert count_refs([7, 8, 7, 9], [2, 5, 1, 3], rows) == (3, 2, 6)
