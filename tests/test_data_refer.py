"""Refer reader and preparation on a small refer-format folder written by the test itself."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from prompt_ris.data.loader import ReferImageDataset, group_by_image
from prompt_ris.data.prepare import (
    CHECK_IMAGES,
    IncompleteSourceError,
    open_prepared,
    prepare_refer,
)
from prompt_ris.data.refer import (
    Refer,
    UnsafeRefsError,
    load_refs,
    segmentation_to_rle,
    split_matches,
)
from repo_scripts import load_script

SQUARE = [2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]  # x, y pairs of a 10x10 square
OVERLAP = [8.0, 8.0, 18.0, 8.0, 18.0, 18.0, 8.0, 18.0]  # overlaps SQUARE on [8, 12]^2
NON_ASCII = "the café chair — 左边的椅子"


def _py2_pickle(obj: object) -> bytes:
    """A protocol-2 pickle as Python 2 writes it: str values as byte strings (BINSTRING)."""
    out = bytearray(b"\x80\x02")

    def put(o: object) -> None:
        if isinstance(o, dict):
            out.extend(b"}")  # EMPTY_DICT
            for k, v in o.items():
                put(k)
                put(v)
                out.extend(b"s")  # SETITEM
        elif isinstance(o, list):
            out.extend(b"]")  # EMPTY_LIST
            for v in o:
                put(v)
                out.extend(b"a")  # APPEND
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))  # BININT
        elif isinstance(o, str):
            data = o.encode("utf-8")
            out.extend(b"T" + struct.pack("<I", len(data)) + data)  # BINSTRING (py2 str)
        else:
            raise TypeError(type(o))

    put(obj)
    out.extend(b".")
    return bytes(out)


def _sentence(text: str, sent_id: int) -> dict:
    return {"sent": text, "raw": text, "tokens": text.split(), "sent_id": sent_id}


def _ref(ref_id: int, ann_id: int, image_id: int, split: str, texts: list[str]) -> dict:
    sentences = [_sentence(t, ref_id * 10 + k) for k, t in enumerate(texts)]
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "split": split,
        "sent_ids": [s["sent_id"] for s in sentences],
        "sentences": sentences,
        "file_name": f"WRONG_{image_id}_{ann_id}.jpg",  # refer's suffixed name: must not be used
    }


def write_fixture(root: Path) -> dict:
    """A refer folder 'fixture/refs(unc).p' with every case the reader must handle."""
    img_dir = root / "images" / "mscoco" / "images" / "train2014"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(img_dir / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(img_dir / "grey.png")
    Image.fromarray(rng.integers(0, 255, (10, 12, 4), dtype=np.uint8)).save(img_dir / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (3, 4000, 3), dtype=np.uint8)).save(img_dir / "wide.png")
    Image.fromarray(np.full((1, 1, 3), 7, dtype=np.uint8)).save(img_dir / "dot.png")
    (img_dir / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    images = [
        (1, "rgb.png", 30, 20),
        (2, "grey.png", 16, 16),
        (3, "rgba.png", 12, 10),
        (4, "wide.png", 4000, 3),
        (5, "dot.png", 1, 1),
        (6, "missing.jpg", 8, 8),
        (7, "corrupt.jpg", 8, 8),
    ]
    grey_mask = np.zeros((16, 16), dtype=np.uint8)
    grey_mask[3:9, 5:11] = 1
    compressed = mask_utils.encode(np.asfortranarray(grey_mask))
    wide_mask = np.zeros((3, 4000), dtype=bool)
    wide_mask[:, 1000:3000] = True
    runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, wide_mask.flatten("F"), -1]))).tolist()
    annotations = [
        (11, 1, [SQUARE]),  # polygon
        (12, 1, [SQUARE, OVERLAP, [1.0, 1.0, 3.0, 3.0]]),  # overlapping parts + a 2-point part
        (21, 2, {"size": [16, 16], "counts": compressed["counts"].decode("ascii")}),
        (31, 3, [[0.0, 0.0, 6.0, 0.0, 6.0, 5.0, 0.0, 5.0]]),
        (41, 4, {"size": [3, 4000], "counts": [0, *runs] if wide_mask[0, 0] else runs}),
        (51, 5, [[0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]]),
        (61, 6, [SQUARE]),
        (71, 7, [SQUARE]),
    ]
    refs = [
        _ref(1, 11, 1, "train", ["the square", "left box"]),
        _ref(2, 12, 1, "val", ["two boxes"]),
        _ref(3, 21, 2, "testA", [NON_ASCII, "  "]),  # an empty sentence is dropped
        _ref(4, 31, 3, "testB", ["transparent thing"]),
        _ref(5, 41, 4, "testAB", ["long strip"]),
        _ref(6, 51, 5, "train", ["one pixel"]),
        _ref(7, 61, 6, "train", ["gone"]),  # image file missing
        _ref(8, 71, 7, "train", ["broken"]),  # image file corrupt
        _ref(9, 11, 1, "train", []),  # no sentences
    ]
    ann_dir = root / "fixture"
    ann_dir.mkdir()
    (ann_dir / "refs(unc).p").write_bytes(_py2_pickle(refs))
    instances = {
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
        "annotations": [
            {"id": a, "image_id": i, "category_id": 1, "segmentation": s, "iscrowd": 0}
            for a, i, s in annotations
        ],
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
    }
    (ann_dir / "instances.json").write_text(json.dumps(instances))
    return {"wide_mask": wide_mask, "grey_mask": grey_mask.astype(bool)}


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("refer")
    return root, write_fixture(root)


def test_python2_pickle_with_non_ascii_loads_as_text(fixture_root: tuple[Path, dict]) -> None:
    root, _ = fixture_root
    raw = (root / "fixture" / "refs(unc).p").read_bytes()
    with pytest.raises(UnicodeDecodeError):  # the plain Python-3 load fails on this file
        pickle.loads(raw)
    refs = load_refs(root / "fixture" / "refs(unc).p")
    assert refs[2]["sentences"][0]["sent"] == NON_ASCII
    assert refs[0]["sentences"][1]["raw"] == "left box"


def test_polygon_mask_matches_pycocotools_and_hand_values(fixture_root: tuple[Path, dict]) -> None:
    root, _ = fixture_root
    refer = Refer(root, "fixture", "unc")
    mask = refer.mask(refer.ref(1))
    assert mask.shape == (20, 30) and mask.dtype == bool
    expected = mask_utils.decode(mask_utils.frPyObjects([SQUARE], 20, 30))[..., 0] > 0
    np.testing.assert_array_equal(mask, expected)
    assert mask[3:12, 3:12].all()  # the square's interior
    assert not mask[13:].any() and not mask[:, 13:].any() and not mask[:2].any()


def test_overlapping_parts_are_united_not_dropped(fixture_root: tuple[Path, dict]) -> None:
    root, _ = fixture_root
    refer = Refer(root, "fixture", "unc")
    mask = refer.mask(refer.ref(2))
    parts = mask_utils.decode(mask_utils.frPyObjects([SQUARE, OVERLAP], 20, 30))  # (H, W, 2)
    summed = parts.sum(axis=2)  # refer's getMask
    assert (summed == 2).sum() > 0  # the parts do overlap
    np.testing.assert_array_equal(mask, summed > 0)  # overlap pixels are foreground
    assert mask[10, 10] and mask[16, 16] and mask[4, 4]


def test_rle_segmentations_decode(fixture_root: tuple[Path, dict]) -> None:
    root, data = fixture_root
    refer = Refer(root, "fixture", "unc")
    np.testing.assert_array_equal(refer.mask(refer.ref(3)), data["grey_mask"])  # compressed
    np.testing.assert_array_equal(refer.mask(refer.ref(5)), data["wide_mask"])  # uncompressed
    with pytest.raises(ValueError, match="differs from the image size"):
        segmentation_to_rle({"size": [5, 5], "counts": "0"}, 16, 16)


def test_image_name_comes_from_instances(fixture_root: tuple[Path, dict]) -> None:
    root, _ = fixture_root
    refer = Refer(root, "fixture", "unc")
    assert refer.image_path(refer.ref(1)) == root / "images/mscoco/images/train2014/rgb.png"
    other = Refer(root, "fixture", "unc", image_dir=root / "elsewhere")
    assert other.image_path(other.ref(1)) == root / "elsewhere" / "rgb.png"


def test_refer_split_semantics(fixture_root: tuple[Path, dict]) -> None:
    root, _ = fixture_root
    refer = Refer(root, "fixture", "unc")
    assert refer.ref_ids("train") == [1, 6, 7, 8, 9]
    assert refer.ref_ids("val") == [2]
    assert refer.ref_ids("testA") == [3, 5]  # testAB counts for testA ...
    assert refer.ref_ids("testB") == [4, 5]  # ... and for testB
    assert refer.ref_ids("test") == [3, 4, 5]
    assert split_matches("testAB", "testAB") and not split_matches("testA", "testAB")
    with pytest.raises(ValueError, match="unknown refer split"):
        split_matches("train", "training")


def test_missing_files_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"refs\(unc\)\.p.*download"):
        Refer(tmp_path, "refcoco", "unc")


def test_prepare_reports_problems_by_id_and_counts(fixture_root: tuple[Path, dict]) -> None:
    root, _ = fixture_root
    with pytest.raises(IncompleteSourceError, match=r"\(train keeps 2 of 5\) lost more"):
        prepare_refer(root, root / "prepared")  # refs 7, 8 and 9 are left out
    (report,) = prepare_refer(root, root / "prepared", max_dropped=1)
    img_dir = root / "images/mscoco/images/train2014"
    assert report.missing_images == {6: str(img_dir / "missing.jpg")}
    assert list(report.unreadable_images) == [7]
    assert report.refs_without_image == [7, 8]
    assert report.refs_without_sentences == [9]
    assert report.empty_sentences == [31]
    # Written: refs 1, 6 (train), 2 (val), 3 (testA), 4 (testB), 5 (testAB).
    counts = {k: (c.refs, c.images, c.sentences) for k, c in report.counts.items()}
    assert counts == {
        "train": (2, 2, 3),
        "val": (1, 1, 1),
        "testA": (1, 1, 1),
        "testB": (1, 1, 1),
        "testAB": (1, 1, 1),
    }
    manifest = json.loads((root / "prepared" / "manifest.json").read_text())
    assert manifest["sources"]["fixture_unc"]["refs_without_sentences"] == [9]


def test_prepared_records_round_trip(fixture_root: tuple[Path, dict]) -> None:
    root, data = fixture_root
    prepare_refer(root, root / "prepared_rt", check_images="full", max_dropped=1)
    table = open_prepared(root / "prepared_rt", "fixture", "unc")
    assert table["ref_id"][:] == [1, 2, 3, 4, 5, 6]
    rows = {r["ref_id"]: r for r in table}
    assert rows[3]["sentences"] == [NON_ASCII] and rows[3]["sent_ids"] == [30]
    assert rows[5]["mask_size"] == [3, 4000] and rows[5]["file_name"] == "wide.png"
    refer = Refer(root, "fixture", "unc")
    for ref_id, row in rows.items():
        rle = {"size": row["mask_size"], "counts": row["mask_counts"].encode("ascii")}
        np.testing.assert_array_equal(mask_utils.decode(rle) > 0, refer.mask(refer.ref(ref_id)))
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        open_prepared(root / "prepared_rt", "refcoco", "unc")


def test_prepared_items_load_every_image_kind(fixture_root: tuple[Path, dict]) -> None:
    """Grey, RGBA, 4000x3 and 1x1 images become items with masks in every frame."""
    root, data = fixture_root
    prepare_refer(root, root / "prepared_items", check_images="none", max_dropped=1)
    table = open_prepared(root / "prepared_items", "fixture", "unc")
    groups = group_by_image(table)
    dataset = ReferImageDataset(
        table, groups, clip_size=32, sam_size=64, text_length=12, with_orig_masks=True
    )
    by_file = {Path(g.image_path).name: k for k, g in enumerate(groups)}
    wide = dataset[by_file["wide.png"]]
    assert wide["orig_size"].tolist() == [3, 4000] and wide["input_size"].tolist() == [1, 64]
    np.testing.assert_array_equal(wide["gt_masks_orig"][0], data["wide_mask"])
    # The strip covers x in [1000, 3000) of 4000 -> SAM-frame columns [16, 48) of row 0 only
    # (h' = 1), so low-res row 0 has 1/4 (one of 4 rows) in columns [4, 12) and nothing else.
    expected = np.zeros((16, 16), dtype=np.float32)
    expected[0, 4:12] = 0.25
    np.testing.assert_allclose(wide["gt_masks"][0, 0].numpy(), expected, atol=1e-6)
    for name in ("grey.png", "rgba.png", "dot.png", "rgb.png"):
        item = dataset[by_file[name]]
        assert item["clip_image"].shape == (3, 32, 32) and item["sam_image"].shape == (3, 64, 64)
        assert item["gt_masks"].shape[1:] == (1, 16, 16)
    grey = dataset[by_file["grey.png"]]
    assert grey["texts"] == [NON_ASCII]
    np.testing.assert_array_equal(grey["gt_masks_orig"][0], data["grey_mask"])


def test_prepare_data_script_prints_counts_table(
    fixture_root: tuple[Path, dict], capsys: pytest.CaptureFixture
) -> None:
    root, _ = fixture_root
    module = load_script("scripts/prepare_data.py")
    module.main(["--root", str(root), "--out", str(root / "prepared_cli"), "--max-dropped", "1"])
    out = capsys.readouterr().out
    assert "fixture      unc      train           2        2         3" in out
    assert "missing images (image_id): 6" in out
    assert "refs left out with no sentence (ref_id): 9" in out


def test_prepare_data_script_offers_the_packages_image_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    module = load_script("scripts/prepare_data.py")
    with pytest.raises(SystemExit) as stop:
        module.main(["--root", str(tmp_path), "--check-images", "quick"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        "prepare_data.py: error: argument --check-images: invalid choice: 'quick' "
        f"(choose from {', '.join(CHECK_IMAGES)})"
    )
    for mode in CHECK_IMAGES:
        assert module.parse_args(["--check-images", mode]).check_images == mode


# --------------------------------------------------------------------------------------------
# A refs file from the internet must not run code
# --------------------------------------------------------------------------------------------
class _RunsACommand:
    """What a crafted refs file holds: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_crafted_refs_file_is_refused_without_running_anything(
    tmp_path: Path, protocol: int, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "ran"
    data_root = tmp_path / "data"
    (data_root / "refcoco").mkdir(parents=True)
    refs = data_root / "refcoco" / "refs(unc).p"
    refs.write_bytes(pickle.dumps([{"ref_id": 1, "payload": _RunsACommand(marker)}], protocol))
    (data_root / "refcoco" / "instances.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": []})
    )
    with pytest.raises(UnsafeRefsError, match=r"posix\.system|os\.system|nt\.system") as err:
        load_refs(refs)
    assert "could run code" in str(err.value) and "download it again" in str(err.value)
    assert not marker.exists()
    # The preparation script stops with one line, before anything is written.
    module = load_script("scripts/prepare_data.py")
    with pytest.raises(SystemExit) as stop:
        module.main(["--root", str(data_root), "--out", str(tmp_path / "prepared")])
    assert stop.value.code == 1 and not marker.exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("prepare_data.py: error: ") and "not a plain refs file" in lines[-1]
    assert not (tmp_path / "prepared" / "refcoco_unc").exists()


def test_plain_refs_pickles_of_every_protocol_load(tmp_path: Path) -> None:
    sentences = [{"sent": "left", "tokens": ("a",)}]
    refs = [{"ref_id": 1, "sent_ids": [3, 4], "sentences": sentences, "split": "train",
             "score": 0.5, "flags": {1, 2}, "none": None, "ok": True}]  # fmt: skip
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"refs{protocol}.p"
        path.write_bytes(pickle.dumps(refs, protocol))
        assert load_refs(path) == refs, protocol
