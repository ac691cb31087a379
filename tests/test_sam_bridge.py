"""FrozenSAM and the SAM prompts against segment_anything's own PromptEncoder and SamPredictor."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from prompt_ris.config import Config
from prompt_ris.data.text import tokenize
from prompt_ris.models import PromptSwitches, build_prompt_ris
from prompt_ris.models.build import build_sam
from prompt_ris.models.sam_prompts import (
    GumbelPointPrompt,
    SAMPrompts,
    assemble_sam_prompts,
    build_point_table,
)


def _tiny_sam_file(cfg: Config, path: Path) -> Sam:
    """A random segment_anything Sam from the tiny fields, saved as a SAM .pth state dict."""
    torch.manual_seed(0)
    sam = build_sam(cfg.model.sam, None).eval()
    torch.save(sam.state_dict(), path)
    return sam


def test_point_onehot_equals_sam_click(tiny_cfg: Config) -> None:
    torch.manual_seed(0)
    encoder = build_sam(tiny_cfg.model.sam, None).prompt_encoder
    lowres = tiny_cfg.model.sam.image_size // 4  # 64 cells a side, 4 SAM pixels each
    table = build_point_table(encoder, lowres)  # (64*64, C)
    for row, col in [(0, 0), (5, 40), (63, 63), (31, 2)]:
        j = row * lowres + col
        one_hot = F.one_hot(torch.tensor([j]), lowres * lowres).float()
        # The centre of cell (row, col) spans SAM pixels [4c, 4c+4): click at 4c + 1.5
        # (SAM adds 0.5 to reach a pixel centre).
        click = torch.tensor([[[4 * col + 1.5, 4 * row + 1.5]]])
        sparse, _ = encoder(points=(click, torch.ones(1, 1)), boxes=None, masks=None)
        torch.testing.assert_close((one_hot @ table)[0], sparse[0, 0].detach())
        # SAM pads a lone click with its not-a-point token; assemble_sam_prompts does the same.
        torch.testing.assert_close(encoder.not_a_point_embed.weight[0], sparse[0, 1].detach())


def test_gumbel_point_is_one_table_row(tiny_cfg: Config) -> None:
    table = torch.randn(16, 8)
    logits = torch.full((2, 1, 4, 4), -5.0)
    logits[0, 0, 1, 2] = 5.0  # cell 6
    logits[1, 0, 3, 0] = 5.0  # cell 12
    point = GumbelPointPrompt(tau=1.0)
    torch.testing.assert_close(point.eval()(logits, table), table[[6, 12]])
    point.train()
    logits.requires_grad_(True)
    sampled = point(logits, table)  # straight-through: forward is exactly one row per sample
    rows = (sampled.detach().unsqueeze(1) - table.unsqueeze(0)).abs().amax(-1).amin(-1)
    assert float(rows.max()) < 1e-6
    sampled.sum().backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def _sam_frame(image: np.ndarray, predictor: SamPredictor, sam: Sam) -> tuple[torch.Tensor, tuple]:
    """SamPredictor's preprocessing, inline: ResizeLongestSide, pixel mean/std, zero pad."""
    resized = predictor.transform.apply_image(image)  # (h', w', 3) uint8
    x = torch.as_tensor(resized).permute(2, 0, 1)[None].float()
    x = (x - sam.pixel_mean) / sam.pixel_std
    size = sam.image_encoder.img_size
    x = F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))
    return x, resized.shape[:2]


def test_sam_path_matches_sam_predictor(tiny_cfg: Config, tmp_path: Path) -> None:
    reference = _tiny_sam_file(tiny_cfg, tmp_path / "sam_tiny.pth")
    torch.manual_seed(1)  # other seed: SAM weights must come from the file
    model = build_prompt_ris(tiny_cfg.model, sam_weights=str(tmp_path / "sam_tiny.pth")).eval()

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(150, 200, 3), dtype=np.uint8)  # H, W
    predictor = SamPredictor(reference)
    predictor.set_image(image)
    sam_images, input_size = _sam_frame(image, predictor, reference)
    assert input_size == tuple(predictor.input_size)

    clip_size = tiny_cfg.model.clip.image_size
    tokens = tokenize(["the thing on the right"], tiny_cfg.model.clip.text_length)
    index = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        sam_img_embed = model.encode_sam(sam_images)
        out = model(
            torch.randn(1, 3, clip_size, clip_size), sam_images, tokens, index,
            switches=PromptSwitches(mask=False, point=True, text=False),
        )
    torch.testing.assert_close(sam_img_embed, predictor.features, rtol=1e-4, atol=1e-4)

    # The point our model chose (argmax of S_C) as a click in the original image.
    lowres = model.upsample_coarse(out.coarse_logits)[0, 0]  # (64, 64)
    row, col = divmod(int(lowres.argmax()), lowres.shape[1])
    scale = input_size[1] / image.shape[1]  # 256 / 200 = 192 / 150 = 1.28
    click = np.array([[(4 * col + 1.5) / scale, (4 * row + 1.5) / scale]])
    masks, _, low_res = predictor.predict(
        point_coords=click, point_labels=np.array([1]), multimask_output=False, return_logits=True
    )
    torch.testing.assert_close(
        out.mask_logits[0, 0], torch.from_numpy(low_res[0]), rtol=1e-4, atol=1e-4
    )
    # The click matters: SAM's answer for another cell is far from ours.
    _, _, other = predictor.predict(
        point_coords=click + 40, point_labels=np.array([1]), multimask_output=False,
        return_logits=True,
    )
    assert float((out.mask_logits[0, 0] - torch.from_numpy(other[0])).abs().max()) > 1e-2
    full = model.postprocess_masks(
        out.mask_logits, torch.tensor([input_size]), torch.tensor([image.shape[:2]]), index
    )
    assert full[0].shape == image.shape[:2]
    torch.testing.assert_close(full[0], torch.from_numpy(masks[0]), rtol=1e-4, atol=1e-4)


def test_decode_mixed_prompt_patterns_match_single_rows(tiny_model: torch.nn.Module) -> None:
    """Rows with different kept tokens (prompt dropout) decode as if each were alone."""
    sam = tiny_model.sam.eval()
    torch.manual_seed(0)
    c, h = sam.prompt_encoder.embed_dim, sam.prompt_encoder.image_embedding_size[0]
    embed = torch.randn(2, c, h, h)
    image_index = torch.tensor([0, 0, 1, 1])
    prompts = assemble_sam_prompts(
        dense=torch.randn(4, c, h, h),
        point_embed=torch.randn(4, c),
        text_prompts=torch.randn(4, 3, c),
        pad_embed=sam.pad_embed,
        keep_point=torch.tensor([True, False, True, False]),
        keep_text=torch.tensor([True, True, False, False]),
    )
    assert prompts.sparse.shape == (4, 5, c)
    with torch.no_grad():
        batched = sam.decode(embed, image_index, prompts)
        for i in range(4):
            kept = prompts.sparse[i : i + 1][:, prompts.sparse_keep[i]]  # (1, k_i, C)
            single = SAMPrompts(sparse=kept, sparse_keep=None, dense=prompts.dense[i : i + 1])
            first = torch.zeros(1, dtype=torch.long)
            alone = sam.decode(embed[image_index[i : i + 1]], first, single)
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    assert [int(k.sum()) for k in prompts.sparse_keep] == [5, 3, 2, 0]


def test_missing_sam_checkpoint_names_file_and_fix(tiny_cfg: Config) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.sam.checkpoint = "checkpoints/nowhere/sam_vit_b_01ec64.pth"
    with pytest.raises(FileNotFoundError, match=r"sam_vit_b_01ec64\.pth.*download_weights\.py"):
        build_prompt_ris(cfg.model)
