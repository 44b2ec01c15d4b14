"""Full round trips through a real orchestrator, real tiny workers and real NATS/Postgres."""

from __future__ import annotations

import io
import time

import asyncpg
import pytest
from PIL import Image

from imagebus.requester import ImageBusClient, ImageBusError, Progress

from .conftest import Stack
from .helpers import SETTLE_S


async def test_several_images_round_trip_over_three_workers(stack: Stack) -> None:
    await stack.start_orchestrator()
    workers = [await stack.start_worker() for _ in range(3)]
    async with ImageBusClient(stack.nats_url) as client:
        images = await client.generate("a lighthouse at dusk", n=6, width=64, height=64, steps=3)
    assert [image.index for image in images] == list(range(6))
    for image in images:
        with Image.open(io.BytesIO(image.png)) as png:
            assert png.format == "PNG"
            assert png.size == (64, 64)
        assert image.worker_id in {w.id for w in workers}
    # Every image was recorded in Postgres with its worker, seed and outcome.
    assert await stack.orchestrators[0].settle(SETTLE_S)
    conn = await asyncpg.connect(stack.database_url)
    try:
        rows = await conn.fetch("SELECT * FROM tasks ORDER BY task_index")
        job = await conn.fetchrow("SELECT * FROM jobs")
    finally:
        await conn.close()
    assert [r["state"] for r in rows] == ["done"] * 6
    assert [r["seed"] for r in rows] == [image.seed for image in images]
    assert [r["worker_id"] for r in rows] == [image.worker_id for image in images]
    assert all(r["finished_at"] >= r["assigned_at"] for r in rows)
    assert job["state"] == "done" and job["prompt"] == "a lighthouse at dusk" and job["n"] == 6


async def test_progress_events_arrive_in_order(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    seen: list[Progress] = []
    async with ImageBusClient(stack.nats_url) as client:
        images = await client.generate(
            "progress", n=1, width=64, height=64, steps=7, on_progress=seen.append
        )
    assert len(images) == 1
    assert [p.step for p in seen] == list(range(1, 8))
    assert all(p.steps == 7 for p in seen)


async def test_same_seed_gives_the_same_image_bytes(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    await stack.start_worker()
    async with ImageBusClient(stack.nats_url) as client:
        first = await client.generate("seeded", width=64, height=64, steps=3, seed=1234)
        again = await client.generate("seeded", width=64, height=64, steps=3, seed=1234)
        other = await client.generate("seeded", width=64, height=64, steps=3, seed=1235)
    assert first[0].seed == again[0].seed == 1234
    assert first[0].png == again[0].png
    assert first[0].png != other[0].png


async def test_a_result_no_longer_waited_for_is_confirmed_so_the_worker_moves_on(
    stack: Stack,
) -> None:
    await stack.start_orchestrator()
    worker = await stack.start_worker(slots=1)
    async with ImageBusClient(stack.nats_url) as client:
        given_up = await client.submit("slow", width=128, height=128, steps=30)
        with pytest.raises(ImageBusError, match="timed out"):
            await given_up.wait(0.2)  # the requester stops waiting; the client stays open
        # Unconfirmed, the worker would re-send that result for 30 s, its only slot held.
        started = time.monotonic()
        images = await client.generate("next", width=64, height=64, steps=2, timeout=60)
        waited = time.monotonic() - started
    assert images[0].worker_id == worker.id
    assert waited < 20, f"the worker was held for {waited:.1f}s by an unconfirmed result"
