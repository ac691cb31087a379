"""Evaluation of named splits: ``prompt_ris.evaluate`` from Python (sub-splits scored from the
whole split, the checkpoint's own prompt switches by default) and evaluation/evaluate.py (tables,
masks and overlays written, the random baseline, the prompt ablation, and (slow) a 2-process run
equal to a 1-process one)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prompt_ris.config import Config, load_config
from prompt_ris.data.prepare import prepare_refer
from prompt_ris.data.rle import decode_rle
from prompt_ris.data.splits import load_split
from prompt_ris.metrics import summarize
from prompt_ris.miniature.synthetic import SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY, generate_synthetic
from prompt_ris.models import PromptRIS
from tiny_random import TINY_RANDOM_ARGS
from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


compare = load_script("evaluation/compare.py")


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic refer data (prepared) and a saved tiny checkpoint."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, num_images=20, seed=0)
    prepare_refer(
        root, root / "prepared", [(SYNTHETIC_DATASET, SYNTHETIC_SPLIT_BY)], check_images="none"
    )
    torch.manual_seed(0)
    model = PromptRIS.from_config(load_config(overrides=TINY_RANDOM_ARGS).model)
    model.save_pretrained(root / "ckpt")
    return {"prepared": root / "prepared", "checkpoint": root / "ckpt", "out": root / "eval"}


def test_evaluate_cli_writes_tables_masks_and_overlays(synthetic_run: dict[str, Path]) -> None:
    evaluate_cli = load_script("evaluation/evaluate.py")
    splits = ["synthetic:val", "synthetic:testB"]
    out = synthetic_run["out"]
    results = evaluate_cli.main(
        [
            "--checkpoint",
            str(synthetic_run["checkpoint"]),
            "--splits",
            ",".join(splits),
            "--no-point",
            "--save-masks",
            "--overlays",
            "2",
            "--overlay-order",
            "worst",
            "--output",
            str(out),
            f"data.prepared={synthetic_run['prepared']}",
            "eval.max_expressions=8",
            "data.num_workers=0",
        ]
    )
    assert results["switches"] == "mask + text"
    assert list(results["splits"]) == splits
    saved = json.loads((out / "results.json").read_text())
    assert saved["splits"] == results["splits"]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    masks = [json.loads(line) for line in (out / "masks.jsonl").read_text().splitlines()]
    for split in splits:
        table = load_split(synthetic_run["prepared"], split)
        mine = [r for r in records if r["split"] == split]
        assert {"coarse", "final", "random"} == set(results["splits"][split])
        assert results["splits"][split]["final"]["num_expressions"] == len(mine)
        # Every sentence of every reference of the evaluated images, each once.
        images = {r["image_id"] for r in mine}
        expected = {
            (int(ref), int(s))
            for ref, img, sents in zip(
                table["ref_id"][:], table["image_id"][:], table["sent_ids"][:]
            )
            if img in images
            for s in sents
        }
        assert {(r["ref_id"], r["sent_id"]) for r in mine} == expected
        assert summarize(mine, "final")["mIoU"] == results["splits"][split]["final"]["mIoU"]
        assert len(list((out / "overlays" / split.replace(":", "_")).glob("*.png"))) == 2
    first = masks[0]
    h, w = decode_rle(first["final_rle"]).shape
    assert decode_rle(first["coarse_rle"]).shape == (h, w) and len(masks) == len(records)
    assert "| mIoU | final (SAM) |" in (out / "results.md").read_text()
    # The results file compares with the paper's (no shared split here: nothing in common).
    assert "no metric is reported by both" in compare.main(
        [str(out / "results.json"), str(ROOT / "evaluation" / "paper_results.json")]
    )


def _data_config(synthetic_run: dict[str, Path]) -> Config:
    prepared = synthetic_run["prepared"]
    return load_config(overrides=[f"data.prepared={prepared}", "data.num_workers=0"])


def test_evaluate_from_python_scores_sub_splits_from_the_whole_split(
    synthetic_run: dict[str, Path],
) -> None:
    from prompt_ris import evaluate

    cfg = _data_config(synthetic_run)
    parts = ["synthetic:test_seen", "synthetic:test_unseen"]
    sets = ["mask + point + text", "mask + point"]
    results = evaluate(synthetic_run["checkpoint"], ["synthetic:test", *parts], sets, config=cfg)
    whole = results.records["synthetic:test"]
    assert results.complete and list(results.splits) == ["synthetic:test", *parts]
    assert results.passes.encoded == len(whole) and results.passes.decoded == 2 * len(whole)
    assert sum(len(results.records[p]) for p in parts) == len(whole)
    for part in parts:
        alone = evaluate(synthetic_run["checkpoint"], [part], sets, config=cfg)
        assert alone.passes.encoded == len(alone.records[part]) > 0
        assert results.records[part] == alone.records[part]
        assert all(results.metrics[s][part] == alone.metrics[s][part] for s in sets)
        assert set(results.splits[part]) == {"coarse", "final", "random"}
    table = results.table()
    assert "| mask + point | synthetic:test_unseen |" in table and "random object" in table
    # The whole split named last: the parts still come from it, in the order asked for.
    last = evaluate(synthetic_run["checkpoint"], [*parts, "synthetic:test"], sets, config=cfg)
    assert list(last.splits) == [*parts, "synthetic:test"]
    assert last.passes.encoded == len(whole) and last.metrics == results.metrics
    by_category = results.by_group("synthetic:test", lambda r: r["category_id"], ["final"])
    counts = [m["final"]["num_expressions"] for m in by_category.values()]
    assert len(by_category) > 1 and sum(counts) == len(whole)


def test_evaluation_uses_the_checkpoints_own_switches(
    synthetic_run: dict[str, Path], tmp_path: Path
) -> None:
    """A model trained with the text prompt off is evaluated with it off unless asked."""
    from prompt_ris import PromptRIS, evaluate

    model = PromptRIS.from_pretrained(synthetic_run["checkpoint"])
    model.config.model.prompts.switches = "mask + point"
    no_text = PromptRIS.from_config(model.config)
    no_text.load_state_dict(model.state_dict())
    no_text.save_pretrained(tmp_path / "no_text")
    cfg = _data_config(synthetic_run)
    split = "synthetic:val"
    default = evaluate(tmp_path / "no_text", [split], config=cfg)
    assert default.switches.name == "mask + point"
    sets = ["mask + point", "mask + point + text"]
    both = evaluate(tmp_path / "no_text", [split], sets, config=cfg)
    assert default.splits[split]["final"] == both.metrics["mask + point"][split]["final"]
    assert both.metrics["mask + point"][split] != both.metrics["mask + point + text"][split]
    evaluate_cli = load_script("evaluation/evaluate.py")
    common = [
        "--checkpoint", str(tmp_path / "no_text"), "--splits", split,
        f"data.prepared={synthetic_run['prepared']}", "data.num_workers=0",
    ]  # fmt: skip
    cli = evaluate_cli.main([*common, "--output", str(tmp_path / "a")])
    assert cli["switches"] == "mask + point"
    assert cli["splits"][split]["final"] == default.splits[split]["final"]
    asked = evaluate_cli.main(
        [*common, "--output", str(tmp_path / "b"), "--switches", "mask + point + text"]
    )
    assert asked["switches"] == "mask + point + text"
    assert asked["splits"][split]["final"] == both.metrics["mask + point + text"][split]["final"]


def _quick(synthetic_run: dict[str, Path], out: Path, *args: str) -> list[str]:
    """evaluate.py arguments for a quick run of the module's checkpoint into ``out``."""
    return [
        "--checkpoint", str(synthetic_run["checkpoint"]), "--output", str(out),
        f"data.prepared={synthetic_run['prepared']}", "data.num_workers=0",
        "eval.max_expressions=6", *args,
    ]  # fmt: skip


def test_runs_into_one_folder_merge_by_split(
    synthetic_run: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A second run on another split keeps the first run's split; a split scored again
    replaces its earlier results; results of another switch set are never mixed in."""
    evaluate_cli = load_script("evaluation/evaluate.py")
    out = tmp_path / "eval"
    first = evaluate_cli.main(_quick(synthetic_run, out, "--splits", "synthetic:val"))
    second = evaluate_cli.main(
        _quick(synthetic_run, out, "--splits", "synthetic:testA", "--save-masks")
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved["splits"] == {**first["splits"], **second["splits"]}
    assert list(saved["splits"]) == ["synthetic:val", "synthetic:testA"]
    assert "| synthetic:val |" in (out / "results.md").read_text()
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    counts = {s: m["final"]["num_expressions"] for s, m in saved["splits"].items()}
    assert {s: sum(r["split"] == s for r in records) for s in counts} == counts
    # Scored again, testA replaces its records and masks; val is kept, and the log says so.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        evaluate_cli.main(_quick(synthetic_run, out, "--splits", "synthetic:testA"))
    assert "keeping the earlier results of synthetic:val" in caplog.text
    assert "replacing the earlier results of synthetic:testA" in caplog.text
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {s: sum(r["split"] == s for r in records) for s in counts} == counts
    assert (out / "masks.jsonl").read_text() == ""  # testA's masks went with its old records
    assert json.loads((out / "results.json").read_text())["splits"] == saved["splits"]
    # Another main switch set: refused before the model loads, in one line; nothing changes.
    before = (out / "results.json").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(_quick(synthetic_run, out, "--splits", "synthetic:testB", "--no-text"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "1 problem(s) found before loading the model" in err[-1] and len(err) == 2
    assert "switches 'mask + point + text'" in err[0]
    assert "choose another --output" in err[0] and (out / "results.json").read_text() == before


def test_a_bad_image_ends_in_one_line_and_keeps_the_splits_scored(
    synthetic_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A corrupt image of the second split: one line naming its record's ids and the fix; the
    first split's results stay in results.json."""
    evaluate_cli = load_script("evaluation/evaluate.py")
    source = Path(load_split(synthetic_run["prepared"], "synthetic:val")["image_path"][0]).parent
    images = tmp_path / "images"
    shutil.copytree(source, images)
    val = set(load_split(synthetic_run["prepared"], "synthetic:val")["file_name"][:])
    test_a = load_split(synthetic_run["prepared"], "synthetic:testA")
    for name in set(test_a["file_name"][:]) - val:
        (images / name).write_bytes(b"not an image")
    out = tmp_path / "eval"
    argv = _quick(synthetic_run, out, "--splits", "synthetic:val,synthetic:testA")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main([*argv, f"data.image_dir={images}"])
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err  # (with the progress bars)
    err = [line for line in stderr.splitlines() if line.startswith("evaluate.py:")]
    assert len(err) == 1 and "Traceback" not in stderr, stderr
    image_ids = {int(i) for i in test_a["image_id"][:]}
    assert re.search(r"image_id (\d+) \(ref_id \d+", err[0])
    assert int(re.search(r"image_id (\d+)", err[0]).group(1)) in image_ids
    assert "synthetic:val kept in" in err[0] and "-v shows the traceback" in err[0]
    assert list(json.loads((out / "results.json").read_text())["splits"]) == ["synthetic:val"]


def test_evaluate_cli_reads_the_data_path_from_the_checkpoint(
    synthetic_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A checkpoint whose config names its data relative to the folder training ran in (a
    folder above the checkpoint) is evaluated from another folder without naming the data; a
    data.prepared on the command line overrides it."""
    project = synthetic_run["prepared"].parent
    cfg = load_config(
        overrides=[
            *TINY_RANDOM_ARGS, "data.prepared=prepared", "data.num_workers=0",
            "eval.splits=[synthetic:testB]", "eval.max_expressions=6",
        ]
    )  # fmt: skip
    torch.manual_seed(0)
    checkpoint = project / "runs" / "own_data" / "best"
    PromptRIS.from_config(cfg).save_pretrained(checkpoint)
    monkeypatch.chdir(tmp_path)  # no data/prepared here, nor the project's data
    evaluate_cli = load_script("evaluation/evaluate.py")
    results = evaluate_cli.main(["--checkpoint", str(checkpoint), "--output", "out"])
    assert list(results["splits"]) == ["synthetic:testB"]  # the checkpoint's eval.splits too
    assert results["splits"]["synthetic:testB"]["final"]["num_expressions"] > 0
    with pytest.raises(SystemExit):
        evaluate_cli.main(
            ["--checkpoint", str(checkpoint), "--output", "other", "data.prepared=elsewhere"]
        )
    err = capsys.readouterr().err
    assert "'elsewhere/synthetic" in err and str(project / "prepared") not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    os.environ.get("PROMPT_RIS_SLOW") != "1",
    reason="real 2-process gloo run (about a minute on 2 cores); set PROMPT_RIS_SLOW=1",
)
def test_two_process_launch_equals_one_process(synthetic_run: dict[str, Path]) -> None:
    common = [
        "--checkpoint",
        str(synthetic_run["checkpoint"]),
        "--splits",
        "synthetic:val,synthetic:testA",
        f"data.prepared={synthetic_run['prepared']}",
        "data.num_workers=0",
        "eval.random_baseline=false",
    ]
    one, two = synthetic_run["out"].with_name("one"), synthetic_run["out"].with_name("two")
    evaluate_cli = load_script("evaluation/evaluate.py")
    evaluate_cli.main([*common, "--output", str(one), "eval.batch_images=3"])
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(ROOT / "evaluation" / "evaluate.py"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [*launch, *common, "--output", str(two), "eval.batch_images=2"],
        check=True,
        env=env,
        cwd=ROOT,
    )
    assert (two / "records.jsonl").read_text() == (one / "records.jsonl").read_text()
    splits = [json.loads((d / "results.json").read_text())["splits"] for d in (one, two)]
    assert splits[0] == splits[1]


def test_prompt_ablation_scores_each_prompt_off_in_one_run(
    synthetic_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate_cli = load_script("evaluation/evaluate.py")
    common = [
        "--checkpoint", str(synthetic_run["checkpoint"]), "--splits", "synthetic:val",
        "--output", str(tmp_path), f"data.prepared={synthetic_run['prepared']}",
        "eval.max_expressions=6", "data.num_workers=0",
    ]  # fmt: skip
    results = evaluate_cli.main([*common, "--prompt-ablation"])
    ablation = results["ablation"]
    assert list(ablation) == ["mask + point + text", "point + text", "mask + text", "mask + point"]
    final = results["splits"]["synthetic:val"]["final"]
    assert ablation["mask + point + text"]["synthetic:val"] == final
    # Each row is what a separate run with that prompt switched off reports.
    alone = evaluate_cli.main([*common, "--no-mask", "--output", str(tmp_path / "no_mask")])
    assert ablation["point + text"]["synthetic:val"] == alone["splits"]["synthetic:val"]["final"]
    assert "| mask + point | synthetic:val |" in (tmp_path / "results.md").read_text()
    # The ablation starts from the switch set asked for.
    fewer = evaluate_cli.main(  # another main set: another folder (folders merge one set)
        [*common, "--prompt-ablation", "--no-mask", "--output", str(tmp_path / "fewer")]
    )
    assert list(fewer["ablation"]) == ["point + text", "text", "point"]
    assert fewer["ablation"]["point + text"] == ablation["point + text"]
    with pytest.raises(SystemExit) as stop:
        evaluate_cli.main([*common, "--switches", "mask + dot"])
    assert stop.value.code == 1
    assert "evaluate.py: error: --switches: unknown prompt type 'dot'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Checked first, written as it goes, outside the exports
# --------------------------------------------------------------------------------------------
def test_every_split_is_checked_before_the_model_loads(
    synthetic_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    evaluate_cli = load_script("evaluation/evaluate.py")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the splits were checked")

    monkeypatch.setattr("prompt_ris.models.PromptRIS.from_pretrained", refuse)
    with pytest.raises(SystemExit) as stop:
        evaluate_cli.main([
            "--checkpoint", str(synthetic_run["checkpoint"]), "--output", str(tmp_path / "out"),
            "--splits", "synthetic:val,synthetic:tesA,refcoco:val",
            f"data.prepared={synthetic_run['prepared']}", "eval.batch_image=2",
        ])  # fmt: skip
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("evaluate.py: ") for line in lines) and "Traceback" not in lines
    text = "\n".join(lines)
    assert "unknown config key 'eval.batch_image'; did you mean 'eval.batch_images'?" in text
    assert "'tesA' in 'synthetic:tesA' is not a refer split" in text
    assert "prepared data for refcoco(unc) not found" in text and "prepare_data.py" in text
    assert lines[-1] == "evaluate.py: 3 problem(s) found before loading the model"
    assert not (tmp_path / "out").exists()


def test_each_split_is_written_as_soon_as_it_is_scored(
    synthetic_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prompt_ris.engine import evaluation

    evaluate_cli = load_script("evaluation/evaluate.py")
    real = evaluation.score_loader

    def crash_on_the_second(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if args[3] == "synthetic:testB":  # (model, loader, accelerator, split, ...)
            raise RuntimeError("the machine went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "score_loader", crash_on_the_second)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="went away"):
        evaluate_cli.main([
            "--checkpoint", str(synthetic_run["checkpoint"]), "--output", str(out),
            "--splits", "synthetic:val,synthetic:testB", "--save-masks",
            f"data.prepared={synthetic_run['prepared']}", "eval.max_expressions=6",
            "data.num_workers=0",
        ])  # fmt: skip
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["splits"]) == ["synthetic:val"] and saved["complete"] is False
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert records and {r["split"] for r in records} == {"synthetic:val"}
    assert saved["splits"]["synthetic:val"]["final"]["num_expressions"] == len(records)
    assert len((out / "masks.jsonl").read_text().splitlines()) == len(records)
    assert "| synthetic:val |" in (out / "results.md").read_text()


def test_default_output_is_beside_the_exports_and_survives_a_new_export(
    synthetic_run: dict[str, Path], tmp_path: Path
) -> None:
    from prompt_ris.engine.checkpointing import export_pretrained
    from prompt_ris.models import PromptRIS

    evaluate_cli = load_script("evaluation/evaluate.py")
    run = tmp_path / "run"
    model = PromptRIS.from_pretrained(synthetic_run["checkpoint"])
    export_pretrained(model, model.config, run / "best")
    assert evaluate_cli.default_output(run / "best") == run / "eval" / "best"
    assert evaluate_cli.default_output(f"{run}/best/") == run / "eval" / "best"
    assert evaluate_cli.default_output(run / "best" / "model.safetensors") == run / "eval" / "best"
    results = evaluate_cli.main([
        "--checkpoint", str(run / "best"), "--splits", "synthetic:val",
        f"data.prepared={synthetic_run['prepared']}", "eval.max_expressions=4",
        "data.num_workers=0",
    ])  # fmt: skip
    assert results["complete"] is True
    export_pretrained(model, model.config, run / "best")  # training publishes a newer best/
    saved = json.loads((run / "eval" / "best" / "results.json").read_text())
    assert saved["splits"] == results["splits"]
    assert sorted(p.name for p in (run / "best").iterdir()) == ["config.json", "model.safetensors"]
