"""The checkpoint format of trained Prompt-RIS models: safetensors weights + the config as JSON.

This module writes and reads the files and checks them against a model; it does not build models
(``PromptRIS.from_pretrained`` builds one from the config read here, then fills it).

A checkpoint is a directory holding

- ``model.safetensors``: by default only what the base-weight files cannot give back: the learned
  parameters (``requires_grad``, from ``PromptRIS.learnable_state_dict()``) plus any tensor of a
  tower whose config names no base weights (``model.clip.pretrained`` or ``model.sam.checkpoint``
  null: those weights, and buffers such as SAM's random positional-encoding matrix, exist only in
  this model). For the paper's config that is exactly the learned parameters. With
  ``self_contained=True``: every parameter and persistent buffer, base CLIP and SAM included;
- ``config.json``: ``{"format": "prompt-ris", "format_version": 1, "config": <resolved Config>,
  "base_weights": {...}, "self_contained": bool, "learned_keys": [...], "training": {...}}``, the
  layout ``engine.checkpointing.export_pretrained`` writes too. ``config.model.clip.pretrained``
  and ``config.model.sam.checkpoint`` name the base weights a learned-only checkpoint is rebuilt
  on (by file name, found in the weights folder: ``prompt_ris.weights``). A bare
  ``config_to_dict(Config)`` is accepted as well. The model section is read strictly; unknown
  keys elsewhere (a training option of a later version) are skipped with a warning
  (``config.config_from_dict``).

Relative paths in a checkpoint's config (``model.clip.pretrained``, ``model.sam.checkpoint``,
``data.prepared``, ``data.image_dir``) were written relative to the folder training ran in, so
reading resolves them against the checkpoint itself, never the current directory: the first that
exists of the path under the checkpoint's folder, under each folder above it (a run inside the
project it was trained in finds ``checkpoints/...`` and ``data/...``), the file of that name in
the weights folder (base weights only), and the path under the prompt-ris source tree (the tiny
preset's committed foundations); when none exists, the path under the checkpoint's folder, which
the error then names (``prompt_ris.weights``, docs/design.md "Weights and checkpoints").

The safetensors header repeats config.json and records which of the two kinds the file is, so a
``.safetensors`` file alone is loadable too. Nothing is ever unpickled: loading reads only
safetensors and JSON. Loading refuses tensors holding NaN or infinity (a diverged run), which
would otherwise give empty masks without a word. Files are written with the permissions of any
new file (the umask), not safetensors' owner-only 0600.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIP, CustomTextCLIP
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder
from torch import nn

from prompt_ris.config import Config, ConfigError, ModelConfig, config_from_dict, config_to_dict
from prompt_ris.weights import anchored, find_weights, is_bare_name, names_a_file

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_NAME = "prompt-ris"  # config.json "format"
FORMAT_VERSION = 1  # config.json "format_version"; loading refuses newer versions
HEADER_CONFIG_KEY = "prompt_ris_config"  # safetensors metadata: config.json as a string
HEADER_KIND_KEY = "prompt_ris_weights"  # safetensors metadata: KIND_LEARNED or KIND_FULL
KIND_LEARNED = "learned"  # learned parameters (+ random-base towers); base weights from files
KIND_FULL = "full"  # every parameter and persistent buffer (self-contained)
MAX_LISTED_KEYS = 20  # keys listed per category in a mismatch message

HOW_TO_GET = (
    "a checkpoint is a directory with model.safetensors and config.json, written by "
    "scripts/train.py (under train.output_dir) or PromptRIS.save_pretrained; train one with "
    "`accelerate launch scripts/train.py --config configs/<name>.yaml`"
)


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not match the model its config builds."""


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    *,
    config: Config | ModelConfig,
    self_contained: bool = False,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``.

    Args:
        model: the model to save (unwrapped: no DDP ``module.`` or compile ``_orig_mod.``).
        directory: created if needed; existing files of the same names are replaced.
        config: the resolved config the model was built from (a bare ``ModelConfig`` is wrapped
            into an otherwise default ``Config``).
        self_contained: store every parameter and buffer, base weights included, so that loading
            needs no base-weight files; otherwise store what the base-weight files named by the
            config cannot give back (see the module docstring).
        training: facts stored under ``"training"`` in config.json (stage, epoch, metrics).

    Returns:
        The path of the written ``model.safetensors``.
    """
    if isinstance(config, ModelConfig):
        config = Config(model=config)
    state = model.state_dict()
    kind = KIND_FULL if self_contained else KIND_LEARNED
    if not self_contained:
        keys = stored_keys(model, config.model)
        state = {k: v for k, v in state.items() if k in keys}
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config_to_dict(config),
        "base_weights": {
            "clip_model": config.model.clip.model_name,
            "clip_pretrained": config.model.clip.pretrained,
            "sam_checkpoint": config.model.sam.checkpoint,
        },
        "self_contained": self_contained,
        "learned_keys": sorted(state),
        "training": training or {},
    }
    meta_json = json.dumps(meta, indent=2)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / WEIGHTS_NAME
    save_file(
        _plain_tensors(state),
        str(weights_path),
        metadata={"format": "pt", HEADER_KIND_KEY: kind, HEADER_CONFIG_KEY: meta_json},
    )
    chmod_like_new_file(weights_path)  # safetensors writes 0600
    (directory / CONFIG_NAME).write_text(meta_json + "\n", encoding="utf-8")
    logger.info("saved %d %s tensors to %s", len(state), kind, weights_path)
    return weights_path


@dataclass
class Checkpoint:
    """A checkpoint as read from disk (header and config only; tensors are read on loading).

    Attributes:
        weights_path: the ``model.safetensors`` file.
        config: the resolved ``Config`` the model was trained with.
        kind: ``"learned"`` (base weights come from files) or ``"full"`` (self-contained).
        shapes: ``{key: shape}`` of the stored tensors.
        training: what training stored about the export (stage, epochs, metrics), or ``{}``.
    """

    weights_path: Path
    config: Config
    kind: str
    shapes: dict[str, tuple[int, ...]]
    training: dict[str, Any] = field(default_factory=dict)

    def build_args(
        self, clip_weights: str | None = None, sam_weights: str | None = None
    ) -> tuple[ModelConfig, str | None, str | None]:
        """(model config, CLIP weights, SAM weights) to build the model this checkpoint fills.

        A self-contained checkpoint is built on random base weights (every tensor is
        overwritten, so no base file is read); a learned-only one on the base weights its
        config names, or on ``clip_weights`` / ``sam_weights`` when given. A tower trained from
        random weights is stored whole, so an override for it is ignored with a warning.
        """
        model_cfg = copy.deepcopy(self.config.model)
        if self.kind == KIND_FULL:
            if clip_weights is not None or sam_weights is not None:
                logger.info(
                    "%s is self-contained; ignoring the base-weight overrides", self.weights_path
                )
            model_cfg.clip.pretrained = None
            model_cfg.sam.checkpoint = None
            return model_cfg, None, None
        for tower, override, base in (
            ("CLIP", clip_weights, model_cfg.clip.pretrained),
            ("SAM", sam_weights, model_cfg.sam.checkpoint),
        ):
            if override is not None and base is None:
                logger.warning(
                    "%s stores all its %s weights (trained from random ones); ignoring %s",
                    self.weights_path, tower, override,
                )  # fmt: skip
        return (
            model_cfg,
            clip_weights if model_cfg.clip.pretrained is not None else None,
            sam_weights if model_cfg.sam.checkpoint is not None else None,
        )

    def load_into(self, model: nn.Module) -> None:
        """Check keys and shapes against ``model`` strictly, then load the stored tensors.

        Raises:
            CheckpointError: listing missing, unexpected and shape-mismatched keys.
        """
        state = model.state_dict()
        if self.kind == KIND_FULL:
            expected = state
        else:
            keys = stored_keys(model, self.config.model)  # by the config it was saved with
            expected = {k: v for k, v in state.items() if k in keys}
        shapes = {key: tuple(value.shape) for key, value in expected.items()}
        _check_keys(self.weights_path, self.shapes, shapes)
        tensors = _load_tensors(self.weights_path)
        _check_finite(self.weights_path, tensors)
        result = model.load_state_dict(tensors, strict=self.kind == KIND_FULL)
        # Learned-only: what the file leaves out came from the base-weight files.
        assert not result.unexpected_keys, result.unexpected_keys
        assert not set(result.missing_keys) & set(expected), result.missing_keys
        logger.info(
            "loaded %s checkpoint %s (%d tensors)", self.kind, self.weights_path, len(tensors)
        )


def read_checkpoint(directory_or_file: str | Path) -> Checkpoint:
    """Read a checkpoint's header and config, without its tensors.

    Args:
        directory_or_file: a checkpoint directory, or a ``.safetensors`` file written by
            :func:`save_pretrained` (config.json beside it, else the copy in its header).

    Raises:
        FileNotFoundError: the checkpoint (or its config) does not exist; the message says how
            to get one.
        CheckpointError: the file is unreadable or not a ``.safetensors`` file (for another
            file of a checkpoint, the message names its folder), or its config is invalid.
    """
    weights_path, config_path = _resolve_paths(Path(directory_or_file))
    header, shapes = _read_header(weights_path)
    meta, source = _read_meta(config_path, header.get(HEADER_CONFIG_KEY), weights_path)
    cfg = _config_from_meta(meta, source)
    resolve_saved_paths(cfg, weights_path.parent.resolve())
    kind = header.get(HEADER_KIND_KEY, KIND_FULL if meta.get("self_contained") else KIND_LEARNED)
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    return Checkpoint(
        weights_path=weights_path, config=cfg, kind=kind, shapes=shapes, training=training
    )


def resolve_saved_paths(cfg: Config, anchor: Path) -> None:
    """Replace each relative path of a checkpoint's config, in place, by the file or folder it
    names, looked for from ``anchor`` (the checkpoint's folder; see the module docstring)."""
    clip, sam = cfg.model.clip, cfg.model.sam
    if _relative(clip.pretrained) and names_a_file(clip.pretrained):
        clip.pretrained = str(find_weights(clip.pretrained, anchor) or anchor / clip.pretrained)
    if _relative(sam.checkpoint):
        sam.checkpoint = str(find_weights(sam.checkpoint, anchor) or anchor / sam.checkpoint)
    for key in ("prepared", "image_dir"):
        value = getattr(cfg.data, key)
        if value is not None and not Path(value).expanduser().is_absolute():
            found = (path for path in anchored(value, anchor) if path.exists())
            setattr(cfg.data, key, str(next(found, anchor / value)))


def _relative(value: str | None) -> bool:
    """A relative path with a folder part (a bare file name means the weights folder)."""
    return (
        value is not None and not is_bare_name(value) and not Path(value).expanduser().is_absolute()
    )


def stored_keys(model: nn.Module, model_cfg: ModelConfig) -> set[str]:
    """State-dict keys a learned-only checkpoint stores: learned parameters (``requires_grad``),
    plus every tensor that no base-weight file named by ``model_cfg`` provides."""
    kinds: list[type[nn.Module]] = []
    if model_cfg.clip.pretrained is not None:
        kinds += [CLIP, CustomTextCLIP]
    if model_cfg.sam.checkpoint is not None:
        kinds += [ImageEncoderViT, PromptEncoder, MaskDecoder]
    from_files = tuple(
        f"{name}." for name, module in model.named_modules() if isinstance(module, tuple(kinds))
    )
    learned = {name for name, param in model.named_parameters() if param.requires_grad}
    return learned | {k for k in model.state_dict() if not k.startswith(from_files)}


def chmod_like_new_file(path: str | Path) -> None:
    """Give ``path`` the permissions a new file gets (0666 minus the umask), as ``open`` would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError when a floating tensor holds NaN or infinity."""
    bad = sorted(
        key
        for key, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    )
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(
            f"'{path}' holds NaN or infinite values in {len(bad)} tensor(s) ({shown}); the run "
            "that wrote it diverged, and its masks would be empty. Use an earlier export (best/ "
            "or stage1/) or retrain from an earlier checkpoint with a lower train.lr"
        )


def _plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; safetensors refuses tensors that share memory."""
    out, seen = {}, set()
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
        seen.add(ptr)
        out[key] = tensor
    return out


def _resolve_paths(path: Path) -> tuple[Path, Path]:
    """(weights file, config file) for a checkpoint directory or a weights file."""
    if path.is_dir():
        weights_path = path / WEIGHTS_NAME
        if not weights_path.is_file():
            exports = sorted(p.parent for p in path.glob(f"*/{WEIGHTS_NAME}"))
            if exports:  # a training run folder: its exports are one level down
                names = " or ".join(f"'{p}'" for p in exports)
                raise FileNotFoundError(
                    f"'{path}' is a training run folder, not a checkpoint; pass one of its "
                    f"exports: {names} (best/ is the best validation score, final/ the end)"
                )
            raise FileNotFoundError(
                f"checkpoint file '{weights_path}' not found in '{path}'; {HOW_TO_GET}"
            )
        return weights_path, path / CONFIG_NAME
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(_not_weights_file(path))
        return path, path.parent / CONFIG_NAME
    raise FileNotFoundError(f"checkpoint '{path}' not found; {HOW_TO_GET}")


def _not_weights_file(path: Path) -> str:
    """Why a file other than a ``.safetensors`` file is no checkpoint, and what to pass."""
    if (path.parent / WEIGHTS_NAME).is_file():
        return (
            f"'{path}' is a file of the checkpoint, not the checkpoint; pass the folder "
            f"'{path.parent}'"
        )
    return f"'{path}' is not a checkpoint (a .safetensors file or its folder); {HOW_TO_GET}"


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(safetensors metadata, {key: shape}) without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"'{path}' is not a readable safetensors file ({err}); it is corrupt or truncated: "
            "copy or export the checkpoint again"
        ) from err
    kind = header.get(HEADER_KIND_KEY, KIND_LEARNED)
    if kind not in (KIND_LEARNED, KIND_FULL):
        raise CheckpointError(
            f"'{path}' has {HEADER_KIND_KEY}={kind!r}; expected '{KIND_LEARNED}' or '{KIND_FULL}'"
        )
    return header, shapes


def _read_meta(
    config_path: Path, header_text: str | None, weights_path: Path
) -> tuple[dict[str, Any], str]:
    """(config.json beside the weights, else the copy in their header; where it came from)."""
    if config_path.is_file():
        text, source = config_path.read_text(encoding="utf-8"), f"'{config_path}'"
    elif header_text is not None:
        text, source = header_text, f"the header of '{weights_path}'"
    else:
        raise FileNotFoundError(
            f"config file '{config_path}' not found (and '{weights_path}' carries none); "
            f"the config.json written with the weights is needed to rebuild the model; {HOW_TO_GET}"
        )
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{source} is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source} holds a {type(meta).__name__}, expected a JSON object")
    return meta, source


def _config_from_meta(meta: dict[str, Any], source: str) -> Config:
    """The Config of a config.json: the ``"config"`` of the wrapper, or a bare Config dict."""
    if "format" in meta:
        if meta["format"] != FORMAT_NAME:
            raise CheckpointError(
                f"{source} has format {meta['format']!r}; expected '{FORMAT_NAME}'"
            )
        version = meta.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source} has format_version {version!r}; this prompt-ris reads versions up to "
                f"{FORMAT_VERSION}: upgrade prompt-ris"
            )
        data = meta.get("config")
    else:
        data = meta
    try:
        return config_from_dict(data, source=source)
    except (ConfigError, TypeError, AttributeError) as err:
        raise CheckpointError(f"the config in {source} is invalid: {err}") from err


def _check_keys(
    path: Path, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
) -> None:
    """Raise CheckpointError listing missing, unexpected and shape-mismatched keys."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{key}: checkpoint {list(found[key])} vs model {list(expected[key])}"
        for key in set(found) & set(expected)
        if found[key] != expected[key]
    )
    if not (missing or unexpected or mismatched):
        return
    parts = [f"checkpoint '{path}' does not match the model built from its config"]
    for title, items in (
        ("missing from the checkpoint", missing),
        ("unexpected in the checkpoint", unexpected),
        ("shape mismatch", mismatched),
    ):
        if items:
            shown = items[:MAX_LISTED_KEYS]
            more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
            parts.append(f"{title} ({len(items)}): {', '.join(shown)}{more}")
    parts.append(
        "the weights were saved for another config: load them with the config.json written "
        "beside them (same model.preset, widths, depths, cmp.num_prompts and freeze flags)"
    )
    raise CheckpointError("; ".join(parts))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}
