"""Model hub: an export's card parses with huggingface_hub's ``ModelCard`` and holds its figures
in ``model-index`` form; a model loads by id offline from a cache laid out as huggingface_hub
lays it out (``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from repo_scripts import REPO

from prompt_ris.models.hub import HUB_FILES, is_repo_id

huggingface_hub = pytest.importorskip("huggingface_hub")
SHIPPED = REPO / "checkpoints" / "tiny_synthetic_demo"
REPO_ID = "prompt-ris/tiny-synthetic-demo"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay ``source``'s files out as huggingface_hub caches a download of ``repo_id``:
    ``models--owner--name/blobs/<hash>``, ``snapshots/<commit>/<file>`` links to the blobs, and
    ``refs/main`` naming the commit."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in HUB_FILES:
        data = (source / name).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_repo_ids_and_paths_are_told_apart() -> None:
    assert is_repo_id("owner/name") and is_repo_id("prompt-ris/tiny-synthetic-demo")
    for path in ("./owner/name", "/abs/path", "a/b/c", "name", "~/x"):
        assert not is_repo_id(path)


def test_model_card_parses_and_holds_the_results() -> None:
    card = huggingface_hub.ModelCard.load(SHIPPED / "README.md")
    results = json.loads((SHIPPED / "results.json").read_text())
    data = card.data.to_dict()
    assert data["library_name"] == "prompt-ris"
    assert data["base_weights"]["sam_checkpoint"].endswith("sam_tiny_synthetic.pth")
    assert data["prompt_ris"]["model"]["preset"] == "tiny"
    final = results["splits"]["synthetic:test"]["final"]
    scored = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert scored["mIoU"] == round(final["mIoU"], 2) and scored["oIoU"] == round(final["oIoU"], 2)
    assert "PromptRIS.from_pretrained" in card.text


def test_export_writes_a_card_with_the_checkpoints_results(tmp_path: Path) -> None:
    from prompt_ris.cli import main

    out = tmp_path / "exported"
    argv = ["export", "--checkpoint", str(SHIPPED), "--out", str(out)]
    assert main([*argv, "--results", str(SHIPPED / "results.json")]) == 0
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert card.data.eval_results and card.data.to_dict()["prompt_ris"]["model"]["preset"] == "tiny"


def test_loading_by_id_offline_from_the_hub_cache(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    hub_cache(cache, REPO_ID, SHIPPED)
    code = (
        "import numpy as np; from prompt_ris import PromptRIS; "
        f"m = PromptRIS.from_pretrained({REPO_ID!r}); "
        f"n = PromptRIS.from_pretrained({str(SHIPPED)!r}); "
        "img = np.full((40, 60, 3), 128, np.uint8); img[5:25, 10:30] = (220, 30, 30); "
        "a = m.predict(img, 'the red shape').masks; b = n.predict(img, 'the red shape').masks; "
        "assert (a == b).all(); print('loaded', a.sum())"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded" in done.stdout
    from prompt_ris import PromptRIS

    with pytest.raises(FileNotFoundError, match="not in the cache"):
        PromptRIS.from_pretrained("nobody/nothing", cache_dir=tmp_path / "empty",
                                  local_files_only=True)  # fmt: skip
