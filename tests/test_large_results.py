"""Images larger than the server's max_payload arrive intact."""

from __future__ import annotations

import asyncio
import contextlib
import json

from imagebus.protocol import ImageParams
from imagebus.requester import ImageBusClient, ImageBusError
from imagebus.worker.engine import DiffusionEngine

from .conftest import Stack
from .helpers import collect, eventually, raw_client


async def test_a_1024_png_above_max_payload_arrives_byte_exact(
    stack: Stack, tiny_engine: DiffusionEngine
) -> None:
    await stack.start_orchestrator()
    worker = await stack.start_worker()
    async with ImageBusClient(stack.nats_url) as client:
        assert client.nc is not None
        max_payload = client.nc.max_payload
        job = await client.submit("big", width=1024, height=1024, steps=2, seed=99)
        (image,) = await job.wait(120)
        # Its copy in the results stream is whole too (kept as several chunks)...
        kept = await _fetch_when_kept(client, job.job_id)
    # ...and the worker heard JetStream's answer for every chunk of it.
    assert await eventually(lambda: worker.status().copies_unanswered == 0, timeout=5.0)
    params = ImageParams("big", 1024, 1024, 2, 7.5)
    expected = await asyncio.to_thread(tiny_engine.generate, params, 99)
    assert len(image.png) > max_payload  # really above the 1 MiB limit
    assert image.png == expected.png
    assert (image.width, image.height) == (1024, 1024)
    assert kept == {0: expected.png}


async def _fetch_when_kept(client: ImageBusClient, job_id: str) -> dict[int, bytes]:
    # The worker stores the copy while delivering: it may land just after the image.
    for _ in range(100):
        with contextlib.suppress(ImageBusError):
            return await client.fetch(job_id)
        await asyncio.sleep(0.1)
    return await client.fetch(job_id)


async def test_prototype_client_gets_a_clear_failure_for_an_oversized_image(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    nc = await raw_client(stack.nats_url)
    try:
        inbox = nc.new_inbox()
        _, queue = await collect(nc, inbox)
        body = {"prompt": "big", "numSteps": 1, "width": 1024, "height": 1024}
        await nc.publish("img-gen", json.dumps(body).encode(), headers={"imageInbox": inbox})
        result = await asyncio.wait_for(queue.get(), 120)
    finally:
        await nc.close()
    assert result.headers["success"] == "false"
    assert "exceeds the bus's max_payload" in result.data.decode()
