"""Images larger than the server's max_payload arrive intact."""

from __future__ import annotations

import asyncio
import json

from imagebus.protocol import ImageParams
from imagebus.requester import ImageBusClient
from imagebus.worker.engine import DiffusionEngine

from .conftest import Stack
from .helpers import collect, raw_client


async def test_a_1024_png_above_max_payload_arrives_byte_exact(
    stack: Stack, tiny_engine: DiffusionEngine
) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    async with ImageBusClient(stack.nats_url) as client:
        assert client.nc is not None
        max_payload = client.nc.max_payload
        (image,) = await client.generate(
            "big", width=1024, height=1024, steps=2, seed=99, timeout=120
        )
    params = ImageParams("big", 1024, 1024, 2, 7.5)
    expected = await asyncio.to_thread(tiny_engine.generate, params, 99)
    assert len(image.png) > max_payload  # really above the 1 MiB limit
    assert image.png == expected.png
    assert (image.width, image.height) == (1024, 1024)


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
