"""The diffusion engine and the built-in tiny model, on the real diffusers code path."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from imagebus.protocol import ImageParams
from imagebus.worker.engine import DiffusionEngine
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
