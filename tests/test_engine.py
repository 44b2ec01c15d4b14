"""The diffusion engine and the built-in tiny model, on the real diffusers code path."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from imagebus.protocol import ImageParams
from imagebus.worker.engine import (
    BatchItem,
    DiffusionEngine,
    GenerationCancelled,
    RenderedImage,
    load_engine,
)
from imagebus.worker.identity import default_worker_id
from imagebus.worker.tiny import build_tiny_pipeline

PARAMS = ImageParams("a lighthouse at dusk", 64, 64, 3, 7.5)


def test_tiny_model_is_a_real_stable_diffusion_pipeline_built_identically() -> None:
    first, second = build_tiny_pipeline(), build_tiny_pipeline()
    assert type(first).__name__ == "StableDiffusionPipeline"
    assert {type(first.unet).__name__, type(first.vae).__name__} == {
        "UNet2DConditionModel",
        "AutoencoderKL",
    }
    for (name, a), (_, b) in zip(
        first.unet.state_dict().items(), second.unet.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_generate_reports_every_step_and_returns_a_png(tiny_engine: DiffusionEngine) -> None:
    steps: list[tuple[int, int]] = []
    image = tiny_engine.generate(
        PARAMS, seed=3, on_step=lambda done, total: steps.append((done, total))
    )
    assert steps == [(1, 3), (2, 3), (3, 3)]
    with Image.open(io.BytesIO(image.png)) as png:
        assert (png.format, png.size) == ("PNG", (64, 64))


def test_concurrent_jobs_give_exactly_the_images_they_give_alone(
    tiny_engine: DiffusionEngine,
) -> None:
    # Shared schedulers or tokenizers made about 1 round in 10 differ (or crash) here.
    seeds = [11, 12, 13, 14]
    alone = [tiny_engine.generate(PARAMS, seed).png for seed in seeds]
    assert len(set(alone)) == 4
    with ThreadPoolExecutor(4) as pool:
        for _ in range(10):
            together = list(pool.map(lambda seed: tiny_engine.generate(PARAMS, seed).png, seeds))
            assert together == alone


def test_negative_prompt_changes_the_image(tiny_engine: DiffusionEngine) -> None:
    plain = tiny_engine.generate(PARAMS, seed=5).png
    negative = ImageParams(PARAMS.prompt, 64, 64, 3, 7.5, negative_prompt="fog")
    assert tiny_engine.generate(negative, seed=5).png != plain


def test_default_worker_id_is_stable_and_a_subject_token() -> None:
    assert default_worker_id("cpu") == default_worker_id("cpu")
    assert default_worker_id("cpu") != default_worker_id("cuda:0")
    assert all(c.isalnum() or c in "-_" for c in default_worker_id("cuda:0"))


# Batching may not visibly change an image. On CPU the batched matrix products round
# a little differently: measured here, at most 1 of 255 on any pixel channel (and
# often no difference at all). The test allows 2, to hold on other CPUs' kernels.
CPU_BATCH_TOLERANCE = 2


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_the_same_seed_gives_the_same_image_alone_or_in_a_batch(
    tiny_engine: DiffusionEngine,
) -> None:
    items = [
        BatchItem(
            ImageParams(f"prompt {i}", 64, 64, 3, 7.5, negative_prompt="fog" if i % 2 else None),
            seed=40 + i,
        )
        for i in range(6)
    ]
    alone = [tiny_engine.generate(item.params, item.seed, should_stop=None) for item in items]
    steps: list[int] = []
    batched = tiny_engine.generate_batch(items, on_step=lambda done, total: steps.append(done))
    assert steps == [1, 2, 3]  # one callback per step for the whole batch
    for one, other in zip(alone, batched, strict=True):
        assert isinstance(other, RenderedImage)
        difference = np.abs(_pixels(one.png) - _pixels(other.png)).max()
        assert difference <= CPU_BATCH_TOLERANCE
    # ...and the images really are different images, by seed and prompt.
    assert len({image.png for image in alone}) == len(items)


def test_a_batch_refuses_images_that_cannot_share_a_call(tiny_engine: DiffusionEngine) -> None:
    small, large = ImageParams("a", 64, 64, 2, 7.5), ImageParams("a", 128, 64, 2, 7.5)
    with pytest.raises(ValueError, match="share model, size, steps and guidance"):
        tiny_engine.generate_batch([BatchItem(small, 1), BatchItem(large, 2)])


def test_a_stopped_image_comes_back_cancelled_and_the_rest_are_made(
    tiny_engine: DiffusionEngine,
) -> None:
    params = ImageParams("a", 64, 64, 2, 7.5)
    results = tiny_engine.generate_batch(
        [BatchItem(params, 1, lambda: True), BatchItem(params, 2, lambda: False)]
    )
    assert isinstance(results[0], GenerationCancelled)
    assert isinstance(results[1], RenderedImage)
    with pytest.raises(GenerationCancelled):
        tiny_engine.generate_batch([BatchItem(params, 1, lambda: True)])


def test_channels_last_keeps_the_images_within_the_cpu_tolerance(
    tiny_engine: DiffusionEngine,
) -> None:
    # torch.compile (--compile) is the other opt-in; it takes ~40 s to compile here,
    # so it is measured in BENCHMARKS.md's notes rather than tested on every run.
    nhwc = load_engine("tiny", "cpu", channels_last=True)
    for seed in (1, 2, 3):
        plain = tiny_engine.generate(PARAMS, seed)
        other = nhwc.generate(PARAMS, seed)
        assert np.abs(_pixels(plain.png) - _pixels(other.png)).max() <= CPU_BATCH_TOLERANCE
