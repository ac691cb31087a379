"""Image-grouped datasets, batch samplers (I images x b expressions) and the batch collate.

One dataset item is one image with some of its expressions (:class:`ImageRequest`). The
samplers decide which images and expressions form a batch; the dataset loads and transforms;
:func:`collate` builds the typed :class:`~prompt_ris.data.batch.Batch`.

Training (Sec. 4.2): :class:`TrainBatchSampler` yields micro-batches of I_p images x b
expressions (``StepPlan.images_per_process`` x ``DataConfig.expressions_per_image``); a = I / (P x
I_p) of them on each of P processes make one optimizer step of I = ``DataConfig.images_per_step``
images (``schedule.plan_steps``). An image with b or more expressions gives b distinct ones at
random; an image with fewer gives all of them and is filled by resampling its expressions with a
share ``word_mask_prob`` of the words masked out (``text.mask_words``). Under
``train.epoch_unit=expressions`` an image is drawn ceil(n / b) times per epoch so that every
expression is drawn (``schedule``). Every expression carries its object identity (``object_ids``
= ann_id) for the instance contrastive loss. The batches are a function of (seed, epoch) only:
every choice is drawn in the sampler from generators seeded by (seed, epoch[, image]), and the
workers draw nothing.

Sharding (multi-process): the samplers shard themselves. Each epoch the draws (images) are
permuted with the (seed, epoch) generator, identical on every process, the permutation is cut to
whole steps of I draws (the rest, fewer than I, sit the epoch out) and process ``rank`` takes
every P-th draw from position ``rank``, in micro-batches of I_p. Step k then holds draws
[k I, (k + 1) I) of the permutation on any launch: 1 process x 16 images, 2 x 8 or 1 x 2 x 8
accumulated see the same images in the same steps, the processes get disjoint draws and the same
number of batches, and the step count does not depend on P. With accelerate::

    loader = build_train_loader(cfg, num_replicas=accelerator.num_processes,
                                rank=accelerator.process_index)
    # Do NOT pass `loader` to accelerator.prepare: it would shard the batches a second time.
    for epoch in range(start_epoch, num_epochs):
        loader.batch_sampler.set_epoch(epoch)          # before iterating or skipping
        epoch_loader = loader if not skip else accelerate.skip_first_batches(loader, skip)
        for batch in epoch_loader:
            batch = accelerate.utils.send_to_device(batch, accelerator.device)

Since the loader is not prepared, ``accelerator.accumulate`` counts steps without knowing where
an epoch ends (it syncs every a micro-batches); an epoch holds exactly (steps x a) of them.

Evaluation: every sentence of every reference of the split is one expression; an item holds all
expressions of one image (the SAM embedding is computed once per image), so ``b`` varies per
image in evaluation batches. :class:`EvalBatchSampler` shards images by stride (image ``k`` goes
to process ``k % num_replicas``): no padding, no expression is seen twice or missed. Shards may
differ by one batch, so gather results once after the loop (``gather_object``), never per batch.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from prompt_ris.config import Config
from prompt_ris.data.batch import Batch
from prompt_ris.data.rle import decode_rle
from prompt_ris.data.schedule import (
    EPOCH_UNITS,
    check_epoch_unit,
    draws_per_image,
    plan_steps,
    steps_per_epoch,
)
from prompt_ris.data.splits import load_split, parse_split
from prompt_ris.data.text import mask_words, tokenize
from prompt_ris.data.transforms import ImageLoadError, letterbox_image, load_image, lowres_mask

logger = logging.getLogger(__name__)

_PER_EXPRESSION = (  # item tensors concatenated along expressions by collate
    "text_tokens",
    "object_ids",
    "ref_ids",
    "sent_ids",
    "image_ids",
    "category_ids",
    "word_masked",
    "gt_masks",
)


@dataclass(frozen=True)
class ExpressionRef:
    """One expression of an item: sentence ``sentence`` of table row ``row``.

    ``mask_seed`` is set for filler expressions: their words are masked with a generator
    seeded by it.
    """

    row: int
    sentence: int
    mask_seed: int | None = None


@dataclass(frozen=True)
class ImageRequest:
    """One dataset item: image group ``group`` with these expressions, in this order."""

    group: int
    expressions: tuple[ExpressionRef, ...]


@dataclass
class ImageGroup:
    """An image of a split: its refs (table rows) and all its (row, sentence) expressions."""

    image_path: str
    rows: list[int]
    expressions: list[tuple[int, int]]


def group_by_image(table: datasets.Dataset) -> list[ImageGroup]:
    """Group the refs of a split by image file, in order of first appearance.

    The same COCO image in RefCOCO, RefCOCO+ and G-Ref forms one group, so the combined set
    gives an image all the expressions of the three datasets.
    """
    paths = table["image_path"][:]
    num_sentences = [len(s) for s in table["sentences"][:]]
    groups: dict[str, ImageGroup] = {}
    for row, (path, count) in enumerate(zip(paths, num_sentences)):
        group = groups.setdefault(path, ImageGroup(path, [], []))
        group.rows.append(row)
        group.expressions.extend((row, k) for k in range(count))
    return list(groups.values())


class ReferImageDataset(Dataset):
    """Items of a prepared split: one image with some of its expressions.

    ``dataset[request]`` with an :class:`ImageRequest` gives those expressions; ``dataset[k]``
    with an int gives every expression of image group k (evaluation).

    Args:
        table: refs of the split (``splits.load_split``).
        groups: ``group_by_image(table)``.
        clip_size: CLIP frame side (``model.clip.image_size``).
        sam_size: SAM frame side (``model.sam.image_size``).
        text_length: tokens per expression (``model.clip.text_length``).
        word_mask_prob: share of words masked in filler expressions.
        with_orig_masks: also return original-size bool masks (evaluation).
        image_dir: read images from here (by file name) instead of the prepared paths.
    """

    def __init__(
        self,
        table: datasets.Dataset,
        groups: list[ImageGroup],
        *,
        clip_size: int,
        sam_size: int,
        text_length: int,
        word_mask_prob: float = 0.15,
        with_orig_masks: bool = False,
        image_dir: str | Path | None = None,
    ) -> None:
        self.table = table
        self.groups = groups
        self.clip_size = clip_size
        self.sam_size = sam_size
        self.text_length = text_length
        self.word_mask_prob = word_mask_prob
        self.with_orig_masks = with_orig_masks
        self.image_dir = Path(image_dir) if image_dir is not None else None

    def __len__(self) -> int:
        return len(self.groups)

    def image_path(self, record: dict[str, Any]) -> Path:
        """Where a record's image is read: ``image_dir/file_name`` if set, else the prepared
        path."""
        if self.image_dir is not None:
            return self.image_dir / record["file_name"]
        return Path(record["image_path"])

    def __getitem__(self, request: ImageRequest | int) -> dict[str, Any]:
        if not isinstance(request, ImageRequest):
            exprs = self.groups[int(request)].expressions
            request = ImageRequest(int(request), tuple(ExpressionRef(r, s) for r, s in exprs))
        rows = [e.row for e in request.expressions]
        records = {row: self.table[row] for row in dict.fromkeys(rows)}
        first = next(iter(records.values()))
        hw = (int(first["height"]), int(first["width"]))
        try:
            image = load_image(self.image_path(first), hw)
        except ImageLoadError as err:  # named by the record's ids: the file may be anywhere
            refs = ", ".join(str(int(r["ref_id"])) for r in records.values())
            image_id = int(first["image_id"])
            raise ImageLoadError(f"image_id {image_id} (ref_id {refs}): {err}") from err
        frames = letterbox_image(image, self.clip_size, self.sam_size)
        orig_masks = {  # (H, W) bool per ref
            row: decode_rle({"size": r["mask_size"], "counts": r["mask_counts"]})
            for row, r in records.items()
        }
        lowres = {row: lowres_mask(m, self.sam_size) for row, m in orig_masks.items()}
        texts = []
        for e in request.expressions:
            text = records[e.row]["sentences"][e.sentence]
            if e.mask_seed is not None:
                text = mask_words(text, self.word_mask_prob, random.Random(e.mask_seed))
            texts.append(text)

        def ids(key: str) -> torch.Tensor:
            return torch.tensor([int(records[r][key]) for r in rows], dtype=torch.long)

        item = {
            "clip_image": frames.clip_image,  # (3, S_c, S_c)
            "sam_image": frames.sam_image,  # (3, S_s, S_s)
            "input_size": torch.tensor(frames.input_size, dtype=torch.long),  # (2,)
            "orig_size": torch.tensor(frames.orig_size, dtype=torch.long),  # (2,)
            "texts": texts,
            "text_tokens": tokenize(texts, self.text_length),  # (b, L)
            "object_ids": ids("ann_id"),
            "ref_ids": ids("ref_id"),
            "image_ids": ids("image_id"),
            "category_ids": ids("category_id"),
            "sent_ids": torch.tensor(
                [records[e.row]["sent_ids"][e.sentence] for e in request.expressions],
                dtype=torch.long,
            ),
            "word_masked": torch.tensor([e.mask_seed is not None for e in request.expressions]),
            "gt_masks": _join([lowres[r][None] for r in rows], True),  # (b, 1, S_s/4, S_s/4)
        }
        if self.with_orig_masks:
            item["gt_masks_orig"] = [orig_masks[r] for r in rows]  # b x (H, W) bool
        return item


def _join(tensors: list[torch.Tensor], stack: bool) -> torch.Tensor:
    """Stack or concatenate CPU tensors with numpy: one thread, which is what a DataLoader worker
    uses anyway, and no OpenMP oversubscription when collate runs in the main process."""
    arrays = [t.numpy() for t in tensors]
    return torch.from_numpy(np.stack(arrays) if stack else np.concatenate(arrays))


def collate(items: list[dict[str, Any]]) -> Batch:
    """Image items -> one :class:`Batch`, expressions in item order (sorted by image row)."""
    counts = torch.tensor([len(item["texts"]) for item in items])
    per_expression = {key: _join([it[key] for it in items], False) for key in _PER_EXPRESSION}
    orig_masks = None
    if all("gt_masks_orig" in it for it in items):
        orig_masks = [m for it in items for m in it["gt_masks_orig"]]  # B x (H, W) bool
    return Batch(
        clip_images=_join([it["clip_image"] for it in items], True),  # (I, 3, S_c, S_c)
        sam_images=_join([it["sam_image"] for it in items], True),  # (I, 3, S_s, S_s)
        image_index=torch.repeat_interleave(torch.arange(len(items)), counts),  # (B,)
        input_sizes=_join([it["input_size"] for it in items], True),  # (I, 2)
        orig_sizes=_join([it["orig_size"] for it in items], True),  # (I, 2)
        texts=[text for it in items for text in it["texts"]],
        gt_masks_orig=orig_masks,
        **per_expression,  # (B, ...)
    )


def _check_shard(num_replicas: int, rank: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")


class TrainBatchSampler(Sampler):
    """Training micro-batches of I_p images x b expressions, sharded (module docstring).

    Args:
        groups: image groups of the training split.
        images_per_batch: I_p, images per process and micro-batch.
        expressions_per_image: b.
        num_replicas: number of processes P.
        rank: this process.
        seed: base seed; the batches depend on (seed, epoch) only.
        images_per_step: I, images per optimizer step over all processes, a multiple of
            P x I_p; None = P x I_p (no accumulation).
        epoch_unit: ``images`` (each image drawn once per epoch) or ``expressions`` (each image
            ceil(n / b) times, so that every expression is drawn; ``schedule``).
    """

    def __init__(
        self,
        groups: list[ImageGroup],
        *,
        images_per_batch: int,
        expressions_per_image: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        images_per_step: int | None = None,
        epoch_unit: str = "images",
    ) -> None:
        _check_shard(num_replicas, rank)
        check_epoch_unit(epoch_unit)
        per_pass = images_per_batch * num_replicas
        images_per_step = per_pass if images_per_step is None else images_per_step
        if images_per_batch < 1 or images_per_step % per_pass:
            raise ValueError(
                f"images_per_step={images_per_step} is not a multiple of {num_replicas} "
                f"processes x images_per_batch={images_per_batch}"
            )
        if any(not g.expressions for g in groups):
            raise ValueError("every training image needs an expression")
        self.expressions = [g.expressions for g in groups]
        self.draws = [  # (image group, draw k of the image) for every draw of an epoch
            (group, k)
            for group, exprs in enumerate(self.expressions)
            for k in range(draws_per_image(len(exprs), expressions_per_image, epoch_unit))
        ]
        if len(self.draws) < images_per_step:
            raise ValueError(
                f"{len(groups)} training images give {len(self.draws)} draws per epoch "
                f"(train.epoch_unit={epoch_unit}), fewer than the {images_per_step} images of "
                "one optimizer step; use a larger split, a smaller data.images_per_step or fewer "
                "processes"
            )
        self.images_per_batch = images_per_batch
        self.images_per_step = images_per_step
        self.accumulation = images_per_step // per_pass
        self.expressions_per_image = expressions_per_image
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch_unit = epoch_unit
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches the next iteration yields."""
        self.epoch = epoch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps of an epoch: floor(draws / I), the same on any launch."""
        return len(self.draws) // self.images_per_step

    def __len__(self) -> int:
        """Micro-batches of this process per epoch: steps x accumulation."""
        return self.steps_per_epoch * self.accumulation

    def _request(self, group: int, draw: int = 0) -> ImageRequest:
        """Draw ``draw`` of one image: b distinct expressions, word-masked resamples if too few.

        The image's expressions are shuffled once per epoch; draw k takes positions
        [k b, (k + 1) b) of that order and completes a short last draw from its start.
        """
        rng = np.random.default_rng([self.seed, self.epoch, group])
        exprs, b = self.expressions[group], self.expressions_per_image
        order = rng.permutation(len(exprs))
        chosen = order[draw * b : (draw + 1) * b]
        if len(chosen) < b <= len(exprs):  # the short last draw of an expression pass
            chosen = np.concatenate([chosen, order[: b - len(chosen)]])
        picks = [ExpressionRef(*exprs[k]) for k in chosen]
        for k in rng.integers(len(exprs), size=max(0, b - len(exprs))):
            picks.append(ExpressionRef(*exprs[k], mask_seed=int(rng.integers(2**31))))
        return ImageRequest(group, tuple(picks))

    def __iter__(self) -> Iterator[list[ImageRequest]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.draws))
        usable = order[: self.steps_per_epoch * self.images_per_step]  # whole steps only
        mine = usable[self.rank :: self.num_replicas]  # disjoint across ranks, equal lengths
        size = self.images_per_batch
        for start in range(0, len(mine), size):
            yield [self._request(*self.draws[k]) for k in mine[start : start + size]]


class EvalBatchSampler(Sampler):
    """Evaluation batches of whole images (all their expressions), strided over processes.

    Args:
        groups: image groups of the split.
        images_per_batch: at most this many images per batch.
        num_replicas: number of processes.
        rank: this process; it gets images rank, rank + num_replicas, ...
        max_expressions: close a batch before it would exceed this many expressions (an image
            with more expressions still forms a batch of its own); None = no cap.
    """

    def __init__(
        self,
        groups: list[ImageGroup],
        *,
        images_per_batch: int,
        num_replicas: int = 1,
        rank: int = 0,
        max_expressions: int | None = None,
    ) -> None:
        _check_shard(num_replicas, rank)
        sizes = [len(g.expressions) for g in groups]
        self.batches: list[list[int]] = []
        current: list[int] = []
        count = 0
        for group in range(rank, len(groups), num_replicas):
            full = len(current) == images_per_batch
            over = max_expressions is not None and count + sizes[group] > max_expressions
            if current and (full or over):
                self.batches.append(current)
                current, count = [], 0
            current.append(group)
            count += sizes[group]
        if current:
            self.batches.append(current)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self.batches)


def limit_expressions(
    groups: list[ImageGroup], limit: int | None, seed: int = 0
) -> list[ImageGroup]:
    """A fixed random subset of whole images with at most ``limit`` expressions (at least one).

    Used for quick validation during training (``DataConfig.max_val_expressions``); the images
    keep their table order.
    """
    if limit is None:
        return groups
    order = np.random.default_rng(seed).permutation(len(groups))
    kept, total = [], 0
    for g in order:
        size = len(groups[g].expressions)
        if kept and total + size > limit:
            continue
        kept.append(int(g))
        total += size
    return [groups[g] for g in sorted(kept)]


def build_train_loader(cfg: Config, *, num_replicas: int = 1, rank: int = 0) -> DataLoader:
    """DataLoader of training batches for ``cfg.data.train`` (sharded; see the module docstring).

    Call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch; do not pass the loader
    through ``accelerator.prepare``.
    """
    spec = parse_split(cfg.data.train)
    if spec.split != "train":
        logger.warning("training on '%s', which is not a train split", cfg.data.train)
    table = load_split(cfg.data.prepared, cfg.data.train)
    groups = group_by_image(table)
    dataset = ReferImageDataset(
        table,
        groups,
        clip_size=cfg.model.clip.image_size,
        sam_size=cfg.model.sam.image_size,
        text_length=cfg.model.clip.text_length,
        word_mask_prob=cfg.data.word_mask_prob,
        image_dir=cfg.data.image_dir,
    )
    plan = plan_steps(cfg.data, num_replicas)
    sampler = TrainBatchSampler(
        groups,
        images_per_batch=plan.images_per_process,
        expressions_per_image=plan.expressions_per_image,
        num_replicas=num_replicas,
        rank=rank,
        seed=cfg.train.seed,
        images_per_step=plan.images_per_step,
        epoch_unit=cfg.train.epoch_unit,
    )
    log_epoch_sizes(cfg, groups, table)
    return _loader(dataset, sampler, cfg.data.num_workers)


def log_epoch_sizes(cfg: Config, groups: list[ImageGroup], table: datasets.Dataset) -> None:
    """Log the training split's size and its steps per epoch under each ``train.epoch_unit``."""
    counts = [len(g.expressions) for g in groups]
    b, images = cfg.data.expressions_per_image, cfg.data.images_per_step
    steps = {unit: steps_per_epoch(counts, b, images, unit) for unit in EPOCH_UNITS}
    logger.info(
        "train split %s: %d refs, %d images, %d expressions; an epoch is %s optimizer steps of "
        "%d images (train.epoch_unit=%s)",
        cfg.data.train, len(table), len(groups), sum(counts),
        " or ".join(f"{steps[u]} ({u})" for u in EPOCH_UNITS), images, cfg.train.epoch_unit,
    )  # fmt: skip


def build_eval_loader(
    cfg: Config,
    split: str,
    *,
    num_replicas: int = 1,
    rank: int = 0,
    images_per_batch: int | None = None,
    max_expressions: int | None = None,
    limit: int | None = None,
    with_orig_masks: bool = True,
) -> DataLoader:
    """DataLoader over every expression of ``split``, grouped by image, strided over processes.

    Args:
        cfg: the run config (model frames, data paths, workers).
        split: a split name, e.g. ``refcoco:val`` or ``refcoco:test_unseen``.
        num_replicas: number of processes.
        rank: this process.
        images_per_batch: images per batch; default ``cfg.eval.batch_images``.
        max_expressions: cap on expressions per batch (see :class:`EvalBatchSampler`).
        limit: keep a fixed subset of images with at most this many expressions.
        with_orig_masks: add ``gt_masks_orig`` for metrics at the original size.
    """
    table = load_split(cfg.data.prepared, split)
    groups = limit_expressions(group_by_image(table), limit)
    dataset = ReferImageDataset(
        table,
        groups,
        clip_size=cfg.model.clip.image_size,
        sam_size=cfg.model.sam.image_size,
        text_length=cfg.model.clip.text_length,
        with_orig_masks=with_orig_masks,
        image_dir=cfg.data.image_dir,
    )
    sampler = EvalBatchSampler(
        groups,
        images_per_batch=images_per_batch or cfg.eval.batch_images,
        num_replicas=num_replicas,
        rank=rank,
        max_expressions=max_expressions,
    )
    return _loader(dataset, sampler, cfg.data.num_workers)


def _loader(dataset: Dataset, sampler: Sampler, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # the sampler runs in this process: epochs still work
        pin_memory=torch.cuda.is_available(),
    )
