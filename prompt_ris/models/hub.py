"""Checkpoints on the model hub: loading by id (``"owner/name"``) and pushing, with
huggingface_hub's own functions (``snapshot_download``, ``create_repo``, ``upload_folder``).

A hub repository holds an export as a folder does (``model.safetensors``, ``config.json``) plus
its model card ``README.md`` and, when there are figures, ``results.json``. Loading downloads
those files into huggingface_hub's cache (or finds them there: ``local_files_only=True`` or
``HF_HUB_OFFLINE=1``) and reads the snapshot folder like any checkpoint folder.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from prompt_ris.models.model_card import CARD_NAME, LIBRARY_NAME, model_card
from prompt_ris.models.pretrained import CONFIG_NAME, WEIGHTS_NAME

RESULTS_NAME = "results.json"
HUB_FILES = [WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, RESULTS_NAME]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_repo_id(value: str | Path) -> bool:
    """Whether ``value`` reads as a hub id ``owner/name`` (and not as a path)."""
    text = str(value)
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "/", "~"))


def checkpoint_folder(
    path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local folder of a checkpoint given as a path or as a hub id.

    An existing path is returned as it is; ``owner/name`` that is no local path is fetched from
    the hub (or found in its cache) at ``revision``. Anything else is returned for the
    checkpoint reader to report.

    Raises:
        FileNotFoundError: a hub id that cannot be fetched or found in the cache, with the fix.
    """
    if Path(path).expanduser().exists() or not is_repo_id(path):
        return Path(path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            str(path), revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            allow_patterns=HUB_FILES, library_name=LIBRARY_NAME,
        )  # fmt: skip
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"'{path}' is no local folder, and the hub model of that id is not in the cache "
            f"({cache_dir or 'huggingface_hub default'}) and cannot be downloaded now; connect "
            "to the hub once (HF_HUB_OFFLINE unset), or pass the checkpoint's folder"
        ) from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise FileNotFoundError(
            f"'{path}' is no local folder, and the hub has no model of that id at revision "
            f"{revision or 'main'} ({type(err).__name__}); check the id or pass a folder"
        ) from err
    return Path(folder)


def write_card(folder: str | Path, results: dict[str, Any] | None = None, **card: Any) -> Path:
    """Write the model card ``README.md`` (and ``results.json`` when given) into an export
    folder, from its ``config.json``; ``card`` goes to ``model_card``."""
    folder = Path(folder)
    meta = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    if results is not None:
        (folder / RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    path = folder / CARD_NAME
    path.write_text(model_card(meta, results, **card), encoding="utf-8")
    return path


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload Prompt-RIS model",
) -> str:
    """Upload an export folder (with its card) to the hub repository ``repo_id``, created if
    needed; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), allow_patterns=HUB_FILES,
        commit_message=commit_message, revision=revision,
    )  # fmt: skip
    return str(getattr(info, "commit_url", info))


def push_to_hub(
    save: Any, repo_id: str, results: dict[str, Any] | None = None, **options: Any
) -> str:
    """Export with ``save(folder)`` into a temporary folder, write its card, and upload it.

    Args:
        save: writes the export into the folder it is given (``model.save_pretrained``).
        repo_id: ``owner/name``.
        results: a ``results.json`` whose figures the card states.
        options: ``private``, ``token``, ``revision``, ``commit_message`` (``push_folder``).
    """
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        write_card(tmp, results, name=repo_id.split("/")[-1], load_from=repo_id)
        return push_folder(tmp, repo_id, **options)
