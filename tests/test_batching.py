"""Dynamic batching in a worker, through the real bus: fewer pipeline calls, same images."""

from __future__ import annotations

import asyncio
import io
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from imagebus.protocol import ImageParams
from imagebus.requester import ImageBusClient
from imagebus.worker.batching import Batcher, Queued, _StepRelay
from imagebus.worker.engine import BatchItem, DiffusionEngine, batch_key

from .conftest import Stack
from .helpers import eventually
from .test_engine import CPU_BATCH_TOLERANCE


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


async def test_a_worker_batches_compatible_images_and_each_keeps_its_seed_and_progress(
    stack: Stack, tiny_engine: DiffusionEngine
) -> None:
    await stack.start_orchestrator()
    # A long window, so that the batch fills whatever the machine's load.
    worker = await stack.start_worker(slots=4, max_batch=4, batch_window_ms=500)
    steps_seen: dict[int, list[int]] = defaultdict(list)
    prompts = [f"a lighthouse, variation {i}" for i in range(8)]
    async with ImageBusClient(stack.nats_url) as client:
        job = await client.submit(
            prompts, width=64, height=64, steps=3, seed=100,
            on_progress=lambda p: steps_seen[p.index].append(p.step),
        )  # fmt: skip
        images = await job.wait(120)
    assert await eventually(lambda: worker.status().tasks_done == 8), worker.status()
    status = worker.status()
    assert status.batches < 8  # some images shared a pipeline call
    assert status.mean_batch > 1
    for image in images:
        assert image.seed == 100 + image.index
        assert steps_seen[image.index] == [1, 2, 3]  # per-image progress, in order
        params = ImageParams(prompts[image.index], 64, 64, 3, 7.5)
        alone = await asyncio.to_thread(tiny_engine.generate, params, image.seed)
        assert np.abs(_pixels(alone.png) - _pixels(image.png)).max() <= CPU_BATCH_TOLERANCE


async def test_incompatible_images_are_never_batched_together(stack: Stack) -> None:
    await stack.start_orchestrator()
    worker = await stack.start_worker(slots=4, max_batch=4, batch_window_ms=200)
    async with ImageBusClient(stack.nats_url) as client:
        jobs = [
            await client.submit("a", n=2, width=64, height=64, steps=2),
            await client.submit("b", n=2, width=128, height=64, steps=2),
        ]
        small, wide = [await job.wait(120) for job in jobs]
    assert {(i.width, i.height) for i in small} == {(64, 64)}
    assert {(i.width, i.height) for i in wide} == {(128, 64)}
    assert await eventually(lambda: worker.status().tasks_done == 4), worker.status()
    assert worker.status().batches >= 2


async def test_progress_never_makes_the_model_thread_wait_for_the_event_loop() -> None:
    loop = asyncio.get_running_loop()
    seen: list[tuple[int, int]] = []

    async def on_step(step: int, steps: int) -> None:
        seen.append((step, steps))

    params = ImageParams("p", 64, 64, 3, 7.5)
    waiting = Queued(BatchItem(params, 1, None), batch_key(params), on_step, loop.create_future())
    relay = _StepRelay([waiting], loop)
    model_thread = threading.Thread(target=lambda: [relay.on_step(i, 3) for i in (1, 2, 3)])
    model_thread.start()
    # The event loop is held up right here, in this synchronous join: the steps must
    # be queued without it (the old relay blocked the thread until the loop sent each).
    model_thread.join(timeout=3.0)
    assert not model_thread.is_alive()
    assert seen == []
    await relay.sent()
    assert seen == [(1, 3), (2, 3), (3, 3)]


async def test_a_batch_frees_its_slots_once_rendered_before_its_pngs_are_encoded(
    tiny_engine: DiffusionEngine,
) -> None:
    events: list[str] = []
    queued: list[Queued] = []

    async def batch_rendered() -> None:
        # What the worker does here is announce the freed slots: the images are made
        # but none is encoded yet, so new work travels while they are.
        events.append(f"batch rendered, results ready: {sum(q.result.done() for q in queued)}")

    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(
            tiny_engine, executor, max_batch=2, window_s=0.5, on_rendered=batch_rendered
        )
        batcher.start()
        try:
            params = ImageParams("slots", 64, 64, 2, 7.5)
            for seed in (1, 2):
                queued.append(
                    batcher.submit(
                        params, seed, on_rendered=lambda s=seed: events.append(f"rendered {s}")
                    )
                )
            images = [await batcher.result(q) for q in queued]
        finally:
            await batcher.stop()
    assert events == ["rendered 1", "rendered 2", "batch rendered, results ready: 0"]
    assert all(image.png.startswith(b"\x89PNG") for image in images)
    assert batcher.batches == 1
