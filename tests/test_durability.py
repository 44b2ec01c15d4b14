"""Durable intake and high availability: requests survive orchestrator loss."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys

import pytest
from PIL import Image

from imagebus.orchestrator.intake import Intake
from imagebus.protocol import subjects as s
from imagebus.requester import ImageBusClient

from .conftest import Stack
from .helpers import SETTLE_S, raw_client, wait_for_orchestrator

pytestmark = pytest.mark.faults


async def test_request_published_while_no_orchestrator_runs_is_served_later(stack: Stack) -> None:
    first = await stack.start_orchestrator()  # sets up the request stream
    await first.stop()
    stack.orchestrators.remove(first)
    async with ImageBusClient(stack.nats_url) as client:
        job = await client.submit("patience", width=64, height=64, steps=2)
        await asyncio.sleep(1.0)
        assert not job.done
        await stack.start_worker()
        await stack.start_orchestrator()
        images = await job.wait(30)
    assert len(images) == 1


async def test_an_orchestrator_answers_pings_only_once_it_takes_requests(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pong is the readiness signal (`imagebus up`'s ready line, scripts, tests): a
    request submitted on it must be stored, not refused for a missing request stream."""
    start_intake = Intake.start

    async def slow_start(intake: Intake) -> None:
        await asyncio.sleep(1.0)  # e.g. JetStream still loading its streams
        await start_intake(intake)

    monkeypatch.setattr(Intake, "start", slow_start)
    starting = asyncio.create_task(stack.start_orchestrator())
    try:
        await wait_for_orchestrator(stack.nats_url, timeout=30)
        nc = await raw_client(stack.nats_url)
        try:
            info = await nc.jetstream().stream_info(s.INTAKE_STREAM)
        finally:
            await nc.close()
        assert info.config.name == s.INTAKE_STREAM
    finally:
        await starting


async def test_an_orchestrator_stopped_just_after_it_started_stops(stack: Stack) -> None:
    """Its request puller could lose the stop's cancel (Python 3.11's wait_for, when the
    puller's wake-up landed in the same turn): the stop then waited forever."""
    for turns in range(8):  # the stop lands at each point of the puller's first steps
        orchestrator = await stack.start_orchestrator()
        stack.orchestrators.remove(orchestrator)
        for _ in range(turns):
            await asyncio.sleep(0)
        stopping = asyncio.create_task(orchestrator.stop(grace_s=1))
        done, _ = await asyncio.wait({stopping}, timeout=30)
        assert done, f"the stop {turns} turn(s) after the start hung"
        assert orchestrator.intake is not None
        assert not orchestrator.intake.pulling


async def _spawn_orchestrator(stack: Stack) -> asyncio.subprocess.Process:
    env = {**os.environ, "IMAGEBUS_INTAKE_ACK_WAIT": "2", "IMAGEBUS_LOG_LEVEL": "warning"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagebus", "orchestrator",
        "--nats-url", stack.nats_url, "--database-url", stack.database_url,
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def test_killing_the_orchestrator_mid_run_loses_nothing(stack: Stack) -> None:
    for _ in range(3):
        await stack.start_worker()
    orchestrator = await _spawn_orchestrator(stack)
    await wait_for_orchestrator(stack.nats_url)
    try:
        async with ImageBusClient(stack.nats_url) as client:
            jobs = [
                await client.submit(f"request {i}", width=64, height=64, steps=20)
                for i in range(20)
            ]
            while sum(job.done for job in jobs) < 3:
                await asyncio.sleep(0.05)
            orchestrator.send_signal(signal.SIGKILL)
            await orchestrator.wait()
            done_before_restart = sum(job.done for job in jobs)
            orchestrator = await _spawn_orchestrator(stack)
            results = await asyncio.gather(*(job.wait(120) for job in jobs))
    finally:
        if orchestrator.returncode is None:
            orchestrator.send_signal(signal.SIGTERM)
            await orchestrator.wait()
    assert done_before_restart < 20
    for (image,) in results:
        with Image.open(io.BytesIO(image.png)) as png:
            assert png.size == (64, 64)
    print(f"\norchestrator killed after {done_before_restart}/20 answered; all 20 answered")


async def test_two_orchestrators_never_double_book_or_double_deliver(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_orchestrator()
    workers = [await stack.start_worker() for _ in range(4)]
    async with ImageBusClient(stack.nats_url) as client:
        jobs = [
            await client.submit(f"load {i}", n=2, width=64, height=64, steps=3) for i in range(30)
        ]
        results = await asyncio.gather(*(job.wait(120) for job in jobs))
    assert [len(images) for images in results] == [2] * 30
    assert sum(job.duplicates for job in jobs) == 0
    assert all(w.status().peak_generating <= w.status().slots for w in workers)
    for orchestrator in stack.orchestrators:
        assert await orchestrator.settle(SETTLE_S)
    served = [o.intake.served for o in stack.orchestrators]  # type: ignore[union-attr]
    assert sum(served) == 30 and all(count > 0 for count in served), served
    assert sum(w.tasks_done for w in workers) == 60


async def test_a_stopping_orchestrator_hands_unfinished_jobs_to_another(stack: Stack) -> None:
    leaving = await stack.start_orchestrator()
    await stack.start_worker()
    started = asyncio.Event()
    async with ImageBusClient(stack.nats_url) as client:
        job = await client.submit(
            "hand over", n=3, width=128, height=128, steps=40, on_progress=lambda p: started.set()
        )
        await asyncio.wait_for(started.wait(), 30)
        await leaving.stop(grace_s=0.2)  # what SIGTERM does, with a short grace
        stack.orchestrators.remove(leaving)
        assert not job.done
        await stack.start_orchestrator()
        images = await job.wait(120)
    assert len(images) == 3


async def test_an_orchestrator_takes_no_more_requests_than_its_capacity(stack: Stack) -> None:
    small = await stack.start_orchestrator(max_concurrent_jobs=2)
    large = await stack.start_orchestrator()
    for _ in range(2):
        await stack.start_worker()
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            assert small.intake is not None
            peak = max(peak, small.intake.running)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        async with ImageBusClient(stack.nats_url) as client:
            jobs = [
                await client.submit(f"many {i}", width=64, height=64, steps=4) for i in range(16)
            ]
            results = await asyncio.gather(*(job.wait(120) for job in jobs))
    finally:
        watcher.cancel()
    assert [len(images) for images in results] == [1] * 16
    assert small.intake is not None and large.intake is not None
    assert 1 <= peak <= 2, peak
    # A requester holds its image before the orchestrator has acknowledged the request.
    assert await small.settle(SETTLE_S) and await large.settle(SETTLE_S)
    assert small.intake.served + large.intake.served == 16
    assert large.intake.served > small.intake.served


async def test_an_orchestrator_recreates_its_consumer_if_it_is_deleted(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    async with ImageBusClient(stack.nats_url) as client:
        assert client.nc is not None
        js = client.nc.jetstream()
        await js.delete_consumer(s.INTAKE_STREAM, s.INTAKE_CONSUMER)  # an operator's slip
        await asyncio.sleep(1.0)
        images = await (await client.submit("still served", width=64, height=64)).wait(30)
        assert len(images) == 1
        assert (await js.consumer_info(s.INTAKE_STREAM, s.INTAKE_CONSUMER)).name
