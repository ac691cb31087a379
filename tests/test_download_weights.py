"""download_weights.py without a network: each file gets its own line, and it fails at once
(no hub retries) when its server cannot be reached."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import huggingface_hub.constants
import pytest

from prompt_ris import weights
from repo_scripts import load_script

PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@pytest.fixture
def no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Name resolution and connections fail as on a machine without a network; the hub's cache
    is an empty folder and its offline mode is restored afterwards. Returns the hosts asked for."""
    asked: list[str] = []

    def no_name(host: object, *args: object, **kwargs: object) -> None:
        asked.append(str(host))
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    def no_route(self: socket.socket, address: object) -> None:
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", no_name)
    monkeypatch.setattr(socket.socket, "connect", no_route)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return asked


def test_offline_each_file_gets_its_line_at_once(
    no_network: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    download = load_script("scripts/download_weights.py")
    out = tmp_path / "weights"
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        download.main(["--out-dir", str(out)])
    seconds = time.perf_counter() - start
    assert stop.value.code == 1
    assert seconds < 15, seconds  # the hub's retries took 52 s
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 2, errors
    sam, clip = errors
    assert sam.startswith("download_weights.py: error: sam: dl.fbaipublicfiles.com cannot be ")
    assert f"fetch {download.SAM_URL} on a connected machine and copy it to {out}" in sam
    assert clip.startswith(
        "download_weights.py: error: clip: open_clip could not fetch ViT-B-16/openai "
        "(huggingface.co cannot be reached"
    )
    assert "it is not in the hub's cache" in clip and weights.CLIP_FILE in clip
    assert "dl.fbaipublicfiles.com" in no_network and "huggingface.co" in no_network
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # no request left for the hub to retry
    assert list(out.iterdir()) == []  # no partial file left behind


def test_a_file_already_there_is_reported_and_the_other_still_tried(
    no_network: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    download = load_script("scripts/download_weights.py")
    out = tmp_path / "weights"
    out.mkdir()
    (out / weights.CLIP_FILE).write_bytes(b"copied from another machine")
    with caplog.at_level("INFO"), pytest.raises(SystemExit) as stop:
        download.main(["--out-dir", str(out)])
    assert stop.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("download_weights.py: error: sam: ")
    assert f"clip: ready at {out / weights.CLIP_FILE}" in caplog.messages
    assert no_network == ["dl.fbaipublicfiles.com"]  # CLIP needed no connection
    assert download.main(["--out-dir", str(out), "--only", "clip"]) is None  # status 0
    assert no_network == ["dl.fbaipublicfiles.com"]
