"""The request stream's limits: a request over the size limit is refused at publish, a
full queue refuses new requests clearly and loses none it accepted, and a stream made
by an older version without limits is brought to them."""

from __future__ import annotations

import asyncio

import pytest
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from imagebus.protocol import Limits
from imagebus.protocol import subjects as s
from imagebus.requester import ImageBusClient, ImageBusError
from imagebus.settings import OrchestratorSettings

from .conftest import Stack
from .helpers import raw_client

pytestmark = pytest.mark.faults


async def test_an_oversize_request_is_refused_at_publish(stack: Stack) -> None:
    await stack.start_orchestrator(limits=Limits(max_payload_bytes=4096))
    async with ImageBusClient(stack.nats_url) as client:
        with pytest.raises(ImageBusError) as refused:
            await client.submit("x" * 20_000, width=64, height=64)
        # Within the limit, the same client is served as ever.
        await stack.start_worker()
        images = await (await client.submit("small", width=64, height=64, steps=2)).wait(60)
    print(f"\noversize request: {refused.value.code}: {refused.value}")
    assert refused.value.code == "invalid_request"
    assert "request size limit" in str(refused.value) and "20" in str(refused.value)
    assert len(images) == 1


async def test_a_full_queue_refuses_clearly_and_loses_nothing_accepted(stack: Stack) -> None:
    orchestrator = await stack.start_orchestrator(intake_max_msgs=5)
    await orchestrator.stop(grace_s=1)  # the stream stays: requests wait in it
    stack.orchestrators.clear()
    async with ImageBusClient(stack.nats_url) as client:
        jobs, refusals = [], []
        for i in range(8):
            try:
                jobs.append(await client.submit(f"queued {i}", width=64, height=64, steps=2))
            except ImageBusError as exc:
                refusals.append(exc)
        await stack.start_orchestrator(intake_max_msgs=5)
        await stack.start_worker()
        results = await asyncio.gather(*(job.wait(60) for job in jobs))
    print(
        f"\nqueue of 5: {len(jobs)} accepted, {len(refusals)} refused "
        f"({refusals[0].code}: {refusals[0]}), {sum(map(len, results))} accepted served"
        if refusals
        else f"\nqueue of 5: {len(jobs)} accepted, none refused"
    )
    assert len(jobs) == 5 and len(refusals) == 3
    assert {r.code for r in refusals} == {"queue_full"}
    assert "the pool's queue is full" in str(refusals[0])
    assert [len(images) for images in results] == [1] * 5


async def test_a_stream_from_an_older_version_gets_the_limits(stack: Stack) -> None:
    nc = await raw_client(stack.nats_url)
    try:
        js = nc.jetstream()
        # As older versions created it: no size, count or message-size limit.
        await js.add_stream(
            StreamConfig(
                name=s.INTAKE_STREAM,
                subjects=[s.REQUEST_SUBJECT],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                max_age=86400.0,
                duplicate_window=120.0,
            )
        )
        await stack.start_orchestrator(intake_max_bytes=1 << 20, intake_max_msgs=1000)
        config = (await js.stream_info(s.INTAKE_STREAM)).config
    finally:
        await nc.close()
    print(
        f"\nolder stream updated: max_msg_size {config.max_msg_size}, max_bytes "
        f"{config.max_bytes}, max_msgs {config.max_msgs}, discard {config.discard}"
    )
    assert config.max_bytes == 1 << 20 and config.max_msgs == 1000
    assert config.max_msg_size is not None and 64 * 1024 <= config.max_msg_size < 80 * 1024
    assert config.discard == DiscardPolicy.NEW


def test_intake_limits_are_read_from_the_environment() -> None:
    env = {
        "IMAGEBUS_DATABASE_URL": "postgresql://x/y",
        "IMAGEBUS_INTAKE_MAX_BYTES": "1048576",
        "IMAGEBUS_INTAKE_MAX_MSGS": "50",
    }
    settings = OrchestratorSettings.from_env(env)
    assert (settings.intake_max_bytes, settings.intake_max_msgs) == (1 << 20, 50)
    defaults = OrchestratorSettings.from_env({"IMAGEBUS_DATABASE_URL": "postgresql://x/y"})
    assert (defaults.intake_max_bytes, defaults.intake_max_msgs) == (1 << 30, 100_000)
