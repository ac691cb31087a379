"""A dataset that comes out empty or incomplete is named before the long wait: prepare_data.py
stops in one line when a split would lose its refs (images not where the refer layout puts them),
training and evaluation refuse an empty prepared split in one line, and the counts table says
whether a prepared copy matches the published counts. Also: where the data comes from is written
in prepare_data.py --help and README.md, from the same facts."""

from __future__ import annotations

import re
import runpy
import shutil
from pathlib import Path

import pytest

from prompt_ris.data import refer
from prompt_ris.data.prepare import (
    DEFAULT_MAX_DROPPED,
    IncompleteSourceError,
    format_counts_table,
    prepare_refer,
)
from prompt_ris.data.refer import REFER_IMAGE_DIR
from prompt_ris.data.splits import PUBLISHED_COUNTS, load_split
from prompt_ris.engine.preflight import split_problems
from prompt_ris.models import PromptRIS
from prompt_ris.miniature.synthetic import SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY, generate_synthetic
from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
NO_WEIGHTS = ["model.clip.pretrained=null", "model.sam.checkpoint=null"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic refer folder (10 images: 7 train, 1 val, 1 testA, 1 testB)."""
    root = tmp_path_factory.mktemp("refer")
    generate_synthetic(root, num_images=10, seed=0)
    return root


def copy_of(synthetic: Path, tmp_path: Path) -> Path:
    root = tmp_path / "refer"
    shutil.copytree(synthetic, root)
    return root


def run_prepare(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of prepare_data.py."""
    module = load_script("scripts/prepare_data.py")
    with pytest.raises(SystemExit) as stop:
        module.main(args)
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def test_missing_images_stop_preparation_in_one_line_naming_folder_and_layout(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_of(synthetic, tmp_path)
    image_dir = root / REFER_IMAGE_DIR
    for image in image_dir.iterdir():  # the refs are there, the images are not
        image.unlink()
    out = tmp_path / "prepared"
    code, lines = run_prepare(["--root", str(root), "--out", str(out)], capsys)
    assert code == 1
    errors = [line for line in lines if line.startswith("prepare_data.py: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    error = errors[0]
    assert "synthetic(unc) was not written" in error
    for split in ("train", "val", "testA", "testB"):
        assert re.search(rf"\b{split} keeps 0 of \d+", error), (split, error)
    assert f"images are not in '{image_dir}'" in error
    assert f"'{image_dir}/COCO_train2014_<12-digit id>.jpg'" in error  # the layout expected
    assert "http://images.cocodataset.org/zips/train2014.zip (82,783 images)" in error
    assert "--image-dir" in error and "give --max-dropped 1 to write what is left" in error
    assert not (out / "synthetic_unc").exists()  # nothing empty is left for training to find


def test_a_missing_image_folder_is_named_before_any_image_is_read(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_of(synthetic, tmp_path)
    shutil.rmtree(root / "images")
    code, lines = run_prepare(["--root", str(root), "--out", str(tmp_path / "p")], capsys)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(
        f"prepare_data.py: error: image folder '{root / REFER_IMAGE_DIR}' does not exist; the "
        "refer layout expects COCO train2014 as"
    )
    elsewhere = tmp_path / "coco"
    code, lines = run_prepare(
        ["--root", str(root), "--out", str(tmp_path / "p"), "--image-dir", str(elsewhere)], capsys
    )
    assert code == 1 and lines == [lines[0]]
    assert lines[0].startswith(f"prepare_data.py: error: --image-dir '{elsewhere}' does not exist")


def test_losing_more_than_the_allowed_share_stops_and_the_flag_allows_it(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_of(synthetic, tmp_path)
    (root / REFER_IMAGE_DIR / "synthetic_000001.png").unlink()  # one train image of 7
    with pytest.raises(IncompleteSourceError, match=r"train keeps \d+ of \d+\)") as err:
        prepare_refer(root, tmp_path / "p")
    message = str(err.value)
    assert "\n" not in message and "val keeps" not in message  # only the split that lost refs
    allow = float(re.search(r"give --max-dropped ([\d.]+) to write", message).group(1))
    assert DEFAULT_MAX_DROPPED < allow < 1
    kept, total = map(int, re.search(r"train keeps (\d+) of (\d+)", message).groups())
    assert allow - 0.01 < (total - kept) / total <= allow  # the share lost, rounded up
    (report,) = prepare_refer(root, tmp_path / "p", max_dropped=allow)
    assert report.counts["train"].refs == kept and report.refs_in_file["train"] == total
    with pytest.raises(ValueError, match="give a share from 0 to 1"):
        prepare_refer(root, tmp_path / "p", max_dropped=5)
    module = load_script("scripts/prepare_data.py")
    assert module.parse_args([]).max_dropped == DEFAULT_MAX_DROPPED
    code, lines = run_prepare(["--max-dropped", "1.5"], capsys)
    assert code == 2 and "argument --max-dropped: invalid share value: '1.5'" in lines[-1]
    module.main(["--root", str(root), "--out", str(tmp_path / "q"), "--max-dropped", str(allow)])
    assert f"train    {kept:>8}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def empty_prepared(synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What --max-dropped 1 writes from a refer folder without its images: no refs at all."""
    root = tmp_path_factory.mktemp("no_images")
    shutil.copytree(synthetic / SYNTHETIC_DATASET, root / SYNTHETIC_DATASET)
    (root / REFER_IMAGE_DIR).mkdir(parents=True)
    (report,) = prepare_refer(root, root / "prepared", max_dropped=1)
    assert report.num_refs == 0
    return root / "prepared"


def test_train_refuses_an_empty_prepared_split_in_one_line(
    empty_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = runpy.run_path(str(ROOT / "scripts" / "train.py"))["main"]
    with pytest.raises(SystemExit) as stop:
        train([
            "--config", str(ROOT / "configs" / "tiny_synthetic.yaml"), *NO_WEIGHTS,
            f"data.prepared={empty_prepared}", f"train.output_dir={tmp_path / 'run'}",
            "train.tracker=none",
        ])  # fmt: skip
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("train.py: ") for line in lines), lines
    problems = lines[:-1]
    assert {p.split(": ")[2].split("=")[0] for p in problems} == {"data.train", "data.val"}
    for problem in problems:
        assert f"prepared data for synthetic(unc) at '{empty_prepared}" in problem
        assert "holds no refs" in problem and "prepare_data.py again" in problem
    assert lines[-1] == "train.py: 2 problem(s) found before building the model"


def test_evaluation_refuses_an_empty_prepared_split_in_one_line(
    empty_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    tiny_model: PromptRIS,
) -> None:  # fmt: skip
    tiny_model.save_pretrained(tmp_path / "ckpt")
    evaluate = load_script("evaluation/evaluate.py")
    with pytest.raises(SystemExit) as stop:
        evaluate.main([
            "--checkpoint", str(tmp_path / "ckpt"), "--splits", "synthetic:val",
            "--output", str(tmp_path / "out"), f"data.prepared={empty_prepared}",
        ])  # fmt: skip
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("evaluate.py: ") for line in lines), lines
    assert lines[0].startswith("evaluate.py: error: --splits=synthetic:val: prepared data for ")
    assert "holds no refs" in lines[0]
    assert lines[1:] == ["evaluate.py: 1 problem(s) found before loading the model"]


def test_a_split_with_no_refs_names_the_splits_its_source_holds(synthetic: Path) -> None:
    prepared = synthetic / "prepared_all"
    prepare_refer(synthetic, prepared, [(SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY)])
    assert len(load_split(prepared, "synthetic:val")) > 0
    (problem,) = split_problems(prepared, [("--splits", "synthetic:testC")])
    assert problem == (
        f"--splits=synthetic:testC: split 'synthetic:testC' is empty: synthetic(unc) in "
        f"'{prepared}' has no 'testC' refs (it holds testA, testB, train, val); name one of "
        "those, or prepare the testC refs again with scripts/prepare_data.py (its manifest.json "
        "lists what was left out)"
    )


def test_counts_table_says_which_splits_match_the_published_counts(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (report,) = prepare_refer(synthetic, tmp_path / "p", [(SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY)])
    train, val = report.counts["train"], report.counts["val"]
    published = {
        ("synthetic", "unc"): {
            "train": (train.refs, train.images, train.sentences),
            "val": (val.refs, val.images, val.sentences + 2),
            "testC": (5, 1, 9),  # published, but nothing prepared
        }
    }
    lines = format_counts_table([report], published).splitlines()
    assert lines[0].endswith("  published")
    rows = [line for line in lines[1:] if line.startswith("synthetic ")]
    status = {row.split()[2]: row.split("  ")[-1] for row in rows}
    assert status["train"] == "complete"
    assert status["val"] == "incomplete: sents -2"
    assert status["testC"] == "incomplete: refs -5, images -1, sents -9"
    assert status["testA"].strip() == "-"  # no published counts to compare with
    assert lines[-1] == (
        "incomplete: 2 of 3 splits differ from the published counts (synthetic(unc) val, "
        "synthetic(unc) testC); README.md, section 'Data', says where a complete copy comes from"
    )
    matching = {("synthetic", "unc"): {"train": published[("synthetic", "unc")]["train"]}}
    assert format_counts_table([report], matching).splitlines()[-1] == (
        "complete: all 1 splits match the published counts"
    )
    assert "published" not in format_counts_table([report])  # without counts to compare with
    # prepare_data.py compares a copy named refcoco(unc) with the published RefCOCO counts.
    root = tmp_path / "named_refcoco"
    shutil.copytree(synthetic / SYNTHETIC_DATASET, root / "refcoco")
    shutil.copytree(synthetic / "images", root / "images")
    load_script("scripts/prepare_data.py").main(["--root", str(root), "--out", str(root / "p")])
    out = capsys.readouterr().out
    expected = PUBLISHED_COUNTS[("refcoco", "unc")]
    short = expected["train"][0] - train.refs
    assert re.search(rf"refcoco +unc +train .*  incomplete: refs -{short:,}, images ", out)
    assert "incomplete: 4 of 4 splits differ from the published counts" in out


def test_where_the_data_comes_from_is_in_help_readme_and_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    module = load_script("scripts/prepare_data.py")
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    help_text = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    data = readme[readme.index("### Data") : readme.index("### Training")]
    facts = [
        refer.REFER_PROJECT,
        *(refer.REFER_ZIP_URL.format(dataset=d) for d in ("refcoco", "refcoco+", "refcocog")),
        refer.COCO_TRAIN2014_URL,
        f"{refer.COCO_TRAIN2014_IMAGES:,}",
        "refs(umd).p",
        "refs(google).p",
    ]
    for fact in facts:
        assert fact in data, fact
    for fact in facts[:2] + facts[4:]:
        assert fact in help_text, fact
    # The README's table of counts is the one the check compares with.
    for (dataset, split_by), splits in PUBLISHED_COUNTS.items():
        for split, (refs, images, sentences) in splits.items():
            row = f"| {dataset} | {split_by} | {split} | {refs:,} | {images:,} | {sentences:,} |"
            assert row in data, row
    zips = refer.REFER_ZIP_URL.format(dataset="<dataset>")
    with pytest.raises(FileNotFoundError, match=re.escape(zips)):  # the error names the source
        prepare_refer(ROOT / "docs", ROOT / "nowhere")
