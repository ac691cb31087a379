"""On-disk cache of the frozen SAM image embeddings F_IS (performance only).

In stage 2 the SAM image encoder is frozen (docs/design.md, "Frozen weights"), so F_IS
(I, D_S, h_s, w_s) of an image depends only on the image, its preprocessing (letterbox to
``model.sam.image_size``, SAM's normalisation) and the encoder weights. It is by far the most
expensive frozen computation of a stage-2 step, and every epoch recomputes the same values.
:class:`SamEmbeddingCache` stores each image's embedding once, as a half-precision safetensors
file, with a small in-memory LRU.

Keys: ``key_prefix`` names the preprocessing and the weights (see :func:`sam_cache_prefix`); a
key names the image (e.g. ``"coco:581857"`` or its path). A different prefix is a different
sub-folder, so caches of other image sizes or other weights never mix. Valid only while the
SAM images of a key are a deterministic function of the key: no random image augmentation.

Several processes (e.g. one per GPU) may share a folder: every file is written to a private
temporary name and moved into place with ``os.replace``, so a reader sees a complete file or
none; two writers of one key write identical content and the last one wins.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from prompt_ris.data.batch import Batch

logger = logging.getLogger(__name__)

CACHE_FORMAT = "1"  # bump when the stored layout or the meaning of a key changes
TENSOR_NAME = "sam_img_embed"  # tensor name inside each safetensors file
PREPROCESS = "letterbox"  # the SAM image preprocessing, in every key prefix: change it with it
STORAGE_DTYPES = (torch.float16, torch.bfloat16)


def encoder_fingerprint(image_encoder: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's ``state_dict``.

    About a second for SAM ViT-B's 90M parameters; call it once per run.

    Args:
        image_encoder: the (frozen) SAM image encoder.

    Returns:
        64 hex digits.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(image_encoder.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sam_cache_prefix(image_encoder: nn.Module, image_size: int) -> str:
    """Key prefix naming everything besides the image that F_IS depends on.

    Args:
        image_encoder: the SAM image encoder whose outputs are cached (its weights are hashed).
        image_size: ``model.sam.image_size``, the side of the letterboxed SAM frame.

    Returns:
        e.g. ``"sam1024-letterbox-3f2a9c0d1e2b4a5c-v1"``.
    """
    return f"sam{image_size}-{PREPROCESS}-{encoder_fingerprint(image_encoder)[:16]}-v{CACHE_FORMAT}"


def batch_image_keys(batch: Batch, namespace: str = "") -> list[str]:
    """One cache key per image row of a collated batch.

    Args:
        batch: with ``image_ids`` (B,) and ``image_index`` (B,) long tensors.
        namespace: prepended to every key; name the image source when ids are not unique across
            the datasets that share a cache folder (e.g. ``"synthetic-seed0:"``).

    Returns:
        ``num_images`` keys, ``f"{namespace}{image_id}"`` for each image row in order.
    """
    image_index = batch.image_index.tolist()
    image_ids = batch.image_ids.tolist()
    keys: dict[int, str] = {}
    for row, image_id in zip(image_index, image_ids, strict=True):
        keys.setdefault(row, f"{namespace}{image_id}")
    if sorted(keys) != list(range(len(keys))):
        raise ValueError(f"image_index must cover rows 0..I-1 without gaps, got {sorted(keys)}")
    return [keys[row] for row in range(len(keys))]


class SamEmbeddingCache:
    """Disk + in-memory LRU cache of SAM image embeddings, one safetensors file per image.

    Args:
        folder: cache root; files go to ``folder/<key_prefix>/<2 hex>/<40 hex>.safetensors``.
        key_prefix: names the preprocessing and the encoder weights (:func:`sam_cache_prefix`).
        storage_dtype: float16 (default; 3 more mantissa bits than bf16, ample range for the
            LayerNorm'd embeddings) or bfloat16. Either halves the space of float32: 2 MiB per
            image for SAM ViT-B at 1024 (256 x 64 x 64).
        max_memory_items: embeddings kept in memory (least recently used dropped first).
    """

    def __init__(
        self,
        folder: str | Path,
        key_prefix: str,
        *,
        storage_dtype: torch.dtype = torch.float16,
        max_memory_items: int = 64,
    ) -> None:
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype}")
        if not key_prefix:
            raise ValueError("key_prefix is empty; build one with sam_cache_prefix(encoder, size)")
        self.key_prefix = key_prefix
        self.root = Path(folder) / re.sub(r"[^A-Za-z0-9._-]", "_", key_prefix)
        self.storage_dtype = storage_dtype
        self.max_memory_items = max_memory_items
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        """File of one image's embedding (the key is hashed, so any string is a valid key)."""
        digest = hashlib.sha1(f"{self.key_prefix}|{key}".encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.safetensors"

    def _load(self, key: str) -> torch.Tensor | None:
        """One (D_S, h, w) embedding from memory or disk, in the storage dtype, or None."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensor = load_file(path)[TENSOR_NAME]
        except (SafetensorError, KeyError, OSError) as err:
            logger.warning("ignoring unreadable SAM embedding cache file %s (%s)", path, err)
            return None
        self._remember(key, tensor)
        return tensor

    def _remember(self, key: str, tensor: torch.Tensor) -> None:
        self._memory[key] = tensor
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_memory_items:
            self._memory.popitem(last=False)

    def get(
        self,
        keys: Sequence[str],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor | None:
        """Embeddings of all ``keys``, or None if any one is missing.

        Args:
            keys: I image keys.
            device: where to put the result (default CPU).
            dtype: result dtype (default the storage dtype).

        Returns:
            (I, D_S, h_s, w_s) or None.
        """
        found = []
        for key in keys:
            tensor = self._load(key)
            if tensor is None:
                self.misses += 1
                return None
            found.append(tensor)
        self.hits += len(found)
        return torch.stack(found).to(device=device, dtype=dtype)  # (I, D_S, h_s, w_s)

    def put(self, keys: Sequence[str], embeds: torch.Tensor) -> None:
        """Store one embedding per key (atomic per file; safe with concurrent processes).

        Args:
            keys: I image keys.
            embeds: (I, D_S, h_s, w_s) embeddings, any float dtype and device.
        """
        self._write(keys, embeds)

    def _write(self, keys: Sequence[str], embeds: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`put`, returning the stored (D_S, h_s, w_s) tensors in the storage dtype."""
        if embeds.dim() != 4 or embeds.shape[0] != len(keys):
            raise ValueError(
                f"put expects embeds of shape (I, D_S, h, w) with I = len(keys) = {len(keys)}, "
                f"got {tuple(embeds.shape)}"
            )
        stored = embeds.detach().to("cpu", self.storage_dtype)  # (I, D_S, h_s, w_s)
        if not torch.isfinite(stored).all():
            raise ValueError(
                f"SAM embeddings overflow {self.storage_dtype} (or are not finite); "
                f"use SamEmbeddingCache(..., storage_dtype=torch.bfloat16)"
            )
        metadata = {"key": "", "key_prefix": self.key_prefix, "format": CACHE_FORMAT}
        written = []
        for key, tensor in zip(keys, stored, strict=True):
            tensor = tensor.contiguous()  # (D_S, h_s, w_s), its own storage
            path = self.path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
            try:
                save_file({TENSOR_NAME: tensor}, tmp, metadata={**metadata, "key": key})
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            self._remember(key, tensor)
            written.append(tensor)
        return written

    def encode(
        self,
        keys: Sequence[str],
        sam_images: torch.Tensor,
        encode_fn: Callable[[torch.Tensor], torch.Tensor],
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """F_IS for a batch: cached rows are read, the others encoded and stored.

        Args:
            keys: I image keys, one per row of ``sam_images``.
            sam_images: (I, 3, S_s, S_s) SAM-normalised letterboxed images.
            encode_fn: the frozen encoder, e.g. ``model.encode_sam`` -> (n, D_S, h_s, w_s).
            dtype: dtype of the result.

        Returns:
            (I, D_S, h_s, w_s) on the device of ``sam_images``.
        """
        if len(keys) != sam_images.shape[0]:
            raise ValueError(f"{len(keys)} keys for {sam_images.shape[0]} images")
        device = sam_images.device
        rows = [self._load(key) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            index = torch.tensor(missing, device=device)
            with torch.no_grad():
                fresh = encode_fn(sam_images.index_select(0, index))  # (m, D_S, h_s, w_s)
            # Return the stored (rounded) values, so a result never depends on the cache's state.
            fresh_rows = self._write([keys[i] for i in missing], fresh)
            for i, tensor in zip(missing, fresh_rows, strict=True):
                rows[i] = tensor
        rows = [row.to(device=device, dtype=dtype) for row in rows]
        return torch.stack(rows)  # (I, D_S, h_s, w_s)
