"""Fetch the base weights Prompt-RIS builds on into the weights folder (needs internet).

    python scripts/download_weights.py            # SAM ViT-B and CLIP ViT-B/16 (openai)
    python scripts/download_weights.py --only sam
    python scripts/download_weights.py --out-dir /data/weights   # then PROMPT_RIS_WEIGHTS=...

SAM: ``sam_vit_b_01ec64.pth`` from Meta's public URL (segment_anything's checkpoint, ~375 MB).
CLIP: open_clip's ``ViT-B-16`` / ``openai`` weights, fetched by open_clip and saved as a plain
open_clip state dict ``clip_vit_b16_openai.pt`` (~600 MB). Both go to the weights folder,
``$PROMPT_RIS_WEIGHTS`` or ``~/.cache/prompt_ris`` (``prompt_ris/weights.py``), where the default
config finds them by file name: training, evaluation and inference then run offline, from any
folder, with no override. On a machine without internet, copy the two files into its weights
folder.

Each file is reported on its own line, whether it was saved, already there or failed (status 1 if
any failed). Before each download a connection to its server is tried for a few seconds; when it
cannot be made, SAM fails at once and CLIP is looked for in the Hugging Face hub's cache in the
hub's offline mode (``HF_HUB_OFFLINE``), without the hub's retries.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from prompt_ris.weights import CLIP_FILE, ENV_VAR, SAM_FILE, weights_dir

logger = logging.getLogger("download_weights")

SAM_URL = f"https://dl.fbaipublicfiles.com/segment_anything/{SAM_FILE}"
SAM_CHECK_KEY = "image_encoder.patch_embed.proj.weight"  # present in every SAM state dict
CLIP_MODEL, CLIP_TAG = "ViT-B-16", "openai"
CHUNK_BYTES = 1 << 20
HUB_HOST = "huggingface.co"  # where open_clip fetches the openai weights from
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0


class DownloadError(Exception):
    """A file could not be fetched; the message says why and what to do instead."""


def unreachable(url_or_host: str) -> str | None:
    """Why no connection to the server of ``url_or_host`` (port 443) opens within
    ``CONNECT_TIMEOUT_S``; None when it does, or when a proxy is configured (the proxy decides)."""
    host = urllib.parse.urlparse(url_or_host).hostname or url_or_host
    proxies = urllib.request.getproxies()
    if proxies.get("https") or proxies.get("all"):
        return None
    try:
        with socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as err:
        return f"{host} cannot be reached ({err})"


def hub_offline() -> None:
    """Put the Hugging Face hub in offline mode: files come from its cache, with no request."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # read when the hub was imported; set for this process too


def download_sam(out_dir: Path, force: bool = False) -> Path:
    """Download SAM ViT-B to ``out_dir/sam_vit_b_01ec64.pth`` and check that it loads."""
    import torch

    target = out_dir / SAM_FILE
    if target.is_file() and not force:
        logger.info("%s exists; skipping (use --force to download again)", target)
        return target
    partial = target.with_suffix(".pth.part")
    offline = f"fetch {SAM_URL} on a connected machine and copy it to {target}"
    why = unreachable(SAM_URL)
    if why is not None:
        raise DownloadError(f"{why}; {offline}")
    logger.info("downloading %s -> %s", SAM_URL, target)
    try:
        with (
            urllib.request.urlopen(SAM_URL, timeout=READ_TIMEOUT_S) as response,
            partial.open("wb") as f,
        ):
            shutil.copyfileobj(response, f, CHUNK_BYTES)
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"could not download {SAM_URL} ({err}); {offline}") from err
    state_dict = torch.load(partial, map_location="cpu", weights_only=True)
    if SAM_CHECK_KEY not in state_dict:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"{SAM_URL} did not give a SAM state dict; try again later")
    partial.replace(target)
    logger.info("saved %s (%.0f MB)", target, target.stat().st_size / 1e6)
    return target


def download_clip(out_dir: Path, force: bool = False) -> Path:
    """Fetch CLIP ViT-B/16 (openai) through open_clip and save its state dict to ``out_dir``;
    without a connection to the hub, from the hub's cache (offline mode) or not at all."""
    target = out_dir / CLIP_FILE
    if target.is_file() and not force:
        logger.info("%s exists; skipping (use --force to download again)", target)
        return target
    why = unreachable(HUB_HOST)
    if why is not None:
        hub_offline()
        logger.info("%s; looking for %s/%s in the hub's cache", why, CLIP_MODEL, CLIP_TAG)
    import open_clip
    import torch

    logger.info("fetching open_clip %s / %s", CLIP_MODEL, CLIP_TAG)
    try:
        model = open_clip.create_model(CLIP_MODEL, pretrained=CLIP_TAG, force_quick_gelu=True)
    except Exception as err:  # open_clip raises hub, HTTP and file errors of many kinds
        cause = f"{why}, and it is not in the hub's cache" if why else " ".join(str(err).split())
        raise DownloadError(
            f"open_clip could not fetch {CLIP_MODEL}/{CLIP_TAG} ({cause}); run this script on a "
            f"machine with internet and copy {target.name} from its weights folder to {target}"
        ) from err
    partial = target.with_suffix(".pt.part")
    torch.save(model.state_dict(), partial)
    partial.replace(target)
    logger.info("saved %s (%.0f MB)", target, target.stat().st_size / 1e6)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help=f"where to write (default: the weights folder, ${ENV_VAR} or ~/.cache/prompt_ris)",
    )
    parser.add_argument("--only", choices=["sam", "clip"], default=None)
    parser.add_argument("--force", action="store_true", help="download even if the file exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out_dir = args.out_dir or weights_dir()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, fetch in (("sam", download_sam), ("clip", download_clip)):
        if args.only not in (None, name):
            continue
        try:
            path = fetch(args.out_dir, args.force)
        except DownloadError as err:
            failed.append(name)
            sys.stderr.write(f"download_weights.py: error: {name}: {err}\n")
        else:
            logger.info("%s: ready at %s", name, path)
    if failed:
        raise SystemExit(1)
    if args.out_dir.resolve() != weights_dir().resolve():
        logger.info(
            "the configs find these files through the weights folder: export %s=%s",
            ENV_VAR, args.out_dir.resolve(),
        )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
