"""Recruitment: busy workers are passed over, blacklisted ones never get work."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from imagebus.requester import GenerationFailed, ImageBusClient

from .conftest import Stack
from .helpers import SETTLE_S


async def _task_rows(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch("SELECT * FROM tasks ORDER BY finished_at")
    finally:
        await conn.close()


async def test_busy_worker_is_passed_over(stack: Stack) -> None:
    orchestrator = await stack.start_orchestrator(queue_timeout_s=0.0)
    busy = await stack.start_worker("busy-worker")
    started = asyncio.Event()
    async with ImageBusClient(stack.nats_url) as client:
        long_job = await client.submit(
            "a long one", width=256, height=256, steps=60, on_progress=lambda p: started.set()
        )
        await asyncio.wait_for(started.wait(), 30)

        # The only worker is busy and the queue timeout is zero: the task fails
        # instead of being given to the busy worker.
        with pytest.raises(GenerationFailed) as failed:
            await client.generate("while busy", width=64, height=64, steps=2, timeout=30)
        assert failed.value.failures[0].code == "queue_timeout"

        free = await stack.start_worker("free-worker")
        images = await client.generate("while busy", width=64, height=64, steps=2, timeout=30)
        assert images[0].worker_id == free.id
        assert busy.stats()["running"] == 1  # still on the long job, never given a second

        long_images = await long_job.wait(60)
    assert long_images[0].worker_id == busy.id
    assert await orchestrator.settle(SETTLE_S)
    rows = await _task_rows(stack.database_url)
    assert sorted(r["worker_id"] or "" for r in rows) == ["", "busy-worker", "free-worker"]


async def test_more_images_than_workers_wait_for_free_slots(stack: Stack) -> None:
    await stack.start_orchestrator()
    workers = [await stack.start_worker() for _ in range(2)]
    async with ImageBusClient(stack.nats_url) as client:
        images = await client.generate("queue", n=7, width=64, height=64, steps=2, timeout=60)
    assert len(images) == 7
    assert {image.worker_id for image in images} == {w.id for w in workers}


async def test_blacklisted_worker_never_receives_a_job(stack: Stack) -> None:
    orchestrator = await stack.start_orchestrator()
    # `blacklisted-worker` is seeded into the blacklist by the first migration.
    shunned = await stack.start_worker("blacklisted-worker")
    trusted = await stack.start_worker("trusted-worker")
    async with ImageBusClient(stack.nats_url) as client:
        images = await client.generate("trust", n=6, width=64, height=64, steps=2, timeout=60)
    assert {image.worker_id for image in images} == {trusted.id}
    assert shunned.stats()["tasks_done"] == shunned.stats()["running"] == 0
    assert shunned.stats()["failures"] == 0
    assert await orchestrator.settle(SETTLE_S)
    assert {r["worker_id"] for r in await _task_rows(stack.database_url)} == {trusted.id}


async def test_only_blacklisted_workers_fail_after_max_attempts(stack: Stack) -> None:
    orchestrator = await stack.start_orchestrator(max_attempts=4)
    shunned = await stack.start_worker("blacklisted-worker")
    async with ImageBusClient(stack.nats_url) as client:
        with pytest.raises(GenerationFailed) as failed:
            await client.generate("nobody", width=64, height=64, steps=2, timeout=30)
    failure = failed.value.failures[0]
    assert failure.code == "no_worker"
    assert "after 4 attempts" in (failure.error or "")
    assert "4 blacklisted" in (failure.error or "")
    assert shunned.stats()["tasks_done"] == 0
    assert await orchestrator.settle(SETTLE_S)
    (row,) = await _task_rows(stack.database_url)
    assert (row["state"], row["recruit_attempts"], row["error_code"]) == ("failed", 4, "no_worker")


async def test_blacklisting_takes_effect_while_running(stack: Stack) -> None:
    orchestrator = await stack.start_orchestrator(max_attempts=3)
    await stack.start_worker("soon-distrusted")
    async with ImageBusClient(stack.nats_url) as client:
        assert len(await client.generate("ok", width=64, height=64, steps=2, timeout=30)) == 1
        conn = await asyncpg.connect(stack.database_url)
        try:
            await conn.execute("INSERT INTO blacklist (worker_id) VALUES ('soon-distrusted')")
        finally:
            await conn.close()
        for _ in range(50):  # LISTEN/NOTIFY delivers it in milliseconds
            if "soon-distrusted" in orchestrator.blacklist:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(GenerationFailed):
            await client.generate("not ok", width=64, height=64, steps=2, timeout=30)


async def test_no_worker_at_all_fails_clearly(stack: Stack) -> None:
    await stack.start_orchestrator(max_attempts=3)
    async with ImageBusClient(stack.nats_url) as client:
        with pytest.raises(GenerationFailed) as failed:
            await client.generate("alone", width=64, height=64, steps=2, timeout=30)
    assert "3 no worker connected" in (failed.value.failures[0].error or "")
