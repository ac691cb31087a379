"""What the tiny CLIP learnt, measured on held-out synthetic scenes.

- ``retrieval``: text -> image and image -> text top-1 among K random scenes (listing captions).
- ``hard_pairs``: two-way choices between a scene and a variant differing in one word (a shape,
  a colour, or left/right by mirroring), both directions, with accuracy per word involved.
- ``word_auc``: on single-object images, how well each shape (colour) word's caption score
  separates images of that shape (colour) from the rest: the per-word evidence.
- ``patch_probe``: a linear classifier on the frozen patch tokens (``ln_post`` output, what
  Prompt-RIS's decoder reads) predicting the shape and the colour under each patch.

Every scene comes from the ``random.Random`` given, so held-out sets use their own seeds.
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from prompt_ris.data.text import tokenize
from prompt_ris.data.transforms import letterbox_mask
from prompt_ris.miniature.captions import (
    SceneSpec,
    caption_scene,
    hard_variants,
    listing_caption,
    mirrored,
    noun,
    paint_scene,
    sample_captioned_spec,
    sample_scene,
)
from prompt_ris.miniature.clip_pretrain import clip_images, encode_text
from prompt_ris.miniature.synthetic import COLOURS, SHAPES

CHUNK = 128  # images encoded per forward pass


@torch.no_grad()
def embed_images(model: CLIP, specs: list[SceneSpec]) -> torch.Tensor:
    """Normalised image embeddings (N, E) of scenes."""
    size = model.visual.image_size[0]
    out = [
        model.encode_image(clip_images(specs[i : i + CHUNK], size), normalize=True)
        for i in range(0, len(specs), CHUNK)
    ]
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model: CLIP, texts: list[str], text_length: int) -> torch.Tensor:
    """Normalised text embeddings (N, E)."""
    out = [
        encode_text(model, tokenize(texts[i : i + 512], text_length), normalize=True)
        for i in range(0, len(texts), 512)
    ]
    return torch.cat(out)


def retrieval(
    model: CLIP, rng: random.Random, text_length: int, queries: int = 512, k: int = 16
) -> dict[str, float]:
    """Top-1 accuracy (%) among groups of ``k`` random 3-5 object scenes, listing captions."""
    specs = [sample_captioned_spec(rng, "listing")[0] for _ in range(queries)]
    img = embed_images(model, specs).view(-1, k, model.visual.proj.shape[1])  # (G, k, E)
    txt = embed_texts(model, [listing_caption(s) for s in specs], text_length)
    txt = txt.view(-1, k, txt.shape[1])  # (G, k, E)
    sims = txt @ img.transpose(1, 2)  # (G, k text, k image)
    target = torch.arange(k)
    return {
        f"text_to_image_top1_of_{k}": 100.0 * (sims.argmax(2) == target).float().mean().item(),
        f"image_to_text_top1_of_{k}": 100.0 * (sims.argmax(1) == target).float().mean().item(),
    }


def _pairs(
    rng: random.Random, kind: str, attribute: str, count: int
) -> list[tuple[SceneSpec, str, SceneSpec, str, tuple[str, str]]]:
    """(scene, caption, variant, caption, (word, variant word)) with captions differing."""
    out = []
    while len(out) < count:
        spec, caption, seed = sample_captioned_spec(rng, kind)
        if attribute == "position":
            variant, words = mirrored(spec), ("left-right", "left-right")
        else:
            (variant,) = hard_variants(spec, 1, rng, attribute)
            changed = next(
                i for i, (a, b) in enumerate(zip(spec.objects, variant.objects)) if a != b
            )
            words = (
                getattr(spec.objects[changed], attribute),
                getattr(variant.objects[changed], attribute),
            )
        other = caption_scene(variant, kind, random.Random(seed))
        if other is not None and other != caption:
            out.append((spec, caption, variant, other, words))
    return out


def hard_pairs(
    model: CLIP,
    rng: random.Random,
    text_length: int,
    count: int = 300,
    kinds: tuple[str, ...] = ("single", "pair", "listing"),
) -> dict[str, dict[str, float]]:
    """Two-way accuracy (%) between a scene and its one-word variant, per attribute and kind.

    For each pair both captions choose between both images (text -> image) and both images
    between both captions (image -> text): four choices, chance 50%. ``per_word`` counts a
    choice for both words of the pair (the original and the changed one).
    """
    results: dict[str, dict[str, float]] = {}
    for attribute in ("shape", "colour", "position"):
        per_word: dict[str, list[float]] = defaultdict(list)
        for kind in kinds:
            if attribute == "position" and kind == "single":
                continue  # a mirrored single object changes its caption's "left"/"right" only
            pairs = _pairs(rng, kind, attribute, count)
            img_a = embed_images(model, [p[0] for p in pairs])  # (N, E)
            img_b = embed_images(model, [p[2] for p in pairs])
            txt_a = embed_texts(model, [p[1] for p in pairs], text_length)
            txt_b = embed_texts(model, [p[3] for p in pairs], text_length)
            s_aa, s_ab = (img_a * txt_a).sum(1), (img_a * txt_b).sum(1)  # (N,)
            s_ba, s_bb = (img_b * txt_a).sum(1), (img_b * txt_b).sum(1)
            t2i = torch.cat([s_aa > s_ba, s_bb > s_ab]).float()
            i2t = torch.cat([s_aa > s_ab, s_bb > s_ba]).float()
            results[f"{attribute}/{kind}"] = {
                "text_to_image": 100.0 * t2i.mean().item(),
                "image_to_text": 100.0 * i2t.mean().item(),
                "pairs": len(pairs),
            }
            correct = (
                (t2i[: len(pairs)] + t2i[len(pairs) :] + i2t[: len(pairs)] + i2t[len(pairs) :]) / 4
            ).tolist()
            for (_, _, _, _, words), c in zip(pairs, correct):
                for word in set(words):
                    per_word[word].append(c)
        if attribute != "position":
            results[f"{attribute}/per_word"] = {
                w: 100.0 * float(np.mean(v)) for w, v in sorted(per_word.items())
            }
    return results


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def word_auc(
    model: CLIP, rng: random.Random, text_length: int, count: int = 560
) -> dict[str, dict[str, float]]:
    """Per-word AUC and top-1 accuracy on single-object images.

    For a shape word w, an image of colour c is scored by its similarity to "a c w" minus the
    mean over all shapes (the same for colour words, the shape given); the AUC separates images of
    shape w from the others. ``top1``: the right word wins among all shapes (colours).
    """
    specs = [sample_scene(rng, (1, 1)) for _ in range(count)]
    img = embed_images(model, specs)  # (N, E)
    out: dict[str, dict[str, float]] = {}
    for attribute, words in (("shape", list(SHAPES)), ("colour", list(COLOURS))):
        texts = []
        for s in specs:
            (obj,) = s.objects
            for w in words:
                texts.append(
                    noun(obj.__class__(w, obj.colour, 0, 0, 0))
                    if attribute == "shape"
                    else noun(obj.__class__(obj.shape, w, 0, 0, 0))
                )
        txt = embed_texts(model, texts, text_length).view(len(specs), len(words), -1)
        scores = (txt @ img.unsqueeze(2)).squeeze(2)  # (N, W)
        scores = (scores - scores.mean(1, keepdim=True)).numpy()
        truth = np.array([words.index(getattr(s.objects[0], attribute)) for s in specs])
        for j, w in enumerate(words):
            pos, neg = scores[truth == j, j], scores[truth != j, j]
            out.setdefault(f"{attribute}_auc", {})[w] = _auc(pos, neg)
            out.setdefault(f"{attribute}_top1", {})[w] = 100.0 * float(
                (scores[truth == j].argmax(1) == j).mean()
            )
    return out


@torch.no_grad()
def patch_tokens(model: CLIP, specs: list[SceneSpec]) -> torch.Tensor:
    """``ln_post`` patch tokens of scenes: (N, h*w, D_v), row-major grid.

    open_clip returns these tokens only from a model built with ``output_tokens``; the probe reads
    them from any CLIP by running the visual tower's own steps (``_embeds``, open_clip >= 2.32).
    ``tests/test_miniature_foundations.py`` holds them to open_clip's ``output_tokens`` result.
    """
    size = model.visual.image_size[0]
    out = []
    for i in range(0, len(specs), CHUNK):
        x = model.visual._embeds(clip_images(specs[i : i + CHUNK], size))  # (n, 1+h*w, D_v)
        x = model.visual.transformer(x)
        out.append(model.visual.ln_post(x)[:, 1:])  # (n, h*w, D_v)
    return torch.cat(out)


def patch_labels(specs: list[SceneSpec], image_size: int, grid: int) -> torch.Tensor:
    """Per-patch object index+1 (0 = background, -1 = mixed): (N, grid*grid) long.

    A patch is labelled with an object when that object covers at least 75% of it, background
    when objects cover at most 25%, and mixed (ignored) otherwise.
    """
    labels = []
    for spec in specs:
        _, masks = paint_scene(spec)
        cover = torch.stack([letterbox_mask(m, image_size) for m in masks])  # (K, S, S)
        cover = F.adaptive_avg_pool2d(cover.unsqueeze(1), grid).flatten(1)  # (K, g*g)
        best, idx = cover.max(0)
        lab = torch.full_like(idx, -1)
        lab[best >= 0.75] = idx[best >= 0.75] + 1
        lab[cover.sum(0) <= 0.25] = 0
        labels.append(lab)
    return torch.stack(labels)


def _fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> nn.Linear:
    """Class-balanced multinomial logistic regression (L-BFGS, small L2)."""
    torch.manual_seed(0)
    layer = nn.Linear(x.shape[1], classes)
    counts = torch.bincount(y, minlength=classes).float()
    weight = counts.sum() / (classes * counts.clamp(min=1))  # balanced classes
    opt = torch.optim.LBFGS(
        layer.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y, weight=weight) + 1e-4 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return layer


def _patch_set(model: CLIP, specs: list[SceneSpec]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Tokens of the labelled patches (M, D_v) and their classes per attribute (M,): 0 =
    background, 1 + index into ``SHAPES`` / ``COLOURS``."""
    size, grid = model.visual.image_size[0], model.visual.grid_size[0]
    tokens = patch_tokens(model, specs)  # (N, h*w, D_v)
    labels = patch_labels(specs, size, grid)  # (N, h*w)
    classes: dict[str, torch.Tensor] = {}
    for key, words in (("shape", list(SHAPES)), ("colour", list(COLOURS))):
        rows = []
        for spec, lab in zip(specs, labels):
            table = torch.tensor([0, *[1 + words.index(getattr(o, key)) for o in spec.objects]])
            rows.append(table[lab.clamp(min=0)])  # (h*w,)
        classes[key] = torch.stack(rows)[labels >= 0]
    return tokens[labels >= 0], classes


def patch_probe(
    model: CLIP, rng: random.Random, train_scenes: int = 300, test_scenes: int = 150
) -> dict[str, dict[str, float]]:
    """Linear probes on frozen patch tokens: shape (7 + background) and colour (4 + background).

    Trained on ``train_scenes`` 3-5 object scenes, scored on ``test_scenes`` others; patches
    covered 25-75% by an object are left out. Returns per-class recall (%) and the mean over the
    object classes.
    """
    x_tr, y_tr = _patch_set(model, [sample_scene(rng) for _ in range(train_scenes)])
    x_te, y_te = _patch_set(model, [sample_scene(rng) for _ in range(test_scenes)])
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    out: dict[str, dict[str, float]] = {}
    for key, words in (("shape", list(SHAPES)), ("colour", list(COLOURS))):
        layer = _fit_linear(x_tr, y_tr[key], len(words) + 1)
        with torch.no_grad():
            pred = layer(x_te).argmax(1)  # (M,)
        recall = {}
        for j, w in enumerate(["background", *words]):
            sel = y_te[key] == j
            recall[w] = 100.0 * (pred[sel] == j).float().mean().item()
        recall["mean_objects"] = float(np.mean([recall[w] for w in words]))
        out[f"{key}_recall"] = recall
    return out
