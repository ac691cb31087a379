"""Configuration schema: typed dataclasses, YAML diffs against the defaults, dotted overrides.

A YAML file in ``configs/`` holds only what differs from the defaults below. Any field can be
overridden on the command line as ``section.field=value`` (the value is parsed as a YAML scalar
and type-checked), e.g. ``train.lr=2e-4 model.cmp.num_prompts=8``.

What a user writes (config files, overrides) is read strictly: an unknown key or a value of the
wrong type is an error, all of them listed at once (``load_config(..., errors=[])``). What a
program wrote and reads back (a checkpoint's ``config.json``, a run's ``config.yaml``) is read by
``config_from_dict``: the model section strictly (it decides the architecture), every other
section tolerantly, with a warning for each unknown key, so a checkpoint written by a later
version with a new training option still loads.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from prompt_ris.prompt_switches import PromptSwitches, SwitchesError
from prompt_ris.weights import CLIP_FILE, SAM_FILE


TEXT_POSITIONS = ("keys", "keys+values", "values")  # model.prompts.text_position
TEXT_STARTS = ("padding", "random")  # model.prompts.text_start
TEXT_KEYS = ("linear", "mlp")  # model.prompts.text_keys


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
@dataclass
class ClipConfig:
    """CLIP towers (open_clip). Defaults: ViT-B/16 at 480 (Sec. 4.2)."""

    # A file in the weights folder (prompt_ris/weights.py), a path, an open_clip tag ("openai"),
    # or None for random weights.
    pretrained: str | None = CLIP_FILE
    model_name: str = "ViT-B-16"  # open_clip architecture the pretrained weights belong to
    image_size: int = 480  # CLIP input side, letterboxed (H_C = W_C = image_size / patch_size)
    patch_size: int = 16
    vision_width: int = 768  # D_IC
    vision_layers: int = 12
    vision_heads: int = 12
    text_width: int = 512  # D_T
    text_layers: int = 12
    text_heads: int = 8
    embed_dim: int = 512  # joint CLIP embedding width (output of the projections)
    vocab_size: int = 49408  # CLIP BPE vocabulary
    context_length: int = 77  # length of CLIP's text position table (weights), not the input length
    text_length: int = 22  # tokens per expression incl. [SOS]/[EOS]; longer ones are cut
    quick_gelu: bool = True  # the OpenAI weights were trained with QuickGELU
    freeze: bool = True  # freeze CLIP's own weights (gradients still flow through them)


@dataclass
class CMPConfig:
    """Cross-Modal Prompting (Sec. 3.2, eqs. 5-6)."""

    num_prompts: int = 16  # n learnable queries per direction and layer; 0 switches CMP off
    num_heads: int = 8  # heads of the prompt cross-attention


@dataclass
class DecoderConfig:
    """Cross-modal decoder producing t_g, F'_IC and the coarse mask (eqs. 1-2)."""

    dim: int = 512  # D_C, width of the decoder (both modalities are projected to it)
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0


@dataclass
class SAMConfig:
    """SAM (segment_anything). Defaults: ViT-B at 1024."""

    checkpoint: str | None = SAM_FILE  # weights folder file, a path; None = random
    image_size: int = 1024  # SAM input side, letterboxed; embedding is image_size / 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    encoder_window_size: int = 14
    prompt_embed_dim: int = 256  # D_S
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    freeze_image_encoder: bool = True  # run without gradient, once per image
    freeze_prompt_encoder: bool = True
    freeze_mask_decoder: bool = True
    fast_attention: bool = True  # image encoder attention as one fused SDPA call (same math)


@dataclass
class PromptConfig:
    """CLIP-based prompting of SAM (Sec. 3.1, eq. 3) and prompt dropout (Sec. 4.2)."""

    switches: str = "mask + point + text"  # prompt types reaching SAM (Table 5; "none" for none)
    text_blocks: int = 2  # transformer blocks of the text prompter
    text_heads: int = 8
    # Where SAM's dense position encoding enters the text prompter's cross-attention to F_IS:
    # "keys" (where a text token looks), "values" (what it reads back) or "keys+values".
    text_position: str = "keys"
    # The text prompter's start: "padding" (every P_text token is SAM's padding token until
    # training moves it) or "random" (PyTorch's default initialisation).
    text_start: str = "padding"
    # How the prompter's cross-attention keys are made from F_IS: "linear" (the paper: one
    # projection of each cell) or "mlp" (each cell through a residual MLP first, so that what the
    # frozen SAM holds non-linearly, such as shape, can be matched by the words; values unchanged).
    text_keys: str = "linear"
    gumbel_tau: float = 1.0  # temperature of the straight-through Gumbel-softmax
    drop_mask: float = 0.2  # per-sample probability of dropping each prompt in stage 2
    drop_point: float = 0.2
    drop_text: float = 0.2


@dataclass
class ModelConfig:
    preset: str = "vit_b"  # "vit_b" (the paper) or "tiny"; a preset fills the fields below
    clip: ClipConfig = field(default_factory=ClipConfig)
    cmp: CMPConfig = field(default_factory=CMPConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    sam: SAMConfig = field(default_factory=SAMConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)


# --------------------------------------------------------------------------------------------
# Data, training, evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    prepared: str = "data/prepared"  # output of scripts/prepare_data.py (Arrow)
    image_dir: str | None = None  # image folder override; None = the paths stored when prepared
    train: str = "combined"  # "combined" (paper) or "<dataset>:<split>", e.g. "refcoco:train_seen"
    val: str = "refcoco:val"  # validation split during training (never a test split)
    images_per_step: int = 16  # I: images per optimizer step over all processes (paper: 16)
    images_per_process: int | None = None  # per process and forward; None = I / processes
    expressions_per_image: int = 4  # b (paper: 4, so B = 64 expressions per step)
    word_mask_prob: float = 0.15  # share of words masked in resampled (filler) expressions
    num_workers: int = 2
    max_val_expressions: int | None = None  # cap validation size during training (None = all)


@dataclass
class TrainConfig:
    output_dir: str = "checkpoints/run"
    stage1_epochs: int = 20  # CLIP + CMP + ICL, coarse masks only
    stage2_epochs: int = 30  # whole model end to end
    lr: float = 1e-4
    weight_decay: float = 0.01
    poly_power: float = 0.9  # lr = lr0 * (1 - step / total) ** power
    epoch_unit: str = "images"  # "images": each image once; "expressions": every expression once
    mixed_precision: str = "auto"  # "auto" (bf16 where supported), "bf16", "fp16" (GPU), "no"
    # "auto" leaves the choice to `accelerate launch --mixed_precision` / `accelerate config` when
    # launched by it (bf16 where supported otherwise); any other value overrides the launcher.
    seed: int = 42
    log_every: int = 20  # steps between log lines
    val_every: int = 1  # epochs between validations
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests)
    icl_weight: float = 1.0
    # Weight of the text grounding loss (stage 2): the cross-entropy of where the text prompter's
    # tokens read F_IS against the referent's cells (losses.text_grounding_loss). 0 = the paper,
    # which has no such term; docs/design.md says when it helps.
    text_grounding_weight: float = 0.0
    # lr0 of the text prompter (None: train.lr). It first trains in stage 2, when the poly
    # schedule has already decayed the run's lr; not in the paper.
    text_prompter_lr: float | None = None
    num_overlays: int = 4  # mask overlays written to TensorBoard per validation
    tracker: str = "tensorboard"  # accelerate tracker: "tensorboard", "wandb", "all" or "none"
    # torch.compile through accelerate: None = the launcher's --dynamo_backend; true = inductor.
    compile: bool | None = None
    sam_embed_cache: str | None = None  # folder caching frozen SAM image embeddings (stage 2)
    save_every_steps: int | None = None  # extra resumable checkpoint every N optimizer steps
    keep_checkpoints: int = 2  # newest resumable checkpoints kept in <output_dir>/checkpoints
    stop_at_step: int | None = None  # save and stop at this global step (resume with --resume)
    best_metric: str = "oIoU"  # validation metric that picks <output_dir>/best (oIoU or mIoU)


@dataclass
class EvalConfig:
    splits: list[str] = field(default_factory=lambda: ["refcoco:val"])
    threshold: float = 0.5  # probability threshold for a foreground pixel
    batch_images: int = 8
    output_dir: str | None = None  # default <checkpoint's folder>/eval/<checkpoint name>
    save_masks: bool = False
    num_overlays: int = 0
    overlay_order: str = "first"  # "first" or "worst"
    random_baseline: bool = True  # also score the random-object baseline (output "random")
    baseline_seed: int = 0  # seed of the random-object baseline's draws
    max_expressions: int | None = None  # per split: a fixed subset of whole images (quick checks)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's model: CLIP ViT-B/16 at 480, SAM ViT-B at 1024, n = 16 at all 12 layers.
    "vit_b": {},
    # Same structure, same freezing, small widths and depths: the CPU demo and the tests. Its
    # base weights are the miniature foundations committed in checkpoints/tiny_synthetic/ (made
    # by scripts/pretrain_foundations.py); tests override them with random weights (null).
    "tiny": {
        "clip": {
            "pretrained": "checkpoints/tiny_synthetic/clip_tiny_synthetic.pt",
            "model_name": "tiny",
            "image_size": 128,
            "patch_size": 8,
            "vision_width": 64,
            "vision_layers": 3,
            "vision_heads": 2,
            "text_width": 64,
            "text_layers": 3,
            "text_heads": 2,
            "embed_dim": 64,
            "context_length": 77,
            "text_length": 16,
            "quick_gelu": False,
        },
        "cmp": {"num_prompts": 4, "num_heads": 2},
        "decoder": {"dim": 64, "num_heads": 2},
        "sam": {
            "checkpoint": "checkpoints/tiny_synthetic/sam_tiny_synthetic.pth",
            "image_size": 256,
            "encoder_embed_dim": 64,
            "encoder_depth": 2,
            "encoder_num_heads": 2,
            "encoder_global_attn_indexes": [1],
            "encoder_window_size": 4,
            "prompt_embed_dim": 64,
            "decoder_depth": 2,
            "decoder_mlp_dim": 128,
            "decoder_num_heads": 2,
        },
        "prompts": {"text_heads": 2},
    },
}


# --------------------------------------------------------------------------------------------
# Loading, overriding, dumping
# --------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A config file or override names an unknown key or a value of the wrong type.

    Attributes:
        key: the dotted key at fault (``train.lr``), when known.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _check_switches(value: str) -> None:
    try:
        PromptSwitches.parse(value)
    except SwitchesError as err:
        raise ConfigError(f"model.prompts.switches: {err}") from None


def _choice(path: str, choices: tuple[str, ...]) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ConfigError(f"{path}: expected one of {', '.join(choices)}, got {value!r}")

    return check


def _non_negative(path: str) -> Callable[[float], None]:
    def check(value: float) -> None:
        if value < 0:
            raise ConfigError(f"{path}: expected a weight >= 0, got {value!r}")

    return check


def _positive_lr(path: str) -> Callable[[float | None], None]:
    def check(value: float | None) -> None:
        if value is not None and value <= 0:
            raise ConfigError(f"{path}: expected a learning rate > 0 (or null), got {value!r}")

    return check


CHECKS = {  # values a type alone does not check
    "model.prompts.switches": _check_switches,
    "model.prompts.text_position": _choice("model.prompts.text_position", TEXT_POSITIONS),
    "model.prompts.text_start": _choice("model.prompts.text_start", TEXT_STARTS),
    "model.prompts.text_keys": _choice("model.prompts.text_keys", TEXT_KEYS),
    "train.icl_weight": _non_negative("train.icl_weight"),
    "train.text_grounding_weight": _non_negative("train.text_grounding_weight"),
    "train.text_prompter_lr": _positive_lr("train.text_prompter_lr"),
}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int widens to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept any float literal for a float field.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if tp is str and isinstance(value, bool):
        # YAML 1.1 reads an unquoted no / yes (off / on) as a boolean; a string field means the
        # word, e.g. train.mixed_precision=no.
        return "yes" if value else "no"
    if tp is str and isinstance(value, (int, float)):
        return str(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _merge(
    obj: Any, diff: dict[str, Any], where: str, errors: list[ConfigError] | None = None
) -> None:
    """Apply a nested dict onto a dataclass instance in place, strictly.

    Args:
        errors: when given, each bad key or value is appended to it (and skipped) instead of
            raised, so that all of them can be reported at once.
    """
    types_ = _field_types(type(obj))
    for key, value in diff.items():
        path = f"{where}.{key}" if where else key
        try:
            if key not in types_:
                close = difflib.get_close_matches(key, list(types_), n=1)
                prefix = f"{where}." if where else ""
                hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
                raise ConfigError(f"unknown config key '{path}'{hint}")
            current = getattr(obj, key)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"{path}: expected a mapping, got {value!r}")
                _merge(current, value, path, errors)
            else:
                value = _coerce(value, types_[key], path)
                if path in CHECKS:
                    CHECKS[path](value)
                setattr(obj, key, value)
        except ConfigError as err:
            err.key = err.key or path
            if errors is None:
                raise
            errors.append(err)


def _dotted_to_nested(overrides: list[str]) -> list[dict[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        nested: dict[str, Any] = {}
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        out.append(nested)
    return out


def apply_preset(cfg: Config) -> None:
    """Fill ``cfg.model`` from its preset before the file's own model keys are applied."""
    if cfg.model.preset not in MODEL_PRESETS:
        raise ConfigError(
            f"model.preset '{cfg.model.preset}' is unknown; choose one of {sorted(MODEL_PRESETS)}"
        )
    _merge(cfg.model, MODEL_PRESETS[cfg.model.preset], "model")


def load_config(
    path: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    errors: list[ConfigError] | None = None,
    base: Config | None = None,
) -> Config:
    """Build a Config: defaults, then the model preset, then the YAML file, then overrides.

    Args:
        path: a YAML file (or an already-parsed dict) holding differences from the defaults.
        overrides: ``section.key=value`` strings applied last.
        errors: when given, every unknown key, bad value or malformed override is appended to it
            and skipped (the Config of what was valid is returned); otherwise the first raises.
        base: the Config the file and overrides apply to instead of the defaults and preset
            (a checkpoint's own config); it is not changed.

    Raises:
        FileNotFoundError: ``path`` does not exist (also collected into ``errors``, as a
            ConfigError, when given).
        ConfigError: a bad key or value, when ``errors`` is None.
    """
    diffs: list[dict[str, Any]] = []
    try:
        diffs.extend(_read_diffs(path))
    except (ConfigError, FileNotFoundError) as err:
        if errors is None:
            raise
        errors.append(err if isinstance(err, ConfigError) else ConfigError(str(err)))
    for item in overrides or []:
        try:
            diffs.extend(_check_diff(diff) for diff in _dotted_to_nested([item]))
        except ConfigError as err:
            if errors is None:
                raise
            errors.append(err)
    if base is not None:
        cfg = copy.deepcopy(base)
        for diff in diffs:
            _merge(cfg, diff, "", errors)
        return cfg
    # The preset is chosen first (from any layer), then every layer is applied on top of it.
    preset = "vit_b"
    for diff in diffs:
        preset = diff.get("model", {}).get("preset", preset)
    cfg = Config()
    cfg.model.preset = preset
    try:
        apply_preset(cfg)
    except ConfigError as err:
        if errors is None:
            raise
        errors.append(err)
        cfg = Config()
    for diff in diffs:
        _merge(cfg, diff, "", errors)
    return cfg


def apply_overrides(
    cfg: Config, overrides: list[str], errors: list[ConfigError] | None = None
) -> Config:
    """Apply ``section.key=value`` overrides to ``cfg`` in place, strictly (see ``load_config``
    for ``errors``); ``model.preset`` cannot change here (the preset fills the model first)."""
    for item in overrides:
        try:
            diffs = _dotted_to_nested([item])
            if "preset" in diffs[0].get("model", {}):
                raise ConfigError(
                    f"override '{item}': model.preset cannot change here; the model comes from "
                    "the saved config", key="model.preset",
                )  # fmt: skip
        except ConfigError as err:
            if errors is None:
                raise
            errors.append(err)
            continue
        _merge(cfg, diffs[0], "", errors)
    return cfg


def _read_diffs(path: str | Path | dict[str, Any] | None) -> list[dict[str, Any]]:
    """The config file (or dict) as a list of at most one diff, checked to be a mapping."""
    if path is None:
        return []
    if isinstance(path, dict):
        diff = path
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file '{path}' not found; see configs/ for examples")
        try:
            diff = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            reason = " ".join(str(err).split())
            raise ConfigError(f"config file '{path}' is not valid YAML: {reason}") from None
    return [_check_diff(diff)]


def _check_diff(diff: Any) -> dict[str, Any]:
    """A diff is a mapping of sections, and its model section a mapping (the preset is read
    from it before anything is merged)."""
    if not isinstance(diff, dict):
        raise ConfigError(f"a config holds a mapping of sections, got {diff!r}")
    if not isinstance(diff.get("model", {}), dict):
        raise ConfigError(f"model: expected a mapping, got {diff['model']!r}", key="model")
    return diff


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


STRICT_SECTIONS = ("model",)  # read back strictly: they decide the architecture


def config_from_dict(data: dict[str, Any], source: str = "a saved config") -> Config:
    """Rebuild a Config from ``config_to_dict`` output (a checkpoint's config.json, a run's
    config.yaml).

    The model section is read strictly. Any other unknown key or invalid value (a setting of a
    later or earlier version) is skipped with a warning naming ``source``, keeping the default.

    Raises:
        ConfigError: the model section (or the mapping itself) is invalid.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a config holds a mapping of sections, got {type(data).__name__}")
    cfg = Config()
    errors: list[ConfigError] = []
    _merge(cfg, data, "", errors)
    for err in errors:
        if (err.key or "").split(".")[0] in STRICT_SECTIONS:
            raise err
        warnings.warn(f"{source}: {err}; ignored (written by another version?)", stacklevel=2)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = config_to_dict(cfg)
    if path.suffix in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2))
