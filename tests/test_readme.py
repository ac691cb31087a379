"""The READMEs' commands, as written, against the code: so that they cannot drift apart.

Every shell command in a ```bash block of README.md, evaluation/README.md and
checkpoints/README.md is run, in-process, from a folder laid out like a fresh clone (configs/,
scripts/, evaluation/) with an empty weights folder and no data: each must get past its argument
parser and config (flags, config files and keys as written) and stop at the one thing a fresh
clone lacks (prepared data, base weights, a trained checkpoint), saying so in one line each. The
paths must agree (what training writes is what evaluation, compare.py and inference read), and
every command's ``--help`` must answer at once. Every repository file the READMEs,
CONTRIBUTING.md and docs/ name must exist. tests/test_workflow.py runs the same commands for real
on a tiny model.
"""

from __future__ import annotations

import fnmatch
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
READMES = ("README.md", "evaluation/README.md", "checkpoints/README.md")
SETUP_ONLY = {"source", "pip"}  # environment set-up lines: nothing of this project to check
# What a fresh clone without data or weights is allowed to be told (one line each).
FRESH_CLONE_PROBLEMS = (
    r"prepared data for \S+ not found at '[^']+' \(needed by .*\); run `python "
    r"scripts/prepare_data\.py",
    r"model\.(clip\.pretrained|sam\.checkpoint)='[^']+' not found in the weights folder .*"
    r"download_weights\.py",
    r"checkpoint '[^']+' not found; a checkpoint is a directory .* train one with `accelerate "
    r"launch scripts/train\.py",
    r"--resume checkpoints/\S+: no run there \('[^']+/config\.yaml' not found\)",
)
# Commands that run long or serve until stopped (training the demo, the app, the load test
# against a running app): their flags are checked against their --help; tests/test_app_*.py and
# tests/test_shipped_model.py run what they do.
LONG_RUNNING = {"scripts/demo.py", "scripts/load_test_app.py", "app"}
SHIPPED = "checkpoints/tiny_synthetic_demo"  # a fresh clone has it: its commands succeed
HELP_SECONDS = 3.0  # measured 0.05-0.2 s each
ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # subprocesses import this checkout


def blocks(readme: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (REPO / readme).read_text(), re.S)


def shell_commands(readme: str) -> list[list[str]]:
    """The commands of the bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in blocks(readme, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1 :]
    return commands


ALL_COMMANDS = [(readme, cmd) for readme in READMES for cmd in shell_commands(readme)]


def script_and_args(command: list[str]) -> tuple[str, list[str]]:
    """(program, arguments): a script path for python / accelerate launch, else the tool."""
    if command[0] == "python" or command[:2] == ["accelerate", "launch"]:
        index = next(i for i, word in enumerate(command) if word.endswith(".py"))
        return command[index], command[index + 1 :]
    return command[0], command[1:]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.fixture
def fresh_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory like a fresh clone: the project's folders, no data, no runs."""
    for name in ("configs", "scripts", "evaluation", "checkpoints", "examples"):
        (tmp_path / name).symlink_to(REPO / name)
    from PIL import Image

    Image.new("RGB", (8, 6)).save(tmp_path / "img.jpg")  # the image the commands name
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readmes_hold_the_workflow() -> None:
    programs = {script_and_args(cmd)[0] for _, cmd in ALL_COMMANDS}
    for needed in ("scripts/download_weights.py", "scripts/prepare_data.py", "scripts/train.py",
                   "evaluation/evaluate.py", "evaluation/compare.py", "prompt-ris"):  # fmt: skip
        assert needed in programs, needed
    subcommands = {cmd[1] for _, cmd in ALL_COMMANDS if cmd[0] == "prompt-ris"}
    assert subcommands == {"predict", "export", "app"}
    # What a user needs to know, documented in the README.
    readme = (REPO / "README.md").read_text()
    for needed in ("PROMPT_RIS_WEIGHTS", "train.save_every_steps", "--save-every-steps",
                   "SIGUSR1", "train.stop_at_step", "tensorboard --logdir", "train.tracker",
                   "--mixed_precision", "--dynamo_backend", "--self-contained"):  # fmt: skip
        assert needed in readme, needed
    assert "data.root" not in "".join((REPO / r).read_text() for r in READMES)  # read by nothing


@pytest.mark.parametrize(
    ("readme", "command"), ALL_COMMANDS, ids=[" ".join(c)[:60] for _, c in ALL_COMMANDS]
)
def test_readme_command_runs_as_written_up_to_what_a_fresh_clone_lacks(
    fresh_clone: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    readme: str, command: list[str],
) -> None:  # fmt: skip
    program, args = script_and_args(command)
    if command[0] in SETUP_ONLY:
        return
    if command[0] == "bash":
        assert (REPO / command[1]).is_file(), command
        return
    if program in LONG_RUNNING or args[:1] == ["app"]:
        helped = [sys.executable, program, "--help"] if program.endswith(".py") else [
            sys.executable, "-m", "prompt_ris", *args[:1], "--help"]  # fmt: skip
        usage = subprocess.run(helped, capture_output=True, text=True, check=True, env=ENV).stdout
        for word in args:
            assert not word.startswith("--") or word in usage, (command, word)
        return
    if program == "prompt-ris" and flag(args, "--checkpoint") == SHIPPED:
        from prompt_ris.cli import main

        assert main(args) == 0, capsys.readouterr().err  # the shipped model answers
        return
    if program == "prompt-ris":
        from prompt_ris.cli import main

        assert main(args) == 1  # no trained checkpoint in a fresh clone
        problems = capsys.readouterr().err.strip().splitlines()
        problems = [line.removeprefix("prompt-ris: error: ") for line in problems]
    elif program in ("scripts/benchmark.py", "scripts/cost_model.py"):  # tools: arguments parse
        tool = runpy.run_path(str(REPO / program))  # (test_benchmark / test_cost_model run them)
        assert tool["parse_args"](args).out
        return
    elif program == "scripts/download_weights.py":  # would download (test_weights.py: where to)
        assert "--help" in subprocess.run(
            [sys.executable, program, "--help"], capture_output=True, text=True, check=True,
            env=ENV,
        ).stdout
        return
    elif program == "evaluation/compare.py":
        reference, results = args[:2]
        assert reference == "evaluation/paper_results.json"  # A = the paper, B = yours
        compare = runpy.run_path(str(REPO / program))["main"]
        compare([reference, reference, *args[2:]])  # the arguments as written parse and run
        return
    else:
        main = runpy.run_path(str(REPO / program))["main"]
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 1, command
        lines = capsys.readouterr().err.strip().splitlines()
        prog = Path(program).name
        problems = [line.removeprefix(f"{prog}: error: ") for line in lines if "error:" in line]
        if program == "scripts/prepare_data.py":
            assert problems == [problems[0]] and "refs" in problems[0], lines
            return
    assert problems, command
    for problem in problems:
        assert any(re.match(p, problem) for p in FRESH_CLONE_PROBLEMS), (command, problem)


def test_paths_agree_between_training_evaluation_and_inference() -> None:
    """What the training command's config writes is what every later command reads."""
    from prompt_ris.config import load_config

    run_folders, checkpoints, outputs, compared = set(), [], set(), []
    evaluate = runpy.run_path(str(REPO / "evaluation" / "evaluate.py"))
    for _, command in ALL_COMMANDS:
        program, args = script_and_args(command)
        if program == "scripts/train.py" and flag(args, "--config"):
            run_folders.add(load_config(REPO / flag(args, "--config")).train.output_dir)
        if program == "scripts/train.py" and flag(args, "--resume"):
            checkpoints.append(("--resume", flag(args, "--resume")))
        if program in ("evaluation/evaluate.py", "prompt-ris"):
            checkpoints.append(("--checkpoint", flag(args, "--checkpoint")))
        if program == "evaluation/evaluate.py":
            default = evaluate["default_output"](flag(args, "--checkpoint"))
            outputs.add(f"{flag(args, '--output') or default}/results.json")
        if program == "evaluation/compare.py":
            compared.append(args[1])
    for snippet in blocks("README.md", "python"):
        paths = re.findall(r'from_pretrained\("([^"]+)"', snippet)
        checkpoints += [("from_pretrained", path) for path in paths]
    assert run_folders == {"checkpoints/refcoco_combined"}
    (run,) = run_folders
    exports = {f"{run}/{name}" for name in ("best", "final", "stage1")}
    for how, path in checkpoints:
        if path in (SHIPPED, None):  # the shipped model; `prompt-ris app` defaults to it
            continue
        assert path == run if how == "--resume" else path in exports, (how, path)
    assert compared and set(compared) <= outputs, (compared, outputs)
    assert f"{run}/eval/best/results.json" in compared
    # The run-folder layout the README documents names the folders these commands use.
    layout = next(b for b in blocks("README.md", "text") if b.startswith(f"{run}/"))
    entries = {line.split()[0] for line in layout.splitlines()[1:]}
    assert {"best/", "final/", "stage1/", "eval/best/", "config.yaml"} <= entries


# The documents a maintainer reads, and how they name the repository's files: a path from one of
# its folders (``prompt_ris/models/layers.py``, ``checkpoints/tiny_synthetic/``; ``<name>`` is any
# name), or a bare script or module name (``layers.py`` in a layout tree).
DOCUMENTS = (*READMES, "CONTRIBUTING.md", "checkpoints/tiny_synthetic/README.md", "docs/*.md")
REPO_FOLDERS = ("prompt_ris", "configs", "scripts", "evaluation", "tests", "docs", "checkpoints")
PATH_NAMED = re.compile(rf"(?<![\w/.~$<-])(?:{'|'.join(REPO_FOLDERS)})/[\w./*<>-]*")
FILE_NAMED = re.compile(r"(?<![\w/.~$<>*-])[\w*<>-]+\.(?:py|sh)\b")


def repository_files() -> list[Path]:
    return [
        path.relative_to(REPO)
        for folder in REPO_FOLDERS
        for path in (REPO / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ] + [path.relative_to(REPO) for path in REPO.iterdir() if path.is_file()]


def test_files_the_documents_name_exist() -> None:
    """Every repository path a document names exists, outside the folders training writes."""
    from prompt_ris.config import load_config

    run_folders = {load_config(c).train.output_dir for c in sorted(REPO.glob("configs/*.yaml"))}
    files = repository_files()
    folders = {parent for path in files for parent in path.parents}
    names = {path.name for path in files}
    documents = sorted({d for pattern in DOCUMENTS for d in REPO.glob(pattern)})
    assert len(documents) >= 6, documents
    missing, checked = [], 0
    for document in documents:
        text = document.read_text()
        for named in PATH_NAMED.findall(text):
            named = named.rstrip(".")
            if any(named == run or named.startswith(f"{run}/") for run in run_folders):
                continue  # written by training and evaluation
            pattern = re.sub(r"<[^>]*>", "*", named).rstrip("/")
            found = any(fnmatch.fnmatch(str(path), pattern) for path in [*files, *folders])
            checked += 1
            if not found:
                missing.append(f"{document.relative_to(REPO)}: {named}")
        for named in FILE_NAMED.findall(text):
            pattern = re.sub(r"<[^>]*>", "*", named)
            checked += 1
            if not any(fnmatch.fnmatch(name, pattern) for name in names):
                missing.append(f"{document.relative_to(REPO)}: {named}")
    assert checked > 100, checked  # the patterns still find the documents' file names
    assert not missing, missing


def test_every_command_answers_help_at_once(fresh_clone: Path) -> None:
    programs = {script_and_args(cmd)[0] for _, cmd in ALL_COMMANDS}
    # benchmark (a GPU tool) and the cost model import torch at the top: not workflow commands
    programs -= {"bash", "source", "pip", "scripts/benchmark.py", "scripts/cost_model.py"}
    for program in sorted(programs):
        argv = ["-m", "prompt_ris"] if program == "prompt-ris" else [program]
        for sub in (["predict", "--help"], ["export", "--help"]) if program == "prompt-ris" else (
            ["--help"],
        ):
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, *argv, *sub], capture_output=True, text=True, timeout=60, env=ENV
            )
            seconds = time.perf_counter() - start
            assert done.returncode == 0 and "usage:" in done.stdout, (program, done.stderr)
            assert seconds < HELP_SECONDS, (program, sub, seconds)
