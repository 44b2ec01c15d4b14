"""An unmodified prototype requester (JSON, imageInbox header, text progress) works."""

from __future__ import annotations

import asyncio
import io
import json
import uuid

from PIL import Image

from .conftest import Stack
from .helpers import collect, raw_client


async def test_prototype_request_gets_prototype_result(stack: Stack) -> None:
    await stack.start_orchestrator()
    worker = await stack.start_worker()
    nc = await raw_client(stack.nats_url)
    try:
        inbox = nc.new_inbox()
        results, result_queue = await collect(nc, inbox)
        assigned, assigned_queue = await collect(nc, f"{inbox}.worker-assigned")
        progress, _ = await collect(nc, f"{inbox}.worker-progress")
        payload = json.dumps({"prompt": "a lighthouse", "numSteps": 4, "height": 64, "width": 64})
        # As the prototype did: a plain publish whose reply is a random requester id.
        await nc.publish(
            "img-gen", payload.encode(), reply=str(uuid.uuid4()), headers={"imageInbox": inbox}
        )
        result = await asyncio.wait_for(result_queue.get(), 30)
        await asyncio.wait_for(assigned_queue.get(), 5)
        await nc.flush()
    finally:
        await nc.close()

    assert result.headers["success"] == "true"
    assert result.headers["mimetype"] == "image/png"
    with Image.open(io.BytesIO(result.data)) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    assert assigned.messages[0].data.decode() == worker.id
    percentages = [float(m.data.decode()) for m in progress.messages]
    assert percentages == [25.0, 50.0, 75.0, 100.0]
    assert len(results.messages) == 1


async def test_prototype_request_with_bad_input_gets_prototype_failure(stack: Stack) -> None:
    await stack.start_orchestrator()
    nc = await raw_client(stack.nats_url)
    try:
        inbox = nc.new_inbox()
        _, result_queue = await collect(nc, inbox)
        payload = json.dumps({"prompt": "", "numSteps": 4, "height": 64, "width": 64})
        await nc.publish("img-gen", payload.encode(), headers={"imageInbox": inbox})
        result = await asyncio.wait_for(result_queue.get(), 10)
    finally:
        await nc.close()
    assert result.headers["success"] == "false"
    assert result.data.decode() == "prompt must not be empty"
