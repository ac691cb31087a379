"""The cross-modal decoder (coarse_decoder.py): eq. (2) worked out by hand, the wiring of eq. (1),
t_g at [EOS], and the padding after [EOS]."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prompt_ris.models.coarse_decoder import CoarseDecoder


class _Block(nn.Module):
    """Stands in for a cross-attention block: records its inputs, returns ``out`` (or its
    query unchanged when ``out`` is None)."""

    def __init__(self, out: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out = out
        self.calls: list[tuple] = []

    def forward(self, x: torch.Tensor, context: torch.Tensor, pad: torch.Tensor | None):
        self.calls.append((x.detach().clone(), context.detach().clone(), pad))
        return x if self.out is None else self.out


def _bare_decoder(monkeypatch: pytest.MonkeyPatch) -> CoarseDecoder:
    """D = D_C = 2 with projections, blocks and norms replaced by identities, so that F'_IC and
    F'_T are the inputs themselves; logit scale exp(ln 2) = 2 and bias 0.5."""
    decoder = CoarseDecoder(vision_dim=2, text_dim=2, dim=2, num_heads=1)
    for name in ("img_proj", "text_proj", "img_norm", "text_norm"):
        monkeypatch.setattr(decoder, name, nn.Identity())
    monkeypatch.setattr(decoder, "img_block", _Block())
    monkeypatch.setattr(decoder, "text_block", _Block())
    with torch.no_grad():
        decoder.logit_scale.fill_(math.log(2.0))
        decoder.logit_bias.fill_(0.5)
    return decoder


# Two expressions on a 2 x 3 grid (h = 2 rows, w = 3 columns), tokens in row-major order.
IMG = torch.tensor(
    [
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0], [0.0, 0.0], [-1.0, 3.0]],
        [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0], [11.0, 12.0]],
    ]
)  # F'_IC: (B = 2, h*w = 6, D_C = 2)
TEXT = torch.tensor(
    [
        [[9.0, 9.0], [3.0, 2.0], [7.0, 7.0]],  # [EOS] at 1: t_g = (3, 2)
        [[1.0, -1.0], [5.0, 5.0], [0.0, 2.0]],  # [EOS] at 2: t_g = (0, 2)
    ]
)  # F'_T: (B, L = 3, D_C)
EOS = torch.tensor([1, 2])
PAD = torch.tensor([[False, False, True], [False, False, False]])


def test_eq2_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """S'_C = (F'_IC t_g) * exp(logit_scale) + logit_bias, reshaped row-major to (h, w)."""
    decoder = _bare_decoder(monkeypatch)
    out = decoder(IMG, TEXT, PAD, EOS, (2, 3))
    # Expression 0, t_g = (3, 2): F'_IC t_g = 3, 2, 5, 4, 0, 3 -> 2 x + 0.5.
    # Expression 1, t_g = (0, 2): F'_IC t_g = 4, 8, 12, 16, 20, 24 -> 2 x + 0.5.
    expected = torch.tensor(
        [
            [[[6.5, 4.5, 10.5], [8.5, 0.5, 6.5]]],
            [[[8.5, 16.5, 24.5], [32.5, 40.5, 48.5]]],
        ]
    )  # (B, 1, h, w)
    assert out.coarse_logits.shape == (2, 1, 2, 3)
    torch.testing.assert_close(out.coarse_logits, expected)
    torch.testing.assert_close(out.text_global, torch.tensor([[3.0, 2.0], [0.0, 2.0]]))


def test_eq1_wiring_with_known_block_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both cross-attentions read the projected inputs (not each other's outputs); the image
    block gets the text padding mask, the text block none; eq. (2) reads the blocks' outputs."""
    decoder = CoarseDecoder(vision_dim=3, text_dim=1, dim=2, num_heads=1)
    with torch.no_grad():  # img_proj(x) = (x0 + x1, x2) + (1, 0); text_proj(t) = (t, -t)
        decoder.img_proj.weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
        decoder.img_proj.bias.copy_(torch.tensor([1.0, 0.0]))
        decoder.text_proj.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        decoder.text_proj.bias.zero_()
        decoder.logit_scale.zero_()  # scale exp(0) = 1
    img_out = torch.tensor([[[1.0, 2.0], [0.5, -1.0]]])  # F'_IC: (1, 2, 2), a 1 x 2 grid
    text_out = torch.tensor([[[4.0, 4.0], [2.0, 3.0]]])  # F'_T: (1, L = 2, 2), [EOS] at 1
    img_block, text_block = _Block(img_out), _Block(text_out)
    monkeypatch.setattr(decoder, "img_block", img_block)
    monkeypatch.setattr(decoder, "text_block", text_block)
    monkeypatch.setattr(decoder, "img_norm", nn.Identity())
    monkeypatch.setattr(decoder, "text_norm", nn.Identity())
    img_in = torch.tensor([[[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]]])  # F_IC: (1, 2, D_IC = 3)
    text_in = torch.tensor([[[2.0], [-3.0]]])  # F_T: (1, 2, D_T = 1)
    pad = torch.tensor([[False, False]])
    with torch.no_grad():
        out = decoder(img_in, text_in, pad, torch.tensor([1]), (1, 2))

    projected_img = torch.tensor([[[4.0, 3.0], [0.0, 5.0]]])
    projected_text = torch.tensor([[[2.0, -2.0], [-3.0, 3.0]]])
    ((q, ctx, mask),) = img_block.calls
    torch.testing.assert_close(q, projected_img)
    torch.testing.assert_close(ctx, projected_text)
    assert mask is pad
    ((q, ctx, mask),) = text_block.calls
    torch.testing.assert_close(q, projected_text)
    torch.testing.assert_close(ctx, projected_img)  # the image tokens before their update
    assert mask is None
    # t_g = F'_T[EOS] = (2, 3); S'_C = (1*2 + 2*3, 0.5*2 - 1*3) = (8, -2), scale 1, bias 0.
    torch.testing.assert_close(out.text_global, torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(out.coarse_logits, torch.tensor([[[[8.0, -2.0]]]]))


def test_initial_scale_and_padding_after_eos() -> None:
    torch.manual_seed(0)
    decoder = CoarseDecoder(vision_dim=6, text_dim=4, dim=8, num_heads=2).eval()
    assert decoder.logit_scale.item() == pytest.approx(math.log(1 / math.sqrt(8)))
    assert decoder.logit_bias.item() == 0.0
    img, text = torch.randn(2, 12, 6), torch.randn(2, 5, 4)
    pad = torch.tensor([[False, False, False, True, True], [False] * 5])
    eos = torch.tensor([2, 4])
    with torch.no_grad():
        base = decoder(img, text, pad, eos, (3, 4))
        padded = text.clone()
        padded[0, 3:] = torch.randn(2, 4)  # only the padding after [EOS] changes
        same = decoder(img, padded, pad, eos, (3, 4))
        word = text.clone()
        word[0, 0] = torch.randn(4)  # a word before [EOS]
        other = decoder(img, word, pad, eos, (3, 4))
    assert base.coarse_logits.shape == (2, 1, 3, 4) and base.text_global.shape == (2, 8)
    torch.testing.assert_close(same.coarse_logits, base.coarse_logits)
    torch.testing.assert_close(same.text_global, base.text_global)
    # The word reaches the image tokens (eq. 1); t_g only reads its own token and the image.
    assert not torch.allclose(other.coarse_logits[0], base.coarse_logits[0], atol=1e-5)
    torch.testing.assert_close(other.text_global, base.text_global)
    torch.testing.assert_close(other.coarse_logits[1], base.coarse_logits[1])
