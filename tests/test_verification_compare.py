"""imagebus.verification.compare: honest re-runs match, forgeries and bad input do not."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from imagebus.protocol import ImageParams
from imagebus.verification import (
    PERCEPTUAL_METRIC,
    PIXEL_METRIC,
    DeterminismClass,
    compare,
    ssim,
)
from imagebus.worker.engine import BatchItem, DiffusionEngine
from imagebus.worker.tiny import build_tiny_pipeline

FLOAT32 = DeterminismClass("tiny", "cpu", "float32")
BFLOAT16 = DeterminismClass("tiny", "cpu", "bfloat16")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def smooth_image(seed: int, size: int = 64) -> np.ndarray:
    """A picture-like image: structure at several scales, not white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 8, size // 8, 3)).astype(np.float64)
    image = np.kron(coarse, np.ones((8, 8, 1)))
    image += rng.normal(0, 40, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def test_identical_images_match_in_and_across_classes() -> None:
    image = png(smooth_image(1))
    same = compare(image, image, FLOAT32, FLOAT32)
    assert same.matches and same.metric == PIXEL_METRIC
    assert same.max_difference == 0 and same.mean_difference == 0.0
    across = compare(image, image, FLOAT32, BFLOAT16)
    assert across.matches and across.metric == PERCEPTUAL_METRIC and across.ssim == 1.0


def test_rounding_differences_match_within_a_class() -> None:
    pixels = smooth_image(2)
    rng = np.random.default_rng(0)
    # As measured between batch sizes: a few channels one step apart, the rest equal.
    flips = rng.random(pixels.shape) < 0.05
    nudged = np.clip(pixels.astype(np.int16) + flips * rng.choice([-1, 1], pixels.shape), 0, 255)
    result = compare(png(pixels), png(nudged), FLOAT32, FLOAT32)
    assert result.matches, result.reason
    assert result.max_difference == 1


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param(np.zeros((64, 64, 3)), id="black"),
        pytest.param(np.full((64, 64, 3), 255), id="white"),
        pytest.param(np.full((64, 64, 3), 128), id="grey"),
        pytest.param(np.random.default_rng(5).integers(0, 256, (64, 64, 3)), id="noise"),
        pytest.param(smooth_image(99), id="another-image"),
    ],
)
@pytest.mark.parametrize("rerun_class", [FLOAT32, BFLOAT16], ids=["same-class", "across"])
def test_forgeries_do_not_match(forged: np.ndarray, rerun_class: DeterminismClass) -> None:
    result = compare(png(forged), png(smooth_image(3)), FLOAT32, rerun_class)
    assert not result.matches, result.reason
    assert result.bad_input is None


def test_across_classes_the_perceptual_score_decides() -> None:
    """A drift most pixels have (as bfloat16 against float32 gives) fails the pixel
    tolerance but keeps the structure: a match across classes only."""
    pixels = smooth_image(4)
    rng = np.random.default_rng(1)
    drifted = np.clip(pixels.astype(np.int16) + rng.integers(-1, 2, pixels.shape), 0, 255)
    same = compare(png(pixels), png(drifted), FLOAT32, FLOAT32)
    across = compare(png(pixels), png(drifted), FLOAT32, BFLOAT16)
    assert not same.matches and same.metric == PIXEL_METRIC
    assert across.matches and across.metric == PERCEPTUAL_METRIC, across.reason
    assert across.ssim is not None and across.ssim < 1.0


def test_bad_input_is_a_non_match_naming_the_bad_side() -> None:
    good = png(smooth_image(6))
    not_png = compare(b"GIF89a....", good, FLOAT32, FLOAT32)
    assert not not_png.matches and not_png.bad_input == "original"
    assert "not a PNG" in not_png.reason
    truncated = compare(good, good[: len(good) // 2], FLOAT32, BFLOAT16)
    assert not truncated.matches and truncated.bad_input == "rerun"
    assert "truncated" in truncated.reason
    both = compare(b"", b"\x89PNG\r\n\x1a\n", FLOAT32, FLOAT32)
    assert both.bad_input == "both" and both.ssim is None
    sizes = compare(png(smooth_image(6, 64)), png(smooth_image(6, 32)), FLOAT32, FLOAT32)
    assert not sizes.matches and sizes.bad_input is None
    assert "sizes differ: 64x64 against 32x32" in sizes.reason


def test_an_oversized_png_is_refused_before_decoding() -> None:
    big = png(np.zeros((300, 300, 3)))
    result = compare(big, big, FLOAT32, FLOAT32, max_pixels=256 * 256)
    assert not result.matches and result.bad_input == "both"
    assert "larger than" in result.reason


def test_a_non_bytes_argument_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        compare("not bytes", png(smooth_image(7)), FLOAT32, FLOAT32)  # type: ignore[arg-type]


def test_ssim_is_one_for_equal_images_and_low_for_unrelated_ones() -> None:
    first, second = smooth_image(8), smooth_image(9)
    assert ssim(first, first) == pytest.approx(1.0)
    assert ssim(first, second) < 0.5
    tiny = smooth_image(8, 8)[:4, :4]  # smaller than a 7x7 window
    assert ssim(tiny, tiny) == pytest.approx(1.0)


# The real tiny model, as bench/verification.py measures it: 64x64, 20 steps, guidance 7.5.
TINY_PROMPT, OTHER_PROMPT = "a lighthouse at dusk", "a red bicycle in the rain"


@pytest.fixture(scope="module")
def tiny_images(tiny_engine: DiffusionEngine) -> Iterator[dict[str, bytes]]:
    import torch

    threads = torch.get_num_threads()
    # One thread: on a busy machine a second one spins, several times the CPU for nothing.
    torch.set_num_threads(1)
    try:
        bfloat16 = DiffusionEngine("tiny", build_tiny_pipeline().to(torch.bfloat16), "cpu")
        asked = ImageParams(TINY_PROMPT, 64, 64, 20, 7.5, model="tiny")
        other = ImageParams(OTHER_PROMPT, 64, 64, 20, 7.5, model="tiny")
        alone = tiny_engine.generate(asked, 1).png
        batch = tiny_engine.generate_batch([BatchItem(other, 2), BatchItem(asked, 1)])
        pngs = [r.png for r in batch if not isinstance(r, BaseException)]
        yield {
            "alone": alone,
            "in a batch": pngs[1],
            "another seed and prompt": pngs[0],
            "another prompt": tiny_engine.generate(other, 1).png,
            "bfloat16": bfloat16.generate(asked, 1).png,
        }
    finally:
        torch.set_num_threads(threads)


def test_tiny_batched_and_unbatched_images_of_one_seed_match(
    tiny_images: dict[str, bytes],
) -> None:
    result = compare(tiny_images["alone"], tiny_images["in a batch"], FLOAT32, FLOAT32)
    assert result.matches, result.reason
    assert result.max_difference is not None and result.max_difference <= 1


def test_tiny_bfloat16_rerun_matches_across_classes_by_ssim_only(
    tiny_images: dict[str, bytes],
) -> None:
    across = compare(tiny_images["alone"], tiny_images["bfloat16"], FLOAT32, BFLOAT16)
    assert across.matches and across.metric == PERCEPTUAL_METRIC, across.reason
    # The same pixels judged as one class are too far apart: the class decides the metric.
    as_one_class = compare(tiny_images["alone"], tiny_images["bfloat16"], FLOAT32, FLOAT32)
    assert not as_one_class.matches and as_one_class.metric == PIXEL_METRIC


@pytest.mark.parametrize("forgery", ["another seed and prompt", "another prompt"])
@pytest.mark.parametrize("rerun", ["alone", "bfloat16"])
def test_tiny_forgeries_do_not_match(
    tiny_images: dict[str, bytes], forgery: str, rerun: str
) -> None:
    rerun_class = FLOAT32 if rerun == "alone" else BFLOAT16
    result = compare(tiny_images[forgery], tiny_images[rerun], FLOAT32, rerun_class)
    assert not result.matches, result.reason


def test_an_unknown_class_is_compared_perceptually_even_against_itself() -> None:
    unknown = DeterminismClass("tiny", "unknown", "unknown")
    empty_dtype = DeterminismClass("tiny", "cpu", "")
    image = png(smooth_image(10))
    assert compare(image, image, unknown, unknown).metric == PERCEPTUAL_METRIC
    assert compare(image, image, empty_dtype, empty_dtype).metric == PERCEPTUAL_METRIC
    assert compare(image, image, FLOAT32, FLOAT32).metric == PIXEL_METRIC


def test_a_picture_hidden_under_transparency_is_the_blank_image_it_shows() -> None:
    pixels = smooth_image(11)
    hidden = np.dstack([pixels, np.zeros(pixels.shape[:2], dtype=np.uint8)])  # alpha 0
    opaque = np.dstack([pixels, np.full(pixels.shape[:2], 255, dtype=np.uint8)])
    assert not compare(png(hidden), png(pixels), FLOAT32, FLOAT32).matches
    assert compare(png(opaque), png(pixels), FLOAT32, FLOAT32).matches
