"""Where base weights are found: the weights folder, ``$PROMPT_RIS_WEIGHTS``.

``scripts/download_weights.py`` writes the public CLIP ViT-B/16 and SAM ViT-B files into the
weights folder, and the default config names them by file name (``model.clip.pretrained:
clip_vit_b16_openai.pt``, ``model.sam.checkpoint: sam_vit_b_01ec64.pth``), so training,
evaluation and inference find them from any working directory, offline.

The weights folder is ``$PROMPT_RIS_WEIGHTS`` when set, else ``$XDG_CACHE_HOME/prompt_ris``
(``~/.cache/prompt_ris``), the place other model libraries use for downloaded weights.

A config value (or a ``--clip-weights`` / ``--sam-weights`` argument) names a file in one of two
ways (docs/design.md, "Weights and checkpoints"):

- a bare file name (``sam_vit_b_01ec64.pth``): the file of that name in the weights folder, never
  the current directory (write ``./sam_vit_b_01ec64.pth`` to mean that one);
- a path (``/data/sam.pth``, ``checkpoints/sam.pth``, ``~/w/sam.pth``): that file; when it is
  not there, the file of the same name in the weights folder (so a checkpoint written on another
  machine still finds its base weights). A relative path is relative to its anchor: the current
  directory for a value the user gives, the checkpoint's folder or any folder above it for a value
  read from a checkpoint's config (``find_weights(value, anchor=...)``). Last, a relative path
  is tried in the source tree of prompt-ris (``SOURCE_TREE``), where the tiny preset's miniature
  foundations are committed (``checkpoints/tiny_synthetic/``).

For CLIP, a value without a weight-file suffix (``openai``) is an open_clip pretrained tag, which
open_clip downloads into its own cache. This module has no project imports.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PROMPT_RIS_WEIGHTS"
CLIP_FILE = "clip_vit_b16_openai.pt"  # written by scripts/download_weights.py
SAM_FILE = "sam_vit_b_01ec64.pth"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
DOWNLOAD_COMMAND = "python scripts/download_weights.py"
SOURCE_TREE = Path(__file__).resolve().parents[1]  # the folder holding the prompt_ris package
FLAGS = {"model.clip.pretrained": "--clip-weights", "model.sam.checkpoint": "--sam-weights"}


def weights_dir() -> Path:
    """The weights folder: ``$PROMPT_RIS_WEIGHTS``, else ``$XDG_CACHE_HOME/prompt_ris``, else
    ``~/.cache/prompt_ris``."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "prompt_ris"


def names_a_file(value: str) -> bool:
    """Whether a CLIP ``pretrained`` value names a weight file rather than an open_clip tag."""
    return Path(value).suffix in WEIGHT_SUFFIXES or os.sep in value or "/" in value


def is_bare_name(value: str) -> bool:
    """A file name without any folder part (looked up in the weights folder only)."""
    return Path(value).name == value and not value.startswith("~")


def anchored(value: str | Path, anchor: Path) -> list[Path]:
    """Where a relative path read from a saved config may be: under ``anchor`` (the folder of
    the config), under each folder above it, nearest first, then under ``SOURCE_TREE``."""
    folders = [anchor, *anchor.parents, SOURCE_TREE]
    return list(dict.fromkeys(folder / value for folder in folders))


def candidates(value: str, anchor: Path | None = None) -> list[Path]:
    """The files a weight value may name, in the order they are tried: for a relative path,
    under the current directory (``anchor`` None) or as :func:`anchored` says, then the file of
    that name in the weights folder, then (``anchor`` None) under ``SOURCE_TREE``."""
    if is_bare_name(value):
        return [weights_dir() / value]
    path = Path(value).expanduser()
    fallback = [weights_dir() / path.name]
    if path.is_absolute():
        tried = [path]
    elif anchor is None:
        tried, fallback = [path], [*fallback, SOURCE_TREE / path]
    else:
        tried = [folder / path for folder in (anchor, *anchor.parents)]
        fallback.append(SOURCE_TREE / path)
    return list(dict.fromkeys([*tried, *fallback]))


def find_weights(value: str, anchor: Path | None = None) -> Path | None:
    """The existing file a weight value names (see the module docstring), or None."""
    for path in candidates(value, anchor):
        if path.is_file():
            return path
    return None


def missing_weights_message(value: str, what: str) -> str:
    """One line: which file ``what`` (e.g. ``model.sam.checkpoint``) names, where it was looked
    for, and how to get it."""
    folder = f"the weights folder '{weights_dir()}' (${ENV_VAR})"
    if is_bare_name(value):
        where = f"not found in {folder}"
    else:
        where = f"not found (nor '{Path(value).name}' in {folder})"
    if not is_bare_name(value) and not Path(value).expanduser().is_absolute():
        return (
            f"{what}='{value}' {where}; the path is relative to the current directory "
            f"'{Path.cwd()}' (or to the prompt-ris source tree '{SOURCE_TREE}'): run from the "
            f"folder it is relative to, give its absolute path, or put the file in the "
            f"weights folder (`{DOWNLOAD_COMMAND}` writes {CLIP_FILE} and {SAM_FILE} there)"
        )
    return (
        f"{what}='{value}' {where}; run `{DOWNLOAD_COMMAND}` (it writes {CLIP_FILE} and "
        f"{SAM_FILE} there), set {ENV_VAR} to the folder that holds the file, or give its path"
        + (f" ({FLAGS[what]} PATH)" if what in FLAGS else "")
    )


def locate_weights(value: str, what: str) -> Path:
    """The file a weight value names.

    Args:
        value: a bare file name or a path (module docstring).
        what: the setting it came from, for the message (``model.sam.checkpoint``).

    Raises:
        FileNotFoundError: one line naming the places looked at and the fix.
    """
    path = find_weights(value)
    if path is None:
        raise FileNotFoundError(missing_weights_message(value, what))
    return path
