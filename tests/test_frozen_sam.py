"""FrozenSAM (eqs. 3-4) against segment_anything's own PromptEncoder and SamPredictor: the point
table and the Gumbel point, the prompt assembly, decoding with prompt dropout, caching."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from prompt_ris.config import Config
from prompt_ris.data.batch import ModelInputs
from prompt_ris.data.text import tokenize
from prompt_ris.models import PromptRIS
from prompt_ris.prompt_switches import PromptSwitches
from prompt_ris.models.build import build_sam
from prompt_ris.models.frozen_sam import (
    FrozenSAM,
    PromptKeep,
    SAMPrompts,
    point_grid_coords,
    predict_first_mask,
)


def _tiny_sam_file(cfg: Config, path: Path) -> Sam:
    """A random segment_anything Sam from the tiny fields, saved as a SAM .pth state dict."""
    torch.manual_seed(0)
    sam = build_sam(cfg.model.sam, None).eval()
    torch.save(sam.state_dict(), path)
    return sam


def _frozen_sam(cfg: Config, frozen: bool = True, seed: int = 0) -> FrozenSAM:
    torch.manual_seed(seed)
    sam = build_sam(cfg.model.sam, None)
    return FrozenSAM(
        image_encoder=sam.image_encoder,
        prompt_encoder=sam.prompt_encoder,
        mask_decoder=sam.mask_decoder,
        freeze_image_encoder=frozen,
        freeze_prompt_encoder=frozen,
    )


def test_sizes_and_sam_tokens(tiny_cfg: Config) -> None:
    sam = _frozen_sam(tiny_cfg)
    encoder = sam.prompt_encoder
    assert (sam.image_size, sam.lowres_size) == (256, 64)  # S_s and S_s / 4
    assert sam.dtype == torch.float32
    assert sam.pad_embed is encoder.not_a_point_embed.weight and sam.pad_embed.shape == (1, 64)
    torch.testing.assert_close(sam.dense_pe(), encoder.get_dense_pe())
    assert sam.dense_pe().shape == (1, 64, 16, 16)


def test_point_grid_is_row_major_cell_centres() -> None:
    coords = point_grid_coords(4, 16, torch.device("cpu"))  # 4 cells of 4 SAM pixels a side
    assert coords.shape == (16, 2)
    # Cell (r, c) spans pixels [4c, 4c + 4): its centre 4c + 2 minus SAM's 0.5 shift.
    torch.testing.assert_close(coords[0], torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(coords[1], torch.tensor([5.5, 1.5]))  # (r, c) = (0, 1): x moves
    torch.testing.assert_close(coords[4], torch.tensor([1.5, 5.5]))  # (1, 0): y moves
    torch.testing.assert_close(coords[15], torch.tensor([13.5, 13.5]))


def test_point_onehot_equals_sam_click(tiny_cfg: Config) -> None:
    sam = _frozen_sam(tiny_cfg)
    encoder = sam.prompt_encoder
    lowres = sam.lowres_size  # 64 cells a side, 4 SAM pixels each
    table = sam.point_table()  # E: (64*64, C)
    assert table.shape == (lowres * lowres, 64)
    for row, col in [(0, 0), (5, 40), (63, 63), (31, 2)]:
        j = row * lowres + col
        one_hot = F.one_hot(torch.tensor([j]), lowres * lowres).float()
        # The centre of cell (row, col) spans SAM pixels [4c, 4c+4): click at 4c + 1.5
        # (SAM adds 0.5 to reach a pixel centre).
        click = torch.tensor([[[4 * col + 1.5, 4 * row + 1.5]]])
        sparse, _ = encoder(points=(click, torch.ones(1, 1)), boxes=None, masks=None)
        torch.testing.assert_close((one_hot @ table)[0], sparse[0, 0].detach())
        # SAM pads a lone click with its not-a-point token; embed_prompts does the same.
        torch.testing.assert_close(encoder.not_a_point_embed.weight[0], sparse[0, 1].detach())


def test_gumbel_point_is_one_table_row(tiny_cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    sam = _frozen_sam(tiny_cfg)
    table = torch.randn(16, 8)
    monkeypatch.setattr(sam, "point_table", lambda: table)  # E of a 4 x 4 grid
    logits = torch.full((2, 1, 4, 4), -5.0)
    logits[0, 0, 1, 2] = 5.0  # cell 6
    logits[1, 0, 3, 0] = 5.0  # cell 12
    torch.testing.assert_close(sam.eval().embed_point(logits), table[[6, 12]])
    sam.train()
    logits.requires_grad_(True)
    sampled = sam.embed_point(logits)  # straight-through: forward is exactly one row per sample
    rows = (sampled.detach().unsqueeze(1) - table.unsqueeze(0)).abs().amax(-1).amin(-1)
    assert float(rows.max()) < 1e-6
    sampled.sum().backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_gumbel_tau_comes_from_the_config(tiny_cfg: Config) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.prompts.gumbel_tau = 0.25
    assert PromptRIS.from_config(cfg.model).sam.gumbel_tau == 0.25
    assert _frozen_sam(tiny_cfg).gumbel_tau == 1.0  # the default


def test_point_table_is_cached_only_when_frozen(tiny_cfg: Config) -> None:
    frozen = _frozen_sam(tiny_cfg, frozen=True)
    first = frozen.point_table()
    assert frozen.point_table() is first and not first.requires_grad

    trainable = _frozen_sam(tiny_cfg, frozen=False)
    table = trainable.point_table()
    assert table.requires_grad and trainable.point_table() is not table
    table.sum().backward()
    pe = trainable.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix  # a buffer
    assert pe.grad is None
    label = trainable.prompt_encoder.point_embeddings[1].weight
    assert label.grad is not None and float(label.grad.abs().sum()) > 0


def test_frozen_image_encoder_runs_without_gradient(tiny_cfg: Config) -> None:
    images = torch.randn(2, 3, 256, 256)
    frozen = _frozen_sam(tiny_cfg, frozen=True)
    embed = frozen.encode_images(images)
    assert embed.shape == (2, 64, 16, 16) and not embed.requires_grad
    trainable = _frozen_sam(tiny_cfg, frozen=False)
    assert trainable.encode_images(images).requires_grad
    torch.testing.assert_close(trainable.encode_images(images).detach(), embed)  # same seed


def test_embed_mask_uses_no_mask_embed_where_dropped(tiny_cfg: Config) -> None:
    sam = _frozen_sam(tiny_cfg).eval()
    coarse = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        dense = sam.embed_mask(coarse, None)
        want = sam.prompt_encoder.mask_downscaling(coarse)
        dropped = sam.embed_mask(coarse, torch.tensor([True, False, True]))
    assert dense.shape == (3, 64, 16, 16)
    torch.testing.assert_close(dense, want)
    torch.testing.assert_close(dropped[[0, 2]], want[[0, 2]])
    no_mask = sam.prompt_encoder.no_mask_embed.weight.reshape(64, 1, 1).expand(64, 16, 16)
    torch.testing.assert_close(dropped[1], no_mask)


def test_embed_prompts_layout_and_padding(tiny_cfg: Config) -> None:
    """[P_point; pad; P_text] with the text positions after [EOS] left out (sparse_keep)."""
    sam = _frozen_sam(tiny_cfg).eval()
    torch.manual_seed(1)
    coarse = torch.randn(2, 1, 64, 64)
    text = torch.randn(2, 5, 64)
    pad_mask = torch.tensor([[False, False, True, True, True], [False] * 4 + [True]])
    pad = sam.pad_embed[0]
    with torch.no_grad():
        prompts = sam.embed_prompts(
            coarse, use_point=True, text_prompts=text, text_pad_mask=pad_mask, keep=PromptKeep()
        )
        point = sam.embed_point(coarse)
    assert prompts.sparse.shape == (2, 2 + 5, 64)
    torch.testing.assert_close(prompts.sparse[:, 0], point)
    torch.testing.assert_close(prompts.sparse[:, 1], pad.expand(2, 64))
    torch.testing.assert_close(prompts.sparse[:, 2:], text)
    assert prompts.sparse_keep.tolist() == [
        [True, True, True, True, False, False, False], [True] * 6 + [False]
    ]
    torch.testing.assert_close(prompts.dense, sam.embed_mask(coarse, None))

    with torch.no_grad():
        point_only = sam.embed_prompts(
            coarse, use_point=True, text_prompts=None, text_pad_mask=pad_mask, keep=PromptKeep()
        )
        text_only = sam.embed_prompts(
            coarse, use_point=False, text_prompts=text, text_pad_mask=pad_mask,
            keep=PromptKeep(text=torch.tensor([True, False])),
        )  # fmt: skip
        nothing = sam.embed_prompts(
            coarse, use_point=False, text_prompts=None, text_pad_mask=pad_mask,
            keep=PromptKeep(mask=torch.tensor([False, False])),
        )  # fmt: skip
    torch.testing.assert_close(point_only.sparse, prompts.sparse[:, :2])
    assert point_only.sparse_keep is None  # nothing dropped, no text: one batch
    torch.testing.assert_close(text_only.sparse, prompts.sparse[:, 2:])
    assert text_only.sparse_keep.tolist() == [[True, True, False, False, False], [False] * 5]
    assert nothing.sparse.shape == (2, 0, 64) and nothing.sparse_keep is None
    no_mask = sam.prompt_encoder.no_mask_embed.weight.reshape(1, 64, 1, 1).expand(2, 64, 16, 16)
    torch.testing.assert_close(nothing.dense, no_mask)


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
    model = PromptRIS.from_config(tiny_cfg.model, sam_weights=str(tmp_path / "sam_tiny.pth")).eval()

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(150, 200, 3), dtype=np.uint8)  # H, W
    predictor = SamPredictor(reference)
    predictor.set_image(image)
    sam_images, input_size = _sam_frame(image, predictor, reference)
    assert input_size == tuple(predictor.input_size)

    clip_size = tiny_cfg.model.clip.image_size
    inputs = ModelInputs(
        clip_images=torch.randn(1, 3, clip_size, clip_size),
        sam_images=sam_images,
        text_tokens=tokenize(["the thing on the right"], tiny_cfg.model.clip.text_length),
        image_index=torch.zeros(1, dtype=torch.long),
    )
    with torch.no_grad():
        sam_img_embed = model.encode_sam(sam_images)
        out = model(inputs, switches=PromptSwitches.parse("point"))
    torch.testing.assert_close(sam_img_embed, predictor.features, rtol=1e-4, atol=1e-4)

    # The point our model chose (argmax of S_C) as a click in the original image.
    lowres = out.coarse_lowres[0, 0]  # (64, 64)
    torch.testing.assert_close(lowres, model.upsample_coarse(out.coarse_logits)[0, 0])
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
        point_coords=click + 40,
        point_labels=np.array([1]),
        multimask_output=False,
        return_logits=True,
    )
    assert float((out.mask_logits[0, 0] - torch.from_numpy(other[0])).abs().max()) > 1e-2
    full = model.original_logits(
        out, torch.tensor([input_size]), torch.tensor([image.shape[:2]]), inputs.image_index,
        outputs=("final",),
    )["final"]  # fmt: skip
    assert full[0].shape == image.shape[:2]
    torch.testing.assert_close(full[0], torch.from_numpy(masks[0]), rtol=1e-4, atol=1e-4)


def test_decode_mixed_prompt_patterns_match_single_rows(tiny_model: PromptRIS) -> None:
    """Rows with different kept tokens (prompt dropout, expression lengths) decode as if each
    were alone."""
    sam = tiny_model.sam.eval()
    torch.manual_seed(0)
    c, h = sam.prompt_encoder.embed_dim, sam.prompt_encoder.image_embedding_size[0]
    embed = torch.randn(2, c, h, h)
    image_index = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        prompts = sam.embed_prompts(
            torch.randn(4, 1, 4 * h, 4 * h),
            use_point=True,
            text_prompts=torch.randn(4, 3, c),
            text_pad_mask=torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 0, 0]]).bool(),
            keep=PromptKeep(
                point=torch.tensor([True, False, True, False]),
                text=torch.tensor([True, True, False, False]),
            ),
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
    assert [int(k.sum()) for k in prompts.sparse_keep] == [5, 2, 2, 0]
    assert batched.shape == (4, 1, 4 * h, 4 * h)


def test_missing_sam_checkpoint_names_file_and_fix(tiny_cfg: Config) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.sam.checkpoint = "checkpoints/nowhere/sam_vit_b_01ec64.pth"
    with pytest.raises(FileNotFoundError, match=r"sam_vit_b_01ec64\.pth.*download_weights\.py"):
        PromptRIS.from_config(cfg.model)


def test_predict_first_mask_equals_segment_anything_predict_masks() -> None:
    """On a small random segment_anything decoder: per image, the first mask and the IoU token
    of ``MaskDecoder.predict_masks``; prompts of two images in one batch."""
    torch.manual_seed(0)
    dim, grid = 32, 8
    decoder = MaskDecoder(
        transformer_dim=dim,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=32,
    ).eval()
    prompts = PromptEncoder(dim, (grid, grid), (16 * grid, 16 * grid), mask_in_chans=4)
    image_pe = prompts.get_dense_pe()  # (1, C, h, w)
    embeddings = torch.randn(2, dim, grid, grid)  # two images
    sparse = torch.randn(2, 3, 4, dim)  # three prompt sets of four tokens per image
    dense = torch.randn(2, 3, dim, grid, grid)
    with torch.no_grad():
        rows = torch.tensor([0, 0, 0, 1, 1, 1])
        ours, iou_token = predict_first_mask(
            decoder, embeddings[rows], image_pe, sparse.flatten(0, 1), dense.flatten(0, 1)
        )
        assert ours.shape == (6, 1, 4 * grid, 4 * grid) and iou_token.shape == (6, dim)
        for i in range(2):
            masks, iou = decoder.predict_masks(embeddings[i : i + 1], image_pe, sparse[i], dense[i])
            torch.testing.assert_close(ours[3 * i : 3 * i + 3], masks[:, :1], rtol=1e-5, atol=1e-5)
            got_iou = decoder.iou_prediction_head(iou_token[3 * i : 3 * i + 3])
            torch.testing.assert_close(got_iou, iou, rtol=1e-5, atol=1e-5)


def test_position_encoding_is_sams_own_computed_in_float32(tiny_cfg: Config) -> None:
    """``_position_encoding`` is ``PositionEmbeddingRandom._pe_encoding``; with half-precision
    weights it is SAM's float32 result rounded once, where SAM's own loses the sines' precision."""
    sam = _frozen_sam(tiny_cfg)
    coords = torch.rand(5, 7, 2, generator=torch.Generator().manual_seed(0))  # in [0, 1]^2
    with torch.no_grad():
        reference = sam.prompt_encoder.pe_layer._pe_encoding(coords)  # (5, 7, D_S)
        torch.testing.assert_close(sam._position_encoding(coords), reference, rtol=0, atol=0)

        sam.to(torch.bfloat16)
        pe_layer = sam.prompt_encoder.pe_layer
        widened = copy.deepcopy(pe_layer).float()  # the bf16 matrix, float32 arithmetic
        expected = widened._pe_encoding(coords)
        ours = sam._position_encoding(coords)
        theirs = pe_layer._pe_encoding(coords.to(torch.bfloat16))  # everything in bf16
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, expected.to(torch.bfloat16), rtol=0, atol=0)
    assert float((theirs.float() - expected).abs().max()) > 0.05
