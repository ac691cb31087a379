"""Fused attention for the frozen SAM image encoder (performance only; same math, same weights).

segment_anything's image-encoder ``Attention`` (the ViTDet backbone) computes, per head,

    softmax(scale * q k^T + B_rel) v,   B_rel[i, j] = q_i . R^h[h_i - h_j] + q_i . R^w[w_i - w_j]

where ``B_rel`` is the decomposed relative-position bias of MViTv2 (``add_decomposed_rel_pos``).
It materialises the (N, N) attention map in the input dtype, adds the bias, then runs a separate
softmax and a second matmul. :class:`SDPAAttention` builds the same ``B_rel`` as an additive mask
and hands it to one fused ``torch.nn.functional.scaled_dot_product_attention`` call, which picks
the memory-efficient or cuDNN kernel on a GPU (no softmax intermediates, bf16-friendly).

:func:`use_sdpa_in_sam_encoder` switches the ``Attention`` modules of a model in place by
changing their class to the subclass below: the same module objects, parameters, hooks and
``state_dict`` keys, so base checkpoints and exports are unaffected and the switch can be undone.

open_clip (2.32.0, the floor, to 3.3.0) needs no such switch: its ``ResidualAttentionBlock`` calls
``nn.MultiheadAttention(..., need_weights=False)``, which already dispatches to
``scaled_dot_product_attention`` when training and to the fused native kernel under
``torch.inference_mode``. Modules of this project that use ``nn.MultiheadAttention`` get the
same only when they pass ``need_weights=False`` (as ``models.layers.CrossAttention`` does).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention
from torch import nn

logger = logging.getLogger(__name__)

# Upper bound on one materialised bias tensor (batch chunk x heads x N x N). A global-attention
# block of SAM ViT-B at 1024 has N = 4096 tokens and 12 heads: 0.4 GB per image in bf16, so a
# 16-image batch would otherwise hold 6.4 GB for one block's bias alone.
MAX_BIAS_BYTES = 1 << 30


def _relative_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    """Row of ``rel_pos`` for each (query, key) offset; upstream ``get_rel_pos``'s coordinates."""
    q_coords = torch.arange(q_size, device=device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=device)[None, :] * max(q_size / k_size, 1.0)
    return ((q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)).long()  # (q, k)


class SDPAAttention(Attention):
    """segment_anything's image-encoder ``Attention`` computed by one fused SDPA call.

    Never constructed directly: :func:`use_sdpa_in_sam_encoder` re-classes existing modules, so
    the parameters ``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w`` are the upstream ones.
    """

    def _rel_pos_table(self, rel_pos: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
        """Upstream ``get_rel_pos``, with the index built on the device (no blocking H2D copy).

        Returns:
            (q_size, k_size, head_dim) embeddings ``R[q - k]``.
        """
        max_rel_dist = int(2 * max(q_size, k_size) - 1)
        if rel_pos.shape[0] != max_rel_dist:
            # Upstream's linear interpolation for inputs of another size than the weights'.
            rel_pos = F.interpolate(
                rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
                size=max_rel_dist,
                mode="linear",
            )  # (1, head_dim, max_rel_dist)
            rel_pos = rel_pos.reshape(-1, max_rel_dist).permute(1, 0)  # (max_rel_dist, head_dim)
        return rel_pos[_relative_index(q_size, k_size, rel_pos.device)]  # (q, k, hd)

    def rel_pos_bias(self, q: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Decomposed relative-position bias ``B_rel`` (MViTv2), as ``add_decomposed_rel_pos``.

        Args:
            q: (B, nh, h*w, hd) unscaled queries, as upstream multiplies them with ``R``.
            size: (h, w) token grid of queries and keys (self-attention).

        Returns:
            (B, nh, h*w, h*w) bias in the dtype of ``q``.
        """
        h, w = size
        table_h = self._rel_pos_table(self.rel_pos_h, h, h)  # (h, h, hd)
        table_w = self._rel_pos_table(self.rel_pos_w, w, w)  # (w, w, hd)
        grid_q = q.unflatten(2, (h, w))  # (B, nh, h, w, hd)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h.to(q.dtype))  # (B, nh, h, w, h)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w.to(q.dtype))  # (B, nh, h, w, w)
        bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, nh, h, w, h, w)
        return bias.reshape(q.shape[0], q.shape[1], h * w, h * w).to(q.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over a token grid.

        Args:
            x: (B, h, w, D) tokens (B counts windows for windowed blocks).

        Returns:
            (B, h, w, D).
        """
        batch, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(batch, h * w, 3, self.num_heads, -1)  # (B, h*w, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, h*w, hd)

        # Chunk the batch so that one chunk's bias stays under MAX_BIAS_BYTES.
        per_item = self.num_heads * (h * w) ** 2 * q.element_size() if self.use_rel_pos else 0
        chunk = max(1, MAX_BIAS_BYTES // per_item) if per_item else batch
        outs = []
        for start in range(0, batch, chunk):
            part = slice(start, start + chunk)
            bias = self.rel_pos_bias(q[part], (h, w)) if self.use_rel_pos else None
            outs.append(
                F.scaled_dot_product_attention(q[part], k[part], v[part], bias, scale=self.scale)
            )  # (chunk, nh, h*w, hd)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # (B, nh, h*w, hd)
        out = out.transpose(1, 2).reshape(batch, h, w, -1)  # (B, h, w, nh*hd)
        return self.proj(out)


def use_sdpa_in_sam_encoder(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every SAM image-encoder ``Attention`` inside ``module`` to the fused SDPA path.

    Works in place on the modules' class only, so parameters, buffers, hooks and ``state_dict``
    keys are unchanged; calling it again is a no-op, and ``enabled=False`` restores upstream's
    implementation. ``module`` may be the image encoder, the whole ``Sam`` or a ``PromptRIS``.

    Args:
        module: a module containing ``segment_anything.modeling.image_encoder.Attention`` blocks.
        enabled: True for SDPA, False for segment_anything's own attention.

    Returns:
        ``module`` itself.

    Raises:
        ValueError: ``module`` contains no SAM image-encoder attention.
    """
    target = SDPAAttention if enabled else Attention
    found = 0
    for sub in module.modules():
        if type(sub) in (Attention, SDPAAttention):
            sub.__class__ = target
            found += 1
    if not found:
        raise ValueError(
            f"use_sdpa_in_sam_encoder found no segment_anything image-encoder Attention in "
            f"{type(module).__name__}; pass the SAM image encoder (e.g. sam.image_encoder) or a "
            f"model that contains it"
        )
    logger.debug("SAM image-encoder attention: %s in %d blocks", target.__name__, found)
    return module


def sam_encoder_uses_sdpa(module: nn.Module) -> bool:
    """True when every SAM image-encoder ``Attention`` inside ``module`` runs the SDPA path."""
    blocks = [sub for sub in module.modules() if isinstance(sub, Attention)]
    return bool(blocks) and all(type(sub) is SDPAAttention for sub in blocks)
