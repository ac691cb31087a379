"""The weights folder (prompt_ris/weights.py): where base weights are found, what the default
config names, where download_weights.py writes, and loading from there with no override."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prompt_ris import weights
from prompt_ris.config import Config, load_config
from prompt_ris.models import PromptRIS
from prompt_ris.models.build import base_weight_problems
from tiny_random import TINY_RANDOM
from repo_scripts import load_script


def test_weights_folder_env_then_xdg_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMPT_RIS_WEIGHTS", str(tmp_path / "mine"))
    assert weights.weights_dir() == tmp_path / "mine"
    monkeypatch.delenv("PROMPT_RIS_WEIGHTS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.weights_dir() == tmp_path / "xdg" / "prompt_ris"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights.weights_dir() == tmp_path / "home" / ".cache" / "prompt_ris"


def test_bare_names_come_from_the_weights_folder_never_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, cwd = tmp_path / "weights", tmp_path / "cwd"
    folder.mkdir(), cwd.mkdir()
    monkeypatch.setenv("PROMPT_RIS_WEIGHTS", str(folder))
    monkeypatch.chdir(cwd)
    (cwd / "sam.pth").write_bytes(b"in the working directory")
    assert weights.find_weights("sam.pth") is None  # not taken from the current directory
    assert weights.find_weights("./sam.pth") == Path("sam.pth")  # unless asked for
    (folder / "sam.pth").write_bytes(b"in the weights folder")
    assert weights.find_weights("sam.pth") == folder / "sam.pth"
    # A path that is not there (a checkpoint made on another machine) falls back by file name.
    assert weights.find_weights("/elsewhere/checkpoints/sam.pth") == folder / "sam.pth"
    assert weights.find_weights(str(cwd / "sam.pth")) == cwd / "sam.pth"  # a path that exists
    message = weights.missing_weights_message("clip.pt", "model.clip.pretrained")
    assert str(folder) in message and "download_weights.py" in message
    assert "PROMPT_RIS_WEIGHTS" in message and "\n" not in message
    message = weights.missing_weights_message("checkpoints/x/clip.pt", "model.clip.pretrained")
    assert f"relative to the current directory '{cwd}'" in message and "\n" not in message
    assert weights.names_a_file("clip.pt") and weights.names_a_file("a/b")
    assert not weights.names_a_file("openai")  # an open_clip tag


def test_default_config_names_the_files_download_weights_writes_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Config().model
    assert model.clip.pretrained == weights.CLIP_FILE == "clip_vit_b16_openai.pt"
    assert model.sam.checkpoint == weights.SAM_FILE == "sam_vit_b_01ec64.pth"
    assert load_config(overrides=["model.clip.pretrained=openai"]).model.clip.pretrained == "openai"
    download = load_script("scripts/download_weights.py")
    written: list[Path] = []
    monkeypatch.setattr(download, "download_sam", lambda out, force: written.append(out) or out)
    monkeypatch.setattr(download, "download_clip", lambda out, force: written.append(out) or out)
    monkeypatch.setenv("PROMPT_RIS_WEIGHTS", str(tmp_path / "w"))
    download.main([])
    assert written == [tmp_path / "w", tmp_path / "w"]  # both files go to the weights folder
    # With both files there, the default config has no base-weight problem.
    for name in (weights.CLIP_FILE, weights.SAM_FILE):
        (tmp_path / "w" / name).write_bytes(b"x")
    assert base_weight_problems(Config().model) == []
    monkeypatch.setenv("PROMPT_RIS_WEIGHTS", str(tmp_path / "empty"))
    problems = base_weight_problems(Config().model)
    assert len(problems) == 2 and all("download_weights.py" in p for p in problems)


def test_model_builds_offline_from_the_weights_folder_by_file_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real file formats under the real names (tiny sizes): the config names only the files."""
    torch.manual_seed(0)
    base = PromptRIS.from_config(load_config({"model": TINY_RANDOM}).model)
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(base.clip.clip.state_dict(), folder / weights.CLIP_FILE)  # open_clip state dict
    sam = base.sam
    torch.save(
        {f"{part}.{k}": v for part in ("image_encoder", "prompt_encoder", "mask_decoder")
         for k, v in getattr(sam, part).state_dict().items()},
        folder / weights.SAM_FILE,
    )  # fmt: skip
    monkeypatch.setenv("PROMPT_RIS_WEIGHTS", str(folder))
    monkeypatch.chdir(tmp_path)  # another folder than the weights'
    names = {"clip": {"pretrained": weights.CLIP_FILE}, "sam": {"checkpoint": weights.SAM_FILE}}
    model = PromptRIS.from_config(load_config({"model": {"preset": "tiny", **names}}).model)
    for key, value in base.clip.clip.state_dict().items():
        assert torch.equal(model.clip.clip.state_dict()[key], value), key
    assert torch.equal(
        model.sam.mask_decoder.iou_token.weight, base.sam.mask_decoder.iou_token.weight
    )
    monkeypatch.setenv("PROMPT_RIS_WEIGHTS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"clip_vit_b16_openai\.pt' not found in"):
        PromptRIS.from_config(load_config({"model": {"preset": "tiny", **names}}).model)
