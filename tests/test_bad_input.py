"""Every kind of bad input gets a clear error; the orchestrator keeps serving."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgpack
import pytest

from imagebus.protocol import JobRejected, decode, parse_pub_ack
from imagebus.requester import ImageBusClient, ImageBusError

from .conftest import Stack
from .helpers import collect, raw_client

VALID = {"prompt": "ok", "width": 64, "height": 64, "steps": 2}

# (description, payload as sent, expected field or None, words the error must contain)
JSON_CASES: list[tuple[str, bytes, str | None, str]] = [
    ("non-UTF-8 bytes", b"\xff\xfe\x00prompt", None, "not UTF-8"),
    ("malformed JSON", b'{"prompt": "x",', None, "not valid JSON"),
    ("not an object", b'["prompt"]', None, "must be an object"),
    ("missing prompt", json.dumps({"width": 64}).encode(), "prompt", "required"),
]


def _native(**changes: Any) -> dict[str, Any]:
    body = {**VALID, **changes}
    return {k: v for k, v in body.items() if v is not ...}


NATIVE_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("missing prompt", _native(prompt=...), "prompt", "required"),
    ("empty prompt", _native(prompt="   "), "prompt", "must not be empty"),
    ("over-long prompt", _native(prompt="x" * 2001), "prompt", "limit is 2000"),
    ("prompt of wrong type", _native(prompt=42), "prompt", "must be a string"),
    ("width not a multiple of 8", _native(width=65), "width", "multiple of 8"),
    ("zero height", _native(height=0), "height", "between 8 and"),
    ("negative width", _native(width=-64), "width", "between 8 and"),
    ("width above the maximum", _native(width=4096), "width", "between 8 and 2048"),
    ("width as text", _native(width="64"), "width", "must be an integer"),
    ("zero steps", _native(steps=0), "steps", "between 1 and"),
    ("absurd steps", _native(steps=100000), "steps", "between 1 and 150"),
    ("steps as boolean", _native(steps=True), "steps", "must be an integer"),
    ("zero images", _native(n=0), "n", "between 1 and"),
    ("absurd image count", _native(n=100000), "n", "between 1 and 64"),
    ("negative seed", _native(seed=-1), "seed", "between 0 and"),
    ("guidance as text", _native(guidance="high"), "guidance", "must be a number"),
    ("unknown field", _native(colour="red"), "colour", "unknown field"),
]


async def _reject_native(nc: Any, payload: bytes) -> JobRejected:
    inbox = nc.new_inbox()
    _, queue = await collect(nc, f"{inbox}.rejected")
    headers = {"imageInbox": inbox, "Content-Type": "application/msgpack"}
    await nc.publish("img-gen", payload, headers=headers)
    return decode(JobRejected, (await asyncio.wait_for(queue.get(), 10)).data)


async def _reject_json(nc: Any, payload: bytes) -> str:
    inbox = nc.new_inbox()
    _, queue = await collect(nc, inbox)
    await nc.publish("img-gen", payload, headers={"imageInbox": inbox})
    msg = await asyncio.wait_for(queue.get(), 10)
    assert msg.headers["success"] == "false"
    return msg.data.decode()


async def test_each_bad_input_is_rejected_and_service_goes_on(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    nc = await raw_client(stack.nats_url)
    try:
        for description, payload, _field, words in JSON_CASES:
            error = await _reject_json(nc, payload)
            assert words in error, description
        for description, body, field, words in NATIVE_CASES:
            rejection = await _reject_native(nc, msgpack.packb(body))
            assert rejection.field == field, description
            assert words in rejection.error, description
            assert rejection.code == "invalid_request"
        rejection = await _reject_native(nc, b"\xc1\xc1 not msgpack")
        assert "not valid msgpack" in rejection.error
        # Over the size limit, the request stream itself refuses it at publish.
        oversized = msgpack.packb({**VALID, "negative_prompt": "y" * 70_000})
        headers = {"imageInbox": nc.new_inbox(), "Content-Type": "application/msgpack"}
        answer = await nc.request("img-gen", oversized, timeout=10, headers=headers)
        assert "exceeds maximum" in (parse_pub_ack(answer.data, answer.headers).error or "")

        # Requests with no usable inbox cannot be answered: they are dropped.
        await nc.publish("img-gen", json.dumps(VALID).encode())
        await nc.publish("img-gen", json.dumps(VALID).encode(), headers={"imageInbox": "img-gen"})
        await nc.flush()
    finally:
        await nc.close()

    # After all of that, the same orchestrator still serves a good request.
    async with ImageBusClient(stack.nats_url) as client:
        images = await client.generate("still alive", width=64, height=64, steps=2, timeout=30)
    assert len(images) == 1


async def test_client_raises_a_named_error_for_a_rejected_request(stack: Stack) -> None:
    await stack.start_orchestrator()
    async with ImageBusClient(stack.nats_url) as client:
        with pytest.raises(ImageBusError) as rejected:
            await client.generate("bad size", width=100, height=64, timeout=10)
    assert rejected.value.field == "width"
    assert rejected.value.code == "invalid_request"


async def test_client_fails_fast_when_no_orchestrator_runs(nats_url: str) -> None:
    async with ImageBusClient(nats_url) as client:
        with pytest.raises(ImageBusError) as failed:
            await client.generate("anyone?", width=64, height=64, timeout=10)
    assert failed.value.code == "no_orchestrator"
