"""``prompt-ris predict``: files written, batch modes, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prompt_ris.cli import main
from prompt_ris.config import load_config
from prompt_ris.metrics import DEFAULT_THRESHOLD
from prompt_ris.models import PromptRIS
from prompt_ris.prompt_switches import PromptSwitches
from prompt_ris.models.pretrained import save_pretrained
from prompt_ris.predictor import Predictor
from tiny_random import TINY_RANDOM

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint and a few images of odd sizes."""
    root = tmp_path_factory.mktemp("cli")
    cfg = load_config({"model": TINY_RANDOM})
    torch.manual_seed(0)
    save_pretrained(PromptRIS.from_config(cfg.model), root / "ckpt", config=cfg)
    rng = np.random.default_rng(0)
    photos = root / "photos"
    photos.mkdir()
    for name, (h, w) in {"a.png": (31, 47), "b.jpg": (40, 22)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / name)
    return root


def expected_mask(
    workdir: Path,
    image: Path,
    expression: str,
    switches: PromptSwitches | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> np.ndarray:
    """The mask the Python API gives for the same checkpoint, image and expression."""
    model = PromptRIS.from_pretrained(workdir / "ckpt")
    predictor = Predictor(model, device="cpu", threshold=threshold)
    predictor.set_image(image)
    return predictor.predict(expression, switches=switches).masks[0]


def read_mask(path: Path) -> np.ndarray:
    mask = np.asarray(Image.open(path))
    assert mask.ndim == 2 and set(np.unique(mask)) <= {0, 255}
    return mask == 255


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prompt-ris: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_single_image_writes_mask_and_overlay(workdir: Path, tmp_path: Path) -> None:
    image = workdir / "photos" / "a.png"
    argv = ["predict", "--checkpoint", str(workdir / "ckpt"), "--image", str(image)]
    argv += ["--text", "the man on the left", "--out", str(tmp_path / "overlay.png")]
    assert main(argv + ["--device", "cpu"]) == 0

    mask = read_mask(tmp_path / "overlay_mask.png")
    np.testing.assert_array_equal(mask, expected_mask(workdir, image, "the man on the left"))
    overlay = Image.open(tmp_path / "overlay.png")
    scale = 384 / 31  # the shorter side of each panel (image, coarse + point, final) is 384
    assert overlay.mode == "RGB" and overlay.size[0] == 3 * round(47 * scale)


def test_threshold_default_and_given(workdir: Path, tmp_path: Path) -> None:
    image = workdir / "photos" / "a.png"
    argv = ["predict", "--checkpoint", str(workdir / "ckpt"), "--image", str(image)]
    argv += ["--text", "the cup", "--device", "cpu"]
    assert main(argv + ["--out", str(tmp_path / "default.png")]) == 0
    assert main(argv + ["--out", str(tmp_path / "low.png"), "--threshold", "0.1"]) == 0
    default, low = read_mask(tmp_path / "default_mask.png"), read_mask(tmp_path / "low_mask.png")
    np.testing.assert_array_equal(default, expected_mask(workdir, image, "the cup"))
    np.testing.assert_array_equal(low, expected_mask(workdir, image, "the cup", threshold=0.1))
    assert low.sum() > default.sum()  # the threshold reached the predictor


def test_switches_and_several_texts(workdir: Path, tmp_path: Path) -> None:
    image = workdir / "photos" / "b.jpg"
    argv = ["predict", "--checkpoint", str(workdir / "ckpt"), "--image", str(image)]
    argv += ["--text", "the dog", "--text", "a cat", "--out", str(tmp_path / "o.png")]
    assert main(argv + ["--no-text", "--no-point", "--dtype", "fp32", "--device", "cpu"]) == 0
    switches = PromptSwitches.parse("mask")
    for k, text in enumerate(["the dog", "a cat"]):
        want = expected_mask(workdir, image, text, switches)
        np.testing.assert_array_equal(read_mask(tmp_path / f"o_{k}_mask.png"), want)
        assert (tmp_path / f"o_{k}.png").is_file()


def test_folder_mode_goes_on_past_a_corrupt_image(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.jpg"):
        (photos / name).write_bytes((workdir / "photos" / name).read_bytes())
    (photos / "broken.jpg").write_bytes(b"not an image")
    (photos / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(workdir / "ckpt"), "--image", str(photos)]
    assert main(argv + ["--text", "the dog", "--out-dir", str(out), "--device", "cpu"]) == 1

    np.testing.assert_array_equal(
        read_mask(out / "a_mask.png"), expected_mask(workdir, photos / "a.png", "the dog")
    )
    assert (out / "b_overlay.png").is_file() and read_mask(out / "b_mask.png").shape == (40, 22)
    assert not (out / "broken_mask.png").exists()
    records = json.loads((out / "predictions.json").read_text())
    assert [Path(r["image"]).name for r in records] == ["a.png", "b.jpg", "broken.jpg"]
    assert "error" in records[2] and "mask" in records[0]
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"prompt-ris: error: cannot read image '{photos / 'broken.jpg'}'")
    assert errors[0].endswith("the file is corrupt or not an image: replace it; skipped this "
                              "image, the others are predicted")  # fmt: skip
    assert errors[1] == (
        "prompt-ris: error: 1 of 3 expressions failed (see above and predictions.json); the "
        "other 2 were predicted"
    )


def test_json_batch_mode(workdir: Path, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs" / "batch.json"
    jobs.parent.mkdir()
    (jobs.parent / "img.png").write_bytes((workdir / "photos" / "a.png").read_bytes())
    entries = [
        {"image": "img.png", "text": "the dog"},
        {"image": str(workdir / "photos" / "b.jpg"), "text": ["a cat", "the bench"]},
        {"image": "img.png", "text": "the man"},
    ]
    jobs.write_text(json.dumps(entries))
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(workdir / "ckpt"), "--batch", str(jobs)]
    assert main(argv + ["--out-dir", str(out), "--device", "cpu"]) == 0

    image = jobs.parent / "img.png"  # relative to the JSON file's folder
    for name, text in (("0000_0_img", "the dog"), ("0002_0_img", "the man")):
        np.testing.assert_array_equal(
            read_mask(out / f"{name}_mask.png"), expected_mask(workdir, image, text)
        )
    for name in ("0001_0_b", "0001_1_b"):
        assert read_mask(out / f"{name}_mask.png").shape == (40, 22)
    records = json.loads((out / "predictions.json").read_text())
    assert sorted(r["text"] for r in records) == ["a cat", "the bench", "the dog", "the man"]


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--text", "   "], ["expression 0 is empty"]),
        (["--text", "x", "--image", "missing.png"], ["missing.png", "does not exist"]),
        (["--text", "x", "--image", "CORRUPT"], ["corrupt.jpg", "cannot read image", "replace it"]),
        (["--text", "x", "--checkpoint", "nowhere"], ["nowhere", "not found", "train.py"]),
        (
            ["--text", "x", "--checkpoint", "CKPT/config.json"],
            ["config.json' is a file of the checkpoint, not the checkpoint", "the folder 'CKPT'"],
        ),
        (["--text", "x", "--checkpoint", "CORRUPT"], ["corrupt.jpg' is not a checkpoint"]),
        (["--text", "x", "--device", "gpu"], ["--device gpu: 'gpu' is not a device name"]),
        (["--text", "x", "--out-dir", "d"], ["either --out FILE or --out-dir DIR"]),
    ],
)
def test_bad_input_exits_with_one_line(
    workdir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    fragments: list[str],
) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8garbage")
    argv = ["predict", "--checkpoint", str(workdir / "ckpt"), "--image"]
    argv += [str(workdir / "photos" / "a.png"), "--out", str(tmp_path / "o.png")]
    placeholders = {"CORRUPT": str(corrupt), "CKPT": str(workdir / "ckpt")}
    for name, value in placeholders.items():
        extra = [a.replace(name, value) for a in extra]  # later options win
        fragments = [f.replace(name, value) for f in fragments]
    assert main(argv + extra) == 1
    assert_one_line_error(capsys.readouterr().err, *fragments)
    assert not (tmp_path / "o.png").exists()


def test_long_expression_warns_on_one_line(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predict", "--checkpoint", str(workdir / "ckpt"), "--device", "cpu", "--image"]
    argv += [str(workdir / "photos" / "a.png"), "--out", str(tmp_path / "o.png")]
    assert main(argv + ["--text", "very " * 40 + "tall man"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prompt-ris: warning: ") and "was cut" in err[0]
    assert (tmp_path / "o_mask.png").is_file()


def test_missing_base_weights_then_override(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A checkpoint whose config names a SAM file that is not there: the tensors SAM's file
    # provides (e.g. its positional-encoding buffer) are not stored in the checkpoint.
    cfg = load_config({"model": TINY_RANDOM})
    model = PromptRIS.from_config(cfg.model)
    sam_state = {k[4:]: v for k, v in model.state_dict().items() if k.startswith("sam.")}
    torch.save(sam_state, tmp_path / "real_sam.pth")  # segment_anything's state-dict format
    cfg.model.sam.checkpoint = str(tmp_path / "sam_b.pth")
    save_pretrained(model, tmp_path / "ckpt", config=cfg)
    argv = ["predict", "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu", "--text", "x"]
    argv += ["--image", str(workdir / "photos" / "a.png"), "--out", str(tmp_path / "o.png")]
    assert main(argv) == 1
    assert_one_line_error(capsys.readouterr().err, "sam_b.pth", "not found")
    assert main(argv + ["--sam-weights", str(tmp_path / "real_sam.pth")]) == 0


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    argv = ["predict", "--checkpoint", str(tmp_path / "none"), "--image", "x.png", "--text", "x"]
    argv += ["--out", str(tmp_path / "o.png")]
    done = subprocess.run(
        [sys.executable, "-m", "prompt_ris", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 1
    assert_one_line_error(done.stderr, "x.png", "does not exist")


def test_cuda_without_a_gpu_is_one_line_before_loading(workdir: Path, tmp_path: Path) -> None:
    argv = ["predict", "--checkpoint", str(tmp_path / "not_read"), "--text", "x", "--image"]
    argv += [str(workdir / "photos" / "a.png"), "--out", str(tmp_path / "o.png")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a machine without a CUDA device
    done = subprocess.run(
        [sys.executable, "-m", "prompt_ris", *argv, "--device", "cuda"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    want = "prompt-ris: error: --device cuda: no CUDA device here; use --device cpu\n"
    assert done.stderr == want


def test_a_device_that_is_not_here_is_refused_by_the_predictor() -> None:
    model = PromptRIS.from_config(load_config({"model": TINY_RANDOM}).model)
    with pytest.raises(ValueError, match=r"^device 'cuda:99': .*; use device='cpu'$"):
        Predictor(model, device="cuda:99")


# --------------------------------------------------------------------------------------------
# Arguments refused before loading, outputs that never collide, NaN, export
# --------------------------------------------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the model is loaded: these errors must come first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(PromptRIS, "from_pretrained", refuse)


@pytest.mark.parametrize("threshold", ["2", "1", "0", "-0.5", "nan"])
def test_threshold_outside_0_1_is_refused_before_loading(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_loading: None,
    threshold: str,
) -> None:  # fmt: skip
    argv = ["predict", "--checkpoint", str(workdir / "ckpt"), "--image"]
    argv += [str(workdir / "photos" / "a.png"), "--text", "x", "--out", str(tmp_path / "o.png")]
    assert main(argv + ["--threshold", threshold]) == 1
    assert_one_line_error(capsys.readouterr().err, f"--threshold {float(threshold)}", "(0, 1)")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("outputs", "fragments"),
    [
        (["--out", "out/noext"], ["out/noext", "image extension"]),
        (["--out", "o.png", "--mask-out", "o.png"], ["two outputs", "o.png"]),
        (["--out", "o.png", "--mask-out", "m.jpg"], ["m.jpg", "lossless"]),
        (["--out", "INPUT"], ["is an input image"]),
    ],
)
def test_bad_output_files_are_refused_before_anything_is_written(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_loading: None,
    outputs: list[str], fragments: list[str],
) -> None:  # fmt: skip
    image = tmp_path / "in.png"
    image.write_bytes((workdir / "photos" / "a.png").read_bytes())
    paths = [str(image) if a == "INPUT" else a if a.startswith("-") else str(tmp_path / a)
             for a in outputs]  # fmt: skip
    argv = ["predict", "--checkpoint", str(workdir / "ckpt"), "--image", str(image)]
    assert main([*argv, "--text", "x", *paths]) == 1
    assert_one_line_error(capsys.readouterr().err, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]  # nothing half-written


def test_folder_images_sharing_a_name_write_separate_files(workdir: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for name, (h, w) in {"a.jpg": (20, 30), "a.png": (33, 17), "b.png": (12, 12)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / name)
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(workdir / "ckpt"), "--image", str(photos)]
    assert main(argv + ["--text", "the dog", "--out-dir", str(out), "--device", "cpu"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == [
        "a_jpg_mask.png", "a_jpg_overlay.png", "a_png_mask.png", "a_png_overlay.png",
        "b_mask.png", "b_overlay.png", "predictions.json",
    ]  # fmt: skip
    for stem, image in (("a_jpg", "a.jpg"), ("a_png", "a.png")):
        np.testing.assert_array_equal(
            read_mask(out / f"{stem}_mask.png"), expected_mask(workdir, photos / image, "the dog")
        )
    records = json.loads((out / "predictions.json").read_text())
    assert len({r["mask"] for r in records}) == 3


def test_non_finite_weights_end_with_one_line(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config({"model": TINY_RANDOM})
    torch.manual_seed(0)
    model = PromptRIS.from_config(cfg.model)
    with torch.no_grad():
        model.decoder.logit_bias.fill_(float("inf"))
    save_pretrained(model, tmp_path / "ckpt", config=cfg)
    argv = ["predict", "--checkpoint", str(tmp_path / "ckpt"), "--image"]
    argv += [str(workdir / "photos" / "a.png"), "--text", "x", "--out", str(tmp_path / "o.png")]
    assert main(argv) == 1
    assert_one_line_error(capsys.readouterr().err, "NaN or infinite", "decoder.logit_bias")
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "o_mask.png").exists()


def _frozen_checkpoint_on_weights_folder(folder: Path, out: Path) -> None:
    """A learned-only checkpoint whose frozen base CLIP and SAM are files of the weights folder,
    named by their real file names (tiny sizes, real formats)."""
    torch.manual_seed(0)
    base = PromptRIS.from_config(load_config({"model": TINY_RANDOM}).model)
    folder.mkdir(parents=True)
    torch.save(base.clip.clip.state_dict(), folder / "clip_vit_b16_openai.pt")
    torch.save(
        {f"{part}.{k}": v for part in ("image_encoder", "prompt_encoder", "mask_decoder")
         for k, v in getattr(base.sam, part).state_dict().items()},
        folder / "sam_vit_b_01ec64.pth",
    )  # fmt: skip
    frozen = {"freeze_image_encoder": True, "freeze_prompt_encoder": True}
    model_cfg = {
        "preset": "tiny",
        "clip": {"pretrained": "clip_vit_b16_openai.pt", "freeze": True},
        "sam": {"checkpoint": "sam_vit_b_01ec64.pth", "freeze_mask_decoder": True, **frozen},
    }
    cfg = load_config({"model": model_cfg})
    torch.manual_seed(1)
    save_pretrained(PromptRIS.from_config(cfg.model), out, config=cfg)


def test_export_self_contained_loads_where_no_base_weights_are(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    weights, empty = tmp_path / "weights", tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PROMPT_RIS_WEIGHTS", str(weights))
    _frozen_checkpoint_on_weights_folder(weights, tmp_path / "run" / "best")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither the checkpoint's nor the weights' folder
    image = workdir / "photos" / "a.png"
    predict = ["predict", "--image", str(image), "--text", "the dog", "--device", "cpu"]
    assert main([*predict, "--checkpoint", str(tmp_path / "run" / "best"), "--out", "a.png"]) == 0
    want = read_mask(elsewhere / "a_mask.png")

    portable, named = tmp_path / "portable", tmp_path / "named"
    export = ["export", "--checkpoint", str(tmp_path / "run" / "best")]
    assert main([*export, "--out", str(portable), "--self-contained"]) == 0
    assert main([*export, "--out", str(named)]) == 0
    assert "self-contained" in capsys.readouterr().out
    meta = json.loads((named / "config.json").read_text())
    assert meta["base_weights"]["sam_checkpoint"] == "sam_vit_b_01ec64.pth"  # by file name
    assert json.loads((portable / "config.json").read_text())["self_contained"] is True
    assert main([*export, "--out", str(portable)]) == 1  # never over an existing folder
    assert_one_line_error(capsys.readouterr().err, "already exists")

    monkeypatch.setenv("PROMPT_RIS_WEIGHTS", str(empty))  # another machine: no base weights
    assert main([*predict, "--checkpoint", str(named), "--out", "b.png"]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # both missing files, one line each
    assert len(err) == 2 and "clip_vit_b16_openai.pt" in err[0] and "sam_vit_b_01ec64" in err[1]
    assert all(line.startswith("prompt-ris: error: ") and str(empty) in line for line in err)
    assert main([*predict, "--checkpoint", str(portable), "--out", "c.png"]) == 0
    np.testing.assert_array_equal(read_mask(elsewhere / "c_mask.png"), want)


def _sam_file(model: PromptRIS, path: Path) -> None:
    """Write the model's SAM weights as segment_anything's state-dict file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k[4:]: v for k, v in model.state_dict().items() if k.startswith("sam.")}, path)


def test_relative_base_weights_resolve_from_the_checkpoint_never_the_current_directory(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A checkpoint trained in a project names its base weights relative to the project's
    folder; it loads from any working directory, and a file at the same relative path under the
    current directory is never taken instead."""
    cfg = load_config({"model": TINY_RANDOM})
    torch.manual_seed(0)
    model = PromptRIS.from_config(cfg.model)
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    _sam_file(model, project / "weights" / "sam.pth")
    cfg.model.sam.checkpoint = "weights/sam.pth"  # relative to the folder training ran in
    checkpoint = project / "runs" / "r" / "best"
    save_pretrained(model, checkpoint, config=cfg)
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = PromptRIS.from_pretrained(checkpoint)
    assert loaded.config.model.sam.checkpoint == str(project / "weights" / "sam.pth")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    predict = ["predict", "--image", str(workdir / "photos" / "a.png"), "--text", "the dog"]
    predict += ["--device", "cpu", "--checkpoint", str(checkpoint)]
    assert main([*predict, "--out", "a.png"]) == 0
    # The project's file gone, the same relative path under the current directory is not used.
    (project / "weights" / "sam.pth").rename(elsewhere / "weights.pth")
    _sam_file(model, elsewhere / "weights" / "sam.pth")
    assert main([*predict, "--out", "b.png"]) == 1
    assert_one_line_error(
        capsys.readouterr().err, f"'{checkpoint / 'weights' / 'sam.pth'}' not found", "--sam-weights"
    )


def test_tiny_preset_checkpoints_load_from_any_folder(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny preset names its committed foundations relative to the repository; its
    checkpoints load and predict from another folder."""
    cfg = load_config({"model": {"preset": "tiny"}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    torch.manual_seed(0)
    model = PromptRIS.from_config(cfg)  # the preset's relative paths, from another folder
    assert cfg.model.clip.pretrained == "checkpoints/tiny_synthetic/clip_tiny_synthetic.pt"
    model.save_pretrained(tmp_path / "run" / "best")
    loaded = PromptRIS.from_pretrained(tmp_path / "run" / "best")
    committed = REPO / "checkpoints" / "tiny_synthetic"
    assert loaded.config.model.sam.checkpoint == str(committed / "sam_tiny_synthetic.pth")
    assert loaded.config.model.clip.pretrained == str(committed / "clip_tiny_synthetic.pt")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    predict = ["predict", "--image", str(workdir / "photos" / "a.png"), "--text", "the red star"]
    predict += ["--device", "cpu", "--checkpoint", str(tmp_path / "run" / "best")]
    assert main([*predict, "--out", "a.png"]) == 0
    assert (elsewhere / "a_mask.png").is_file()
