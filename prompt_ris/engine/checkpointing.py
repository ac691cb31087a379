"""Two kinds of checkpoint: resumable training state, and exports of what was learned.

**Resume state** (``<output_dir>/checkpoints/step_<global_step>/``) is everything needed to continue
a run exactly: ``accelerator.save_state`` (model, optimizer, lr schedule, gradient scaler, the RNG
states of every process) plus ``trainer_state.json`` (epoch, optimizer steps done in that epoch,
global step, best validation score). It is written atomically: into a hidden temporary folder
first, renamed into place once complete, and only then is the ``latest`` pointer (a one-line text
file naming the folder) replaced, so a crash at any moment leaves ``latest`` naming a complete
checkpoint. Resume state uses ``torch.save`` (pickle) for the optimizer and RNG states, as
accelerate does; load it only from runs you trust. All processes must see the same file system.

**Resume verifies** what it is about to load (``verify_checkpoint``: every safetensors file is
complete, every ``torch.save`` archive passes its CRC check, ``trainer_state.json`` parses): a
checkpoint damaged after it was written (a full disk, a partial copy) is named, and ``--resume
latest`` falls back to the newest intact one, saying so; when none is intact it refuses in one
line.

**Export** (``<output_dir>/{stage1,final,best}/``) is what inference needs, and nothing pickled:
the two files of ``models.pretrained.save_pretrained``: ``model.safetensors`` (the learned
parameters; plus the weights of a tower whose config names no base-weight file, e.g. the tiny
preset's random towers) and ``config.json`` (the resolved config, the base weights it needs, and
under ``"training"`` the stage, epochs done, step and validation metrics of the export).
``PromptRIS.from_pretrained(<folder>)`` loads it. It is written beside its destination and renamed
into place, like a resume checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import struct
import threading
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from accelerate import Accelerator

from prompt_ris.config import Config
from prompt_ris.models import PromptRIS
from prompt_ris.models.pretrained import chmod_like_new_file, save_pretrained

logger = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"  # resume states live in <output_dir>/checkpoints/
LATEST_FILENAME = "latest"  # one line: the folder name of the newest complete checkpoint
TRAINER_STATE_FILENAME = "trainer_state.json"
RUN_CONFIG_NAME = "config.yaml"  # <output_dir>/config.yaml: the run's resolved config
_TMP_PREFIX = ".tmp-"


@dataclass
class TrainerState:
    """Loop position and bookkeeping saved beside ``accelerator.save_state``.

    Attributes:
        epoch: 0-based epoch in progress (equal to the number of finished epochs when
            ``step_in_epoch`` is 0).
        step_in_epoch: optimizer steps already done in ``epoch``.
        global_step: optimizer steps done since the start of the run.
        best_score: best validation score so far (see ``trainer.validate``), or None.
        best_stage: the stage (a ``losses.Stage`` number) in which ``best_score`` was measured.
        history: a few per-epoch validation summaries, for humans.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_score: float | None = None
    best_stage: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        return cls(**json.loads(text))


class SaveRequest:
    """SIGUSR1 handler: remembers that a checkpoint was asked for (saved at the next step)."""

    def __init__(self) -> None:
        self.pending = False
        self._previous: Any = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True

    def install(self) -> None:
        if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGUSR1, self)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)


# --------------------------------------------------------------------------------------------
# Small file-system helpers
# --------------------------------------------------------------------------------------------
def _fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` to disk, so a rename after it publishes complete data."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(_TMP_PREFIX + path.name)
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _publish_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing an older ``final`` if present."""
    _fsync_tree(tmp)
    old = final.with_name(_TMP_PREFIX + final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


# --------------------------------------------------------------------------------------------
# Resume state
# --------------------------------------------------------------------------------------------
def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIRNAME


def save_training_state(
    accelerator: Accelerator, output_dir: str | Path, state: TrainerState, keep: int = 2
) -> Path:
    """Save a resumable checkpoint atomically; call it on every process.

    Args:
        accelerator: the run's accelerator (its prepared model, optimizer and scheduler are saved).
        output_dir: the run folder; the checkpoint goes to ``checkpoints/step_<global_step>``.
        state: loop position, written as ``trainer_state.json``.
        keep: number of newest checkpoints kept; older ones are deleted after ``latest`` moves.

    Returns:
        The published checkpoint folder.
    """
    root = checkpoint_root(output_dir)
    name = f"step_{state.global_step:08d}"
    tmp, final = root / (_TMP_PREFIX + name), root / name
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left behind by a crash during an earlier save
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its RNG states here
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for weights in tmp.glob("*.safetensors"):
            chmod_like_new_file(weights)  # safetensors writes 0600
        (tmp / TRAINER_STATE_FILENAME).write_text(state.to_json())
        _publish_dir(tmp, final)
        _write_text_atomic(root / LATEST_FILENAME, name + "\n")  # last: the commit point
        _prune_checkpoints(root, keep=keep, protect=name)
        logger.info("saved resumable checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _prune_checkpoints(root: Path, keep: int, protect: str) -> None:
    done = sorted(p for p in root.glob("step_*") if (p / TRAINER_STATE_FILENAME).is_file())
    for path in done[: max(len(done) - max(keep, 1), 0)]:
        if path.name != protect:
            shutil.rmtree(path)
    for path in root.glob(_TMP_PREFIX + "*"):  # stale halves of interrupted saves
        if path.is_dir():
            shutil.rmtree(path)


class DamagedCheckpointError(RuntimeError):
    """The checkpoint to resume (and every older one) is damaged."""


def is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a resume checkpoint (it holds ``trainer_state.json``)."""
    return (folder / TRAINER_STATE_FILENAME).is_file()


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint folder belongs to (``<run>/checkpoints/step_*``)."""
    return checkpoint.parent.parent


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is incomplete, or None: its header must parse and the file must
    hold every byte the header's offsets name."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            return f"{path.name} is truncated ({size} bytes, its header alone needs {8 + length})"
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{path.name} has an unreadable header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    needed = 8 + length + max(ends, default=0)
    if size != needed:
        return f"{path.name} is truncated ({size} bytes of {needed})"
    return None


def _archive_problem(path: Path) -> str | None:
    """Why a ``torch.save`` archive (a zip file) is damaged, or None (CRC of every member)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"{path.name} is not a complete torch.save archive ({err})"
    return None if bad is None else f"{path.name} is corrupt (CRC error in {bad})"


def verify_checkpoint(folder: str | Path) -> str | None:
    """Check a resume checkpoint without loading it; None when intact, else what is damaged.

    Every ``*.safetensors`` file must be complete, every ``*.bin`` / ``*.pkl`` / ``*.pt``
    (accelerate's ``torch.save`` archives: optimizer, scheduler, RNG states) must pass its CRC
    check, ``trainer_state.json`` must parse, and the model weights must be there.
    """
    folder = Path(folder)
    try:
        TrainerState.from_json((folder / TRAINER_STATE_FILENAME).read_text())
    except (OSError, ValueError, TypeError) as err:
        return f"{TRAINER_STATE_FILENAME} is unreadable ({err})"
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not any(p.suffix == ".safetensors" or p.name.startswith("pytorch_model") for p in files):
        return "it holds no model weights (model.safetensors)"
    for path in files:
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".bin", ".pkl", ".pt"):
            problem = _archive_problem(path)
        else:
            continue
        if problem is not None:
            return problem
    return None


def _resume_candidates(run: Path) -> list[Path]:
    """The run's checkpoints, newest first, starting at the one ``latest`` names (newer folders
    were never committed)."""
    root = checkpoint_root(run)
    folders = sorted((p for p in root.glob("step_*") if is_checkpoint(p)), reverse=True)
    pointer = root / LATEST_FILENAME
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        folders = [named] + [p for p in folders if p.name < named.name]
    return folders


def resolve_resume(output_dir: str | Path, resume: str) -> Path:
    """Find the checkpoint folder that ``--resume`` names, verified intact.

    Args:
        output_dir: the run folder (used for ``"latest"``).
        resume: ``"latest"`` (the newest intact checkpoint of ``output_dir``), a checkpoint folder
            (holding ``trainer_state.json``), or another run folder (its newest intact one).

    Returns:
        The checkpoint folder. When newer checkpoints are damaged, a warning names them and the
        folder returned is the newest intact one.

    Raises:
        FileNotFoundError: no checkpoint at all; the message says how to fix the command.
        DamagedCheckpointError: the named checkpoint, or every checkpoint of the run, is
            damaged; the message names the damage and the way out.
    """
    target = Path(output_dir) if resume == "latest" else Path(resume)
    if is_checkpoint(target):
        problem = verify_checkpoint(target)
        if problem is None:
            return target
        intact = next(
            (p for p in _resume_candidates(run_folder_of(target)) if not verify_checkpoint(p)),
            None,
        )
        fix = (
            f"resume from '{intact}', the newest intact checkpoint, or start without --resume"
            if intact
            else "no intact checkpoint is left: start without --resume"
        )
        raise DamagedCheckpointError(f"--resume {resume}: checkpoint damaged: {problem}; {fix}")
    candidates = _resume_candidates(target)
    if not candidates:
        pointer = checkpoint_root(target) / LATEST_FILENAME
        raise FileNotFoundError(
            f"--resume {resume}: no checkpoint found ({pointer} does not exist). Start without "
            f"--resume, or pass a checkpoint folder such as <output_dir>/{CHECKPOINTS_DIRNAME}/"
            "step_00001000, or set train.output_dir to the run you want to continue."
        )
    damaged = []
    for folder in candidates:
        problem = verify_checkpoint(folder) if folder.is_dir() else "it does not exist"
        if problem is None:
            if damaged:
                logger.warning(
                    "checkpoint %s is damaged; resuming from %s, the newest intact checkpoint",
                    "; ".join(damaged), folder,
                )  # fmt: skip
            return folder
        damaged.append(f"{folder.name} ({problem})")
    raise DamagedCheckpointError(
        f"--resume {resume}: every checkpoint of '{target}' is damaged: {'; '.join(damaged)}. "
        "Start without --resume (in a new train.output_dir to keep this one)"
    )


def read_trainer_state(checkpoint_dir: str | Path) -> TrainerState:
    """The loop position a resume checkpoint holds, without loading its tensors."""
    return TrainerState.from_json((Path(checkpoint_dir) / TRAINER_STATE_FILENAME).read_text())


def load_training_state(accelerator: Accelerator, checkpoint_dir: str | Path) -> TrainerState:
    """Restore model, optimizer, scheduler and RNG states in place; return the loop position."""
    checkpoint_dir = Path(checkpoint_dir)
    accelerator.load_state(str(checkpoint_dir))
    state = read_trainer_state(checkpoint_dir)
    logger.info(
        "resumed from %s (epoch %d, step %d of that epoch, global step %d)",
        checkpoint_dir,
        state.epoch + 1,
        state.step_in_epoch,
        state.global_step,
    )
    return state


# --------------------------------------------------------------------------------------------
# Export of learned weights (inference)
# --------------------------------------------------------------------------------------------
def export_pretrained(
    model: PromptRIS,
    cfg: Config,
    out_dir: str | Path,
    training: dict[str, Any] | None = None,
) -> Path:
    """Export the learned weights for inference, atomically; main process only.

    Writes ``save_pretrained``'s ``model.safetensors`` and ``config.json`` (module docstring)
    into a temporary folder beside ``out_dir`` that then replaces ``out_dir``.
    ``PromptRIS.from_pretrained(out_dir)`` loads it.

    Args:
        model: the unwrapped model (``accelerator.unwrap_model``), so keys carry no prefix.
        cfg: the resolved config of the run.
        out_dir: destination folder (replaced if it exists).
        training: facts about the exported state, stored under ``"training"`` in config.json.

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(_TMP_PREFIX + out_dir.name)
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pretrained(model, tmp, config=cfg, training=training)
    _publish_dir(tmp, out_dir)
    logger.info("exported learned weights to %s", out_dir)
    return out_dir
