"""Contrastive pretraining of the tiny CLIP on synthetic image-caption pairs.

open_clip's ``CLIP`` (built by ``prompt_ris.models.build.build_clip`` from the config numbers) is
trained with open_clip's ``ClipLoss`` on scenes from ``prompt_ris.miniature.captions``, letterboxed
into the CLIP frame as Prompt-RIS's data pipeline does it. Two things make it learn shapes:

- *Hard-negative groups.* Colour alone nearly solves the contrastive task on these scenes (four
  colours, several objects), so batches hold a scene and variants of it that differ in one
  object's shape (or colour, or a mirrored layout), captioned with the same template, so that the
  captions differ in that one word and only the shape tells them apart.
- *Steps, bought at low resolution.* A ViT trained from scratch on flat shapes learns nothing
  about shape for hundreds of steps, then learns it quickly (measured on single-shape
  classification: 25% after 300 steps, 84% after 1000, 94% after 2000, chance 14%). Phase 1
  therefore runs many cheap steps at 64 px (an 8 x 8 patch grid, single objects and pairs at the
  pixel size they have in the 128 px frame); phase 2 continues at the model's resolution on scenes
  like the referring data's. The position embeddings move between the two as a checkpoint's do
  when it loads (CLIP ViT-B/16 is pretrained at 224 and used at 480 the same way).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.model import CLIP, resize_pos_embed
from PIL import Image

from prompt_ris.config import ClipConfig
from prompt_ris.data.text import tokenize
from prompt_ris.data.transforms import letterbox_clip
from prompt_ris.miniature.captions import (
    SceneSpec,
    caption_scene,
    hard_variants,
    paint_scene,
    sample_captioned_spec,
)
from prompt_ris.miniature.synthetic import IMAGE_SIDES, OBJECT_SIDE
from prompt_ris.models.build import build_clip

logger = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its temperature at 100


@dataclass
class ClipPhase:
    """One phase of the pretraining: how many steps, at which resolution, on which scenes."""

    steps: int
    image_size: int | None = None  # CLIP frame side; None = the model config's
    image_sides: tuple[int, ...] | None = None  # scene widths/heights; None = the RIS data's
    kind_weights: dict[str, float] = field(
        default_factory=lambda: {"single": 0.2, "pair": 0.2, "listing": 0.4, "extremes": 0.2}
    )
    object_sides: dict[str, tuple[float, float]] = field(default_factory=dict)  # per kind;
    # missing kinds get the referring data's OBJECT_SIDE


def default_phases() -> list[ClipPhase]:
    """Low resolution first (cheap steps: a ViT from scratch needs ~1000 steps before shapes
    click), then the model's resolution on scenes like the referring data's."""
    return [
        ClipPhase(
            steps=3000,
            image_size=64,
            image_sides=(64,),
            kind_weights={"single": 0.7, "pair": 0.3},
            object_sides={"single": (0.35, 0.7), "pair": (0.3, 0.5)},
        ),
        ClipPhase(steps=1000),
    ]


@dataclass
class ClipPretrainConfig:
    """Settings of the contrastive pretraining (defaults: the committed run)."""

    phases: list[ClipPhase] = field(default_factory=default_phases)
    batch_size: int = 128
    lr: float = 1e-3  # peak of each phase, after a linear warmup; cosine decay to 0
    warmup_steps: int = 100
    weight_decay: float = 0.1
    init_logit_scale: float = 1 / 0.07  # CLIP's initial temperature (learned, clamped at 100)
    text_length: int = 32  # tokens per caption incl. [SOS]/[EOS] (the longest caption fits)
    hard_fraction: float = 0.75  # share of the scenes drawn that start a hard-negative group
    group_size: int = 4  # scenes per hard-negative group: the scene and 3 one-word variants
    group_weights: dict[str, float] = field(  # what the variants of a group change
        default_factory=lambda: {"shape": 0.6, "colour": 0.2, "position": 0.2}
    )
    seed: int = 0
    log_every: int = 50


def encode_text(model: CLIP, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``CLIP.encode_text`` for tokens shorter than the context length.

    The causal mask keeps every position up to [EOS] blind to what follows, so the [EOS] feature
    equals ``encode_text`` of the same tokens zero-padded to the context length (a test checks
    it). Shorter input is cheaper, and it is what Prompt-RIS feeds (``model.clip.text_length``).

    Args:
        model: an open_clip ``CLIP``.
        tokens: (B, L) token ids, L <= context length.
        normalize: L2-normalise the output.

    Returns:
        (B, embed_dim).
    """
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)  # (B, L, D_t)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])  # (B, L, D_t)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # [EOS]: (B, D_t)
    x = x @ model.text_projection  # (B, E)
    return F.normalize(x, dim=-1) if normalize else x


def clip_images(specs: list[SceneSpec], image_size: int) -> torch.Tensor:
    """Draw scenes and letterbox them into the CLIP frame: (N, 3, S, S)."""
    return torch.stack(
        [letterbox_clip(Image.fromarray(paint_scene(s)[0]), image_size) for s in specs]
    )


def sample_batch(
    rng: random.Random, cfg: ClipPretrainConfig, phase: ClipPhase
) -> tuple[list[SceneSpec], list[str]]:
    """Scenes and captions of one batch: hard-negative groups and single scenes, no caption twice.

    A group is a scene plus ``group_size - 1`` variants that each change one object's shape, or
    one object's colour, or mirror the layout (``group_weights``); every variant is captioned with
    the scene's caption randomness, so the captions differ only in the changed words. A variant
    whose caption does not change (a mirrored listing, an unnamed object) is left out.
    """
    kinds = list(phase.kind_weights)
    weights = [phase.kind_weights[k] for k in kinds]
    attributes = list(cfg.group_weights)
    attribute_weights = [cfg.group_weights[a] for a in attributes]
    image_sides = phase.image_sides or IMAGE_SIDES
    specs: list[SceneSpec] = []
    captions: list[str] = []
    seen: set[str] = set()
    while len(specs) < cfg.batch_size:
        kind = rng.choices(kinds, weights)[0]
        side = phase.object_sides.get(kind, OBJECT_SIDE)
        spec, caption, caption_seed = sample_captioned_spec(rng, kind, side, image_sides)
        group = [(spec, caption)]
        if cfg.group_size > 1 and rng.random() < cfg.hard_fraction:
            attribute = rng.choices(attributes, attribute_weights)[0]
            for variant in hard_variants(spec, cfg.group_size - 1, rng, attribute):
                text = caption_scene(variant, kind, random.Random(caption_seed))
                if text is not None:
                    group.append((variant, text))
        for s, text in group[: cfg.batch_size - len(specs)]:
            if text not in seen:
                seen.add(text)
                specs.append(s)
                captions.append(text)
    return specs, captions


def lr_at(step: int, steps: int, cfg: ClipPretrainConfig) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to 0 at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model: CLIP, cfg: ClipPretrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        weight_decay=0.0,
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def train_phase(
    model: CLIP, cfg: ClipPretrainConfig, phase: ClipPhase, rng: random.Random, name: str
) -> dict[str, float]:
    """Train ``model`` in place for one phase with ``ClipLoss``; returns timing and loss."""
    image_size = model.visual.image_size[0]
    optimizer = _optimizer(model, cfg)
    loss_fn = ClipLoss()
    model.train()
    start, recent = time.time(), []
    for step in range(phase.steps):
        specs, captions = sample_batch(rng, cfg, phase)
        images = clip_images(specs, image_size)  # (B, 3, S, S)
        tokens = tokenize(captions, cfg.text_length)  # (B, L)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, phase.steps, cfg)
        image_features = model.encode_image(images, normalize=True)  # (B, E)
        text_features = encode_text(model, tokens, normalize=True)  # (B, E)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        recent = (recent + [loss.item()])[-cfg.log_every :]
        if (step + 1) % cfg.log_every == 0 or step + 1 == phase.steps:
            logger.info(
                "clip %s step %d/%d loss %.3f scale %.1f (%.0f s)",
                name,
                step + 1,
                phase.steps,
                sum(recent) / len(recent),
                model.logit_scale.exp().item(),
                time.time() - start,
            )
    model.eval()
    return {
        "image_size": image_size,
        "steps": phase.steps,
        "seconds": time.time() - start,
        "final_loss": sum(recent) / max(1, len(recent)),
    }


def pretrain_clip(model_cfg: ClipConfig, cfg: ClipPretrainConfig) -> tuple[CLIP, dict]:
    """Build open_clip's CLIP at the config's sizes and pretrain it, phase by phase.

    A phase at another resolution trains a copy built at that resolution; the weights move
    between resolutions as a checkpoint does when it loads (``open_clip``'s bicubic
    ``resize_pos_embed``, the step ``build_clip`` applies from 224 to 480 for ViT-B/16).

    Args:
        model_cfg: the CLIP section of the model config.
        cfg: the pretraining settings.

    Returns:
        The model at ``model_cfg.image_size`` (eval mode) and per-phase timing and losses.
    """
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model: CLIP | None = None
    info: dict = {"phases": []}
    start = time.time()
    sizes = [p.image_size or model_cfg.image_size for p in cfg.phases] + [model_cfg.image_size]
    for i, size in enumerate(sizes):
        fresh = build_clip(dataclasses.replace(model_cfg, image_size=size), None)
        if model is None:
            with torch.no_grad():
                fresh.logit_scale.fill_(math.log(cfg.init_logit_scale))
        else:
            state = model.state_dict()
            resize_pos_embed(state, fresh)  # (1 + g*g, D_v) -> (1 + g'*g', D_v), in place
            fresh.load_state_dict(state)
        model = fresh
        if i < len(cfg.phases):
            info["phases"].append(train_phase(model, cfg, cfg.phases[i], rng, f"phase {i + 1}"))
    info["seconds"] = time.time() - start
    info["steps"] = sum(p.steps for p in cfg.phases)
    return model.eval(), info
