"""An orchestrator that dies hands its jobs over quickly, and no image is made twice."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import asyncpg
import pytest

from imagebus.requester import ImageBusClient

from .conftest import Stack
from .helpers import wait_for_orchestrator

pytestmark = [pytest.mark.faults, pytest.mark.slow]

JOBS, IMAGES = 4, 4


async def _spawn_orchestrator(stack: Stack) -> asyncio.subprocess.Process:
    # The default ack wait: the hand-over time measured is the one users get.
    env = {**os.environ, "IMAGEBUS_LOG_LEVEL": "warning"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagebus", "orchestrator",
        "--nats-url", stack.nats_url, "--database-url", stack.database_url,
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def test_a_killed_orchestrator_hands_over_its_jobs_and_no_image_is_made_twice(
    stack: Stack,
) -> None:
    workers = [await stack.start_worker() for _ in range(3)]
    doomed = await _spawn_orchestrator(stack)
    await wait_for_orchestrator(stack.nats_url)
    try:
        async with ImageBusClient(stack.nats_url) as client:
            jobs = [
                await client.submit(f"handoff {i}", width=64, height=64, steps=20, n=IMAGES)
                for i in range(JOBS)
            ]
            # Some images made, others running or waiting for a slot: all on `doomed`.
            while sum(len(job.results) for job in jobs) < 3:
                await asyncio.sleep(0.02)
            await stack.start_orchestrator()  # the survivor, whose pulls stand from now
            doomed.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await doomed.wait()
            answered_at_kill = sum(len(job.results) for job in jobs)
            results = await asyncio.gather(*(job.wait(55) for job in jobs))
            handover_s = time.monotonic() - killed_at
    finally:
        if doomed.returncode is None:
            doomed.send_signal(signal.SIGKILL)
            await doomed.wait()
    assert all(len(images) == IMAGES for images in results)
    survivor = stack.orchestrators[0]
    assert await survivor.settle(10)
    made = sum(worker.tasks_done for worker in workers)
    conn = await asyncpg.connect(stack.database_url)
    try:
        states = await conn.fetch("SELECT state, count(*) AS n FROM tasks GROUP BY state")
    finally:
        await conn.close()
    print(
        f"\norchestrator killed with {answered_at_kill}/{JOBS * IMAGES} images answered; "
        f"all answered {handover_s:.1f} s after the kill; {made} images made for "
        f"{JOBS * IMAGES} asked"
    )
    assert {row["state"]: row["n"] for row in states} == {"done": JOBS * IMAGES}
    assert made == JOBS * IMAGES, f"{made - JOBS * IMAGES} images made twice"
