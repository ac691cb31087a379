"""Predictor: one SAM embedding per image, batched expressions, masks in the original frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from prompt_ris.config import Config
from prompt_ris.data.batch import ModelInputs
from prompt_ris.data.text import EmptyExpressionError, tokenize
from prompt_ris.data.transforms import ImageLoadError
from prompt_ris.frames import lowres_to_original
from prompt_ris.models import NonFiniteOutputError, Prediction, PromptRIS
from prompt_ris.prompt_switches import PromptSwitches
from prompt_ris.models.build import build_sam
from prompt_ris.predictor import Predictor, resolve_device, resolve_dtype

TEXTS = ["the man on the left", "the small dog next to the bench"]


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 with smooth structure, so that resampling differences stay small."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


@pytest.fixture
def predictor(tiny_model: PromptRIS) -> Predictor:
    return Predictor(tiny_model, device="cpu", dtype=torch.float32)


def test_path_pil_array_agree(predictor: Predictor, tmp_path: Path) -> None:
    array = random_image(37, 53)
    path = tmp_path / "img.png"
    Image.fromarray(array).save(path)
    results = []
    for image in (str(path), Image.fromarray(array), array):
        predictor.set_image(image)
        results.append(predictor.predict(TEXTS[:2], return_probs=True))
    for result in results[1:]:
        np.testing.assert_array_equal(result.probs, results[0].probs)
        np.testing.assert_array_equal(result.masks, results[0].masks)


@pytest.mark.parametrize("size", [(37, 53), (3, 61), (300, 17)])
def test_masks_at_original_size_match_sam_postprocess(
    tiny_model: PromptRIS, tiny_cfg: Config, size: tuple[int, int]
) -> None:
    height, width = size
    array = random_image(height, width, seed=height)
    predictor = Predictor(tiny_model, device="cpu", dtype=torch.float32)
    predictor.set_image(array)
    result = predictor.predict(TEXTS, return_probs=True, return_coarse=True)

    assert result.masks.shape == (2, height, width) and result.masks.dtype == bool
    assert result.probs.shape == (2, height, width) and result.probs.dtype == np.float32
    assert result.coarse_masks.shape == (2, height, width)
    assert result.coarse_probs is not None
    np.testing.assert_array_equal(result.masks, result.probs > 0.5)

    # Independent reference: segment_anything's own resize rule, preprocessing and postprocessing
    # around the model's forward.
    sam_size = tiny_cfg.model.sam.image_size
    sam = build_sam(tiny_cfg.model.sam, None)
    resize = ResizeLongestSide(sam_size)
    input_size = resize.get_preprocess_shape(height, width, sam_size)
    assert predictor.input_size == input_size and predictor.orig_size == (height, width)
    sam_input = torch.as_tensor(resize.apply_image(array)).permute(2, 0, 1)[None].float()
    sam_image = sam.preprocess(sam_input)  # (1, 3, S_s, S_s)
    frames = tiny_model.letterbox(array)  # what set_image letterboxes
    torch.testing.assert_close(frames.sam_image[None], sam_image, atol=0.05, rtol=0)

    inputs = ModelInputs(
        clip_images=frames.clip_image[None],
        sam_images=frames.sam_image[None],
        text_tokens=tokenize(TEXTS, tiny_cfg.model.clip.text_length),
        image_index=torch.zeros(2, dtype=torch.long),
    )
    with torch.no_grad():
        out = tiny_model(inputs)
        want = sam.postprocess_masks(out.mask_logits, input_size, (height, width))  # (2, 1, H, W)
        coarse = torch.nn.functional.interpolate(
            out.coarse_logits, (sam_size // 4,) * 2, mode="bilinear", align_corners=False
        )
        want_coarse = sam.postprocess_masks(coarse, input_size, (height, width))
    np.testing.assert_allclose(result.probs, want[:, 0].sigmoid().numpy(), atol=1e-6)
    np.testing.assert_allclose(result.coarse_probs, want_coarse[:, 0].sigmoid().numpy(), atol=1e-6)


def test_multi_expression_call_equals_separate_calls(predictor: Predictor) -> None:
    predictor.set_image(random_image(40, 64))
    together = predictor.predict(TEXTS, return_probs=True)
    predictor.max_batch = 1  # chunked: one forward pass per expression
    chunked = predictor.predict(TEXTS, return_probs=True)
    np.testing.assert_allclose(chunked.probs, together.probs, atol=1e-5, rtol=0)
    for i, text in enumerate(TEXTS):
        alone = predictor.predict(text, return_probs=True)
        assert alone.expressions == [text] and alone.masks.shape == (1, 40, 64)
        np.testing.assert_allclose(alone.probs[0], together.probs[i], atol=1e-5, rtol=0)
        decided = np.abs(together.probs[i] - 0.5) > 1e-4  # away from the threshold
        np.testing.assert_array_equal(alone.masks[0][decided], together.masks[i][decided])


def test_sam_encoder_runs_once_per_image(predictor: Predictor, tiny_model: PromptRIS) -> None:
    calls = []
    hook = tiny_model.sam.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        predictor.set_image(random_image(20, 30))
        predictor.predict(TEXTS)
        predictor.predict(TEXTS[0])
    finally:
        hook.remove()
    assert len(calls) == 1


def test_switches_reach_the_model(predictor: Predictor, tiny_model: PromptRIS) -> None:
    image = random_image(32, 32)
    predictor.set_image(image)
    switches = PromptSwitches.parse("mask")
    got = predictor.predict(TEXTS[:1], switches=switches, return_probs=True).probs
    default = predictor.predict(TEXTS[:1], return_probs=True).probs
    assert not np.allclose(got, default)
    frames = tiny_model.letterbox(image)
    inputs = ModelInputs(
        clip_images=frames.clip_image[None],
        sam_images=frames.sam_image[None],
        text_tokens=tokenize(TEXTS[:1], tiny_model.text_length),
        image_index=torch.zeros(1, dtype=torch.long),
    )
    with torch.no_grad():
        out = tiny_model(inputs, switches=switches)
    want = lowres_to_original(
        out.mask_logits, torch.tensor([predictor.input_size]), torch.tensor([[32, 32]]),
        inputs.image_index, tiny_model.sam.image_size,
    )[0]  # fmt: skip
    np.testing.assert_allclose(got[0], want.sigmoid().numpy(), atol=1e-6)


def test_predict_torch_gives_original_frame_logits(predictor: Predictor) -> None:
    predictor.set_image(random_image(25, 45))
    want = predictor.predict(TEXTS, return_probs=True, return_coarse=True)
    logits = predictor.predict_torch(tokenize(TEXTS, predictor.model.text_length))
    assert list(logits) == ["final"] and logits["final"].shape == (2, 25, 45)
    both = predictor.predict_torch(tokenize(TEXTS, predictor.model.text_length), with_coarse=True)
    assert set(both) == {"final", "coarse"} and both["coarse"].shape == (2, 25, 45)
    assert both["final"].dtype == both["coarse"].dtype == torch.float32
    np.testing.assert_allclose(torch.sigmoid(both["final"]).numpy(), want.probs, atol=1e-6)
    np.testing.assert_allclose(torch.sigmoid(both["coarse"]).numpy(), want.coarse_probs, atol=1e-6)
    assert isinstance(want, Prediction) and want.expressions == TEXTS


def test_image_state_and_threshold(tiny_model: PromptRIS) -> None:
    predictor = Predictor(tiny_model, device="cpu", dtype=torch.float32, threshold=0.3)
    assert not predictor.is_image_set
    assert predictor.orig_size is None and predictor.input_size is None
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict_torch(tokenize(TEXTS, tiny_model.text_length))
    predictor.set_image(random_image(30, 20))
    assert predictor.is_image_set
    assert (predictor.orig_size, predictor.input_size) == ((30, 20), (256, 171))
    got = predictor.predict(TEXTS, return_probs=True)
    np.testing.assert_array_equal(got.masks, got.probs > 0.3)
    predictor.reset_image()
    assert not predictor.is_image_set and predictor.orig_size is None
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"probability in \(0, 1\)"):
            Predictor(tiny_model, device="cpu", threshold=bad)  # refused when built
    with pytest.raises(ValueError, match="max_batch"):
        Predictor(tiny_model, device="cpu", max_batch=0)


@pytest.mark.parametrize("bad", ["", "   ", ["fine", "\t\n"]])
def test_empty_expression_raises(predictor: Predictor, bad: str | list[str]) -> None:
    predictor.set_image(random_image(16, 16))
    with pytest.raises(EmptyExpressionError, match="empty"):
        predictor.predict(bad)


def test_no_expression_raises(predictor: Predictor) -> None:
    predictor.set_image(random_image(16, 16))
    with pytest.raises(ValueError, match="no expression"):
        predictor.predict([])


@pytest.mark.parametrize(
    ("bad", "says"),
    [(None, "got None"), (5, "got 5"), (b"the dog", "got b'the dog'"), (["ok", 3], "expression 1")],
)
def test_non_string_expressions_raise_a_clear_type_error(
    predictor: Predictor, tiny_model: PromptRIS, bad: object, says: str
) -> None:
    image = random_image(16, 16)
    predictor.set_image(image)
    for predict in (predictor.predict, lambda texts: tiny_model.predict(image, texts)):
        with pytest.raises(TypeError, match="string") as err:
            predict(bad)
        assert says in str(err.value)


def test_non_finite_outputs_raise_instead_of_empty_masks(tiny_model: PromptRIS) -> None:
    with torch.no_grad():
        tiny_model.decoder.logit_bias.fill_(float("nan"))  # a diverged run's weights
    predictor = Predictor(tiny_model, device="cpu", dtype=torch.float32)
    predictor.set_image(random_image(16, 16))
    with pytest.raises(NonFiniteOutputError, match=r"NaN or infinite.*fp32"):
        predictor.predict(["the dog"])
    with pytest.raises(NonFiniteOutputError):
        tiny_model.predict(random_image(16, 16), "the dog")


def test_long_expression_is_cut_with_warning(predictor: Predictor) -> None:
    predictor.set_image(random_image(16, 24))
    length = predictor.model.text_length
    long_text = " ".join(["word"] * (length + 5))
    cut_text = " ".join(["word"] * (length - 2))  # what fits: L - [SOS] - [EOS]
    with pytest.warns(UserWarning, match="was cut"):
        got = predictor.predict(long_text, return_probs=True)
    np.testing.assert_array_equal(got.probs, predictor.predict(cut_text, return_probs=True).probs)


def test_bad_images_raise(predictor: Predictor, tmp_path: Path) -> None:
    corrupt, empty = tmp_path / "corrupt.jpg", tmp_path / "empty.png"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    empty.write_bytes(b"")
    for path in (corrupt, empty, tmp_path / "missing.png"):
        with pytest.raises(ImageLoadError, match=path.name):
            predictor.set_image(path)
    bad_arrays = [
        np.zeros((0, 5, 3), np.uint8),  # zero size
        np.zeros((5, 5, 3), np.float32),  # not uint8
        np.zeros((5, 5, 2), np.uint8),  # no RGB layout
    ]
    for array in bad_arrays:
        with pytest.raises(ValueError, match="zero size|uint8|shape"):
            predictor.set_image(array)
    with pytest.raises(ValueError, match="zero size"):
        predictor.set_image(Image.new("RGB", (0, 7)))
    with pytest.raises(ValueError, match="mode 'La'"):
        predictor.set_image(Image.new("La", (4, 4)))
    with pytest.raises(TypeError, match="path, a PIL image"):
        predictor.set_image(torch.zeros(3, 4, 4))  # type: ignore[arg-type]
    # A failed set_image leaves no stale image behind.
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict("the dog")


def test_convertible_modes_work(predictor: Predictor) -> None:
    rgb = Image.fromarray(random_image(21, 34))
    grey = rgb.convert("L")
    for image in (rgb.convert("RGBA"), rgb.convert("CMYK")):
        predictor.set_image(image)
        assert predictor.predict("the dog").masks.shape == (1, 21, 34)
    # Grey arrays and 16-bit grey images give the same result as their 8-bit RGB version.
    predictor.set_image(grey.convert("RGB"))
    want = predictor.predict("the dog", return_probs=True).probs
    grey16 = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    for image in (np.asarray(grey), grey16):
        predictor.set_image(image)
        np.testing.assert_array_equal(predictor.predict("the dog", return_probs=True).probs, want)


def test_device_and_dtype_defaults() -> None:
    cuda = torch.cuda.is_available()
    assert resolve_device(None) == torch.device("cuda" if cuda else "cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", torch.device("cpu"))


def test_bf16_autocast_close_to_fp32(tiny_model: PromptRIS) -> None:
    image = random_image(30, 40)
    fp32 = Predictor(tiny_model, device="cpu", dtype=torch.float32)
    fp32.set_image(image)
    want = fp32.predict(TEXTS[0], return_probs=True).probs
    bf16 = Predictor(tiny_model, device="cpu", dtype="bf16")
    bf16.set_image(image)
    got = bf16.predict(TEXTS[0], return_probs=True).probs
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=0.02)
    assert {p.dtype for p in tiny_model.parameters()} == {torch.float32}  # weights untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_default_matches_cpu(tiny_model: PromptRIS) -> None:
    image = random_image(45, 33)
    cpu = Predictor(tiny_model, device="cpu", dtype=torch.float32)
    cpu.set_image(image)
    want = cpu.predict(TEXTS, return_probs=True).probs
    gpu = Predictor(tiny_model)  # defaults: CUDA, bf16 autocast
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    gpu.set_image(image)
    got = gpu.predict(TEXTS, return_probs=True).probs
    np.testing.assert_allclose(got, want, atol=0.02)
