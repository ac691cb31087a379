"""models/build.py against the libraries' own builders."""

from __future__ import annotations

import torch
from segment_anything import sam_model_registry

from prompt_ris.config import load_config
from prompt_ris.models.build import build_sam


def test_build_sam_at_vit_b_is_segment_anythings_vit_b() -> None:
    """``build_sam`` with the vit_b numbers builds what ``sam_model_registry["vit_b"]`` builds:
    the same modules, parameter names and shapes (window sizes and global blocks show in the
    relative-position tables), per-block windows, image sizes and pixel statistics. On the meta
    device: no memory, no compute."""
    cfg = load_config().model.sam
    with torch.device("meta"):
        ours = build_sam(cfg, None)
        theirs = sam_model_registry["vit_b"]()
    assert repr(ours) == repr(theirs)  # layer widths, norms and their eps, activations
    shapes = {name: tuple(t.shape) for name, t in theirs.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in ours.state_dict().items()} == shapes
    assert len(shapes) > 300
    windows = [block.window_size for block in theirs.image_encoder.blocks]
    assert [block.window_size for block in ours.image_encoder.blocks] == windows
    assert windows.count(0) == 4  # the four global-attention blocks
    assert ours.image_encoder.img_size == theirs.image_encoder.img_size == 1024
    prompt_ours, prompt_theirs = ours.prompt_encoder, theirs.prompt_encoder
    assert prompt_ours.image_embedding_size == prompt_theirs.image_embedding_size == (64, 64)
    assert prompt_ours.input_image_size == prompt_theirs.input_image_size == (1024, 1024)
    assert ours.mask_decoder.num_multimask_outputs == theirs.mask_decoder.num_multimask_outputs
    torch.testing.assert_close(ours.pixel_mean, theirs.pixel_mean, rtol=0, atol=0)
    torch.testing.assert_close(ours.pixel_std, theirs.pixel_std, rtol=0, atol=0)
