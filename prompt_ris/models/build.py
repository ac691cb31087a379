"""Build the parts of Prompt-RIS from a ModelConfig: open_clip CLIP, segment_anything SAM, and
the learned parts; ``PromptRIS.from_config`` assembles them.

Every preset ("vit_b", "tiny") goes through the same code; only the config numbers differ. Base
weights come from local files found through the weights folder (``prompt_ris.weights``: the CLIP
state dict and ``sam_vit_b_01ec64.pth`` that ``scripts/download_weights.py`` writes) or, for CLIP,
an open_clip tag such as "openai". Modules never read files themselves: this file does.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn

from prompt_ris.config import ClipConfig, ModelConfig, SAMConfig
from prompt_ris.frames import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from prompt_ris.models.cross_modal_prompting import PromptedCLIP
from prompt_ris.models.coarse_decoder import CoarseDecoder
from prompt_ris.models.fast_attention import use_sdpa_in_sam_encoder
from prompt_ris.models.frozen_sam import FrozenSAM
from prompt_ris.models.text_prompter import TextPrompter
from prompt_ris.prompt_switches import PromptSwitches
from prompt_ris.weights import (
    CLIP_FILE,
    DOWNLOAD_COMMAND,
    find_weights,
    locate_weights,
    missing_weights_message,
    names_a_file,
)

logger = logging.getLogger(__name__)

# SAM's fixed architecture numbers (segment_anything/build_sam.py).
SAM_PATCH_SIZE = 16
SAM_MASK_IN_CHANS = 16
SAM_NUM_MULTIMASK_OUTPUTS = 3
SAM_IOU_HEAD_DEPTH = 3
SAM_IOU_HEAD_HIDDEN_DIM = 256


def build_clip(cfg: ClipConfig, pretrained: str | None) -> CLIP:
    """Build open_clip's CLIP at ``cfg.image_size`` and load its weights.

    Position embeddings are resized (bicubic, open_clip's ``resize_pos_embed``) once, while the
    weights load: 14 x 14 -> 30 x 30 for ViT-B/16 at 480.

    Args:
        cfg: the CLIP section of the model config.
        pretrained: None (random weights), a weight file (an open_clip state dict, as written
            by ``scripts/download_weights.py``; a bare file name is looked up in the weights
            folder, see ``prompt_ris.weights``) or an open_clip pretrained tag for
            ``cfg.model_name`` (e.g. "openai"; downloaded by open_clip).

    Returns:
        An open_clip ``CLIP``.
    """
    if pretrained is None:
        return _clip_from_fields(cfg)
    if names_a_file(pretrained):
        path = locate_weights(pretrained, "model.clip.pretrained")
        model = _clip_from_fields(cfg)
        _load_clip_file(model, path)
        logger.info("loaded CLIP weights from %s", path)
        return model
    problem = _clip_tag_problem(pretrained, cfg.model_name, "model.clip.pretrained")
    if problem:
        raise ValueError(problem)
    try:
        model = open_clip.create_model(
            cfg.model_name,
            pretrained=pretrained,
            force_image_size=cfg.image_size,
            force_quick_gelu=cfg.quick_gelu,
        )
    except Exception as err:  # open_clip raises many kinds of network/hub errors
        raise RuntimeError(
            f"open_clip could not fetch '{cfg.model_name}' weights '{pretrained}' ({err}); "
            f"without internet, run `{DOWNLOAD_COMMAND}` on a connected machine, copy its files "
            f"into the weights folder here and set model.clip.pretrained={CLIP_FILE}"
        ) from err
    _check_clip_matches(model, cfg)
    return model


def _load_clip_file(model: CLIP, path: Path) -> None:
    """open_clip's ``load_checkpoint``; a file stored in half precision (fp16 or bf16) is
    widened to float32 first, so that its position embeddings are resized in float32 (CPU
    interpolation has no fp16 kernel) and load as they would anyway."""
    state = _mapped_state_dict(path) or {}
    half = (torch.float16, torch.bfloat16)
    narrow = {k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dtype in half}
    if not narrow:
        open_clip.load_checkpoint(model, str(path))
        return
    with tempfile.TemporaryDirectory() as tmp:
        widened = Path(tmp) / path.name
        torch.save({k: v.float() if k in narrow else v for k, v in state.items()}, widened)
        open_clip.load_checkpoint(model, str(widened))


def _mapped_state_dict(path: Path) -> dict | None:
    """The file's state dict, memory-mapped (its tensors are read only when used), or None for
    any other kind of file, which open_clip's loader then reads (and reports on) itself."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 (legacy or foreign formats: open_clip's loader decides)
        return None
    return state if isinstance(state, dict) else None


def _clip_tag_problem(tag: str, model_name: str, what: str) -> str | None:
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if tag in tags:
        return None
    return (
        f"{what}='{tag}' is neither a weight file (.pt, .pth, ...) nor an open_clip tag of "
        f"'{model_name}' (tags: {tags}); give a weight file or one of these tags"
    )


def base_weight_problems(
    model_cfg: ModelConfig, clip_weights: str | None = None, sam_weights: str | None = None
) -> list[str]:
    """What ``build_parts`` would fail on when it reads the base weights, without reading them:
    files that do not exist, unknown open_clip tags.

    Args:
        model_cfg: the model section.
        clip_weights: ``--clip-weights``, replacing ``model.clip.pretrained`` when given.
        sam_weights: ``--sam-weights``, replacing ``model.sam.checkpoint`` when given.

    Returns:
        One line per problem, each with its fix.
    """
    problems = []
    clip = clip_weights if clip_weights is not None else model_cfg.clip.pretrained
    clip_what = "--clip-weights" if clip_weights is not None else "model.clip.pretrained"
    if clip is not None:
        if names_a_file(clip):
            if find_weights(clip) is None:
                problems.append(missing_weights_message(clip, clip_what))
        else:
            problems.append(_clip_tag_problem(clip, model_cfg.clip.model_name, clip_what))
    sam = sam_weights if sam_weights is not None else model_cfg.sam.checkpoint
    sam_what = "--sam-weights" if sam_weights is not None else "model.sam.checkpoint"
    if sam is not None and find_weights(sam) is None:
        problems.append(missing_weights_message(sam, sam_what))
    return [p for p in problems if p]


def _clip_from_fields(cfg: ClipConfig) -> CLIP:
    for width, heads, name in (
        (cfg.vision_width, cfg.vision_heads, "vision"),
        (cfg.text_width, cfg.text_heads, "text"),
    ):
        if width % heads:
            raise ValueError(
                f"model.clip.{name}_width={width} is not divisible by {name}_heads={heads}"
            )
    if cfg.image_size % cfg.patch_size:
        raise ValueError(
            f"model.clip.image_size={cfg.image_size} is not a multiple of "
            f"patch_size={cfg.patch_size}"
        )
    vision_cfg = CLIPVisionCfg(
        layers=cfg.vision_layers,
        width=cfg.vision_width,
        head_width=cfg.vision_width // cfg.vision_heads,
        patch_size=cfg.patch_size,
        image_size=cfg.image_size,
    )
    text_cfg = CLIPTextCfg(
        context_length=cfg.context_length,
        vocab_size=cfg.vocab_size,
        width=cfg.text_width,
        heads=cfg.text_heads,
        layers=cfg.text_layers,
    )
    return CLIP(cfg.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=cfg.quick_gelu)


def _check_clip_matches(model: CLIP, cfg: ClipConfig) -> None:
    found = {
        "vision_width": model.visual.transformer.width,
        "vision_layers": len(model.visual.transformer.resblocks),
        "text_width": model.transformer.width,
        "text_layers": len(model.transformer.resblocks),
        "image_size": model.visual.image_size[0],
    }
    wrong = {k: v for k, v in found.items() if getattr(cfg, k) != v}
    if wrong:
        raise ValueError(
            f"open_clip '{cfg.model_name}' does not match model.clip: {wrong} (config: "
            f"{ {k: getattr(cfg, k) for k in wrong} }); fix model.clip or model.clip.model_name"
        )


def build_sam(cfg: SAMConfig, checkpoint: str | None) -> Sam:
    """Build segment_anything's ``Sam`` from the config numbers and load a checkpoint.

    Builds what segment_anything's private ``build_sam._build_sam`` builds, from config numbers:
    ``_build_sam`` fixes the image size, the prompt width and the decoder to ViT-B's, which the
    tiny preset changes. The vit_b preset gives ``sam_model_registry["vit_b"]`` exactly
    (``tests/test_build.py``).

    Args:
        cfg: the SAM section of the model config.
        checkpoint: a SAM state dict file (``sam_vit_b_01ec64.pth``; a bare file name is looked
            up in the weights folder, see ``prompt_ris.weights``), or None for random weights.
    """
    if cfg.image_size % SAM_PATCH_SIZE:
        raise ValueError(
            f"model.sam.image_size={cfg.image_size} is not a multiple of {SAM_PATCH_SIZE}"
        )
    embedding_size = cfg.image_size // SAM_PATCH_SIZE
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg.encoder_depth,
            embed_dim=cfg.encoder_embed_dim,
            img_size=cfg.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg.encoder_num_heads,
            patch_size=SAM_PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(cfg.encoder_global_attn_indexes),
            window_size=cfg.encoder_window_size,
            out_chans=cfg.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=SAM_MASK_IN_CHANS,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=SAM_NUM_MULTIMASK_OUTPUTS,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_num_heads,
            ),
            transformer_dim=cfg.prompt_embed_dim,
            iou_head_depth=SAM_IOU_HEAD_DEPTH,
            iou_head_hidden_dim=SAM_IOU_HEAD_HIDDEN_DIM,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    if checkpoint is not None:
        path = locate_weights(checkpoint, "model.sam.checkpoint")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        sam.load_state_dict(state_dict)
        logger.info("loaded SAM weights from %s", path)
    return sam


def _never_used(clip: CLIP, sam: Sam) -> list[nn.Parameter | nn.Module | None]:
    """Upstream weights no Prompt-RIS output depends on: kept frozen so every trainable
    parameter can receive a gradient (CLIP's joint-space heads, SAM's IoU head, the multimask
    hypernetworks, negative-point and box-corner embeddings)."""
    return [
        clip.visual.proj,
        clip.text_projection,
        clip.logit_scale,
        clip.logit_bias,
        sam.mask_decoder.iou_prediction_head,
        *sam.mask_decoder.output_hypernetworks_mlps[1:],
        sam.prompt_encoder.point_embeddings[0],
        sam.prompt_encoder.point_embeddings[2],
        sam.prompt_encoder.point_embeddings[3],
    ]


@dataclass
class PromptRISParts:
    """The modules and settings ``PromptRIS`` is assembled from (its keyword arguments)."""

    clip: PromptedCLIP
    decoder: CoarseDecoder
    sam: FrozenSAM
    text_prompter: TextPrompter
    text_length: int
    drop_probs: tuple[float, float, float]
    default_switches: PromptSwitches

    def as_kwargs(self) -> dict[str, object]:
        """The parts by name (the modules themselves, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def build_parts(
    model_cfg: ModelConfig, clip_weights: str | None = None, sam_weights: str | None = None
) -> PromptRISParts:
    """Build the parts of Prompt-RIS (Sec. 3) from a model config.

    Args:
        model_cfg: ``Config.model`` (a preset already applied, as ``load_config`` does).
        clip_weights: overrides ``model_cfg.clip.pretrained`` (a file or an open_clip tag).
        sam_weights: overrides ``model_cfg.sam.checkpoint`` (a file).

    Returns:
        The parts, with CLIP and SAM frozen as the config says and the learned parts trainable.
    """
    clip_cfg, sam_cfg, prompt_cfg = model_cfg.clip, model_cfg.sam, model_cfg.prompts
    clip = build_clip(clip_cfg, clip_weights if clip_weights is not None else clip_cfg.pretrained)
    sam = build_sam(sam_cfg, sam_weights if sam_weights is not None else sam_cfg.checkpoint)
    if sam_cfg.fast_attention:  # same math and weights, PyTorch's fused attention kernel
        use_sdpa_in_sam_encoder(sam.image_encoder)

    clip.requires_grad_(not clip_cfg.freeze)
    sam.image_encoder.requires_grad_(not sam_cfg.freeze_image_encoder)
    sam.prompt_encoder.requires_grad_(not sam_cfg.freeze_prompt_encoder)
    sam.mask_decoder.requires_grad_(not sam_cfg.freeze_mask_decoder)
    for item in _never_used(clip, sam):
        if item is not None:
            item.requires_grad_(False)

    # Built in this order, right after the base towers: the random initial weights of a seeded
    # run depend on it.
    prompted_clip = PromptedCLIP(
        clip=clip, num_prompts=model_cfg.cmp.num_prompts, num_heads=model_cfg.cmp.num_heads
    )
    decoder = CoarseDecoder(
        vision_dim=clip_cfg.vision_width,
        text_dim=clip_cfg.text_width,
        dim=model_cfg.decoder.dim,
        num_heads=model_cfg.decoder.num_heads,
        mlp_ratio=model_cfg.decoder.mlp_ratio,
        dropout=model_cfg.decoder.dropout,
    )
    frozen_sam = FrozenSAM(
        image_encoder=sam.image_encoder,
        prompt_encoder=sam.prompt_encoder,
        mask_decoder=sam.mask_decoder,
        freeze_image_encoder=sam_cfg.freeze_image_encoder,
        freeze_prompt_encoder=sam_cfg.freeze_prompt_encoder,
        gumbel_tau=prompt_cfg.gumbel_tau,
    )
    text_prompter = build_text_prompter(model_cfg, frozen_sam.pad_embed[0])
    return PromptRISParts(
        clip=prompted_clip,
        decoder=decoder,
        sam=frozen_sam,
        text_prompter=text_prompter,
        text_length=clip_cfg.text_length,
        drop_probs=(prompt_cfg.drop_mask, prompt_cfg.drop_point, prompt_cfg.drop_text),
        default_switches=PromptSwitches.parse(prompt_cfg.switches),
    )


def build_text_prompter(model_cfg: ModelConfig, pad_embed: torch.Tensor) -> TextPrompter:
    """A fresh text prompter as ``model.prompts`` says; ``pad_embed`` (D_S,) is SAM's padding
    token, the start of ``text_start="padding"``."""
    prompt_cfg = model_cfg.prompts
    text_prompter = TextPrompter(
        text_dim=model_cfg.clip.text_width,
        dim=model_cfg.sam.prompt_embed_dim,
        num_blocks=prompt_cfg.text_blocks,
        num_heads=prompt_cfg.text_heads,
        position=prompt_cfg.text_position,
        keys=prompt_cfg.text_keys,
    )
    if prompt_cfg.text_start == "padding":  # a token the frozen decoder knows (design.md)
        text_prompter.start_from(pad_embed)
    return text_prompter
