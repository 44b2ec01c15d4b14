"""Recruitment: busy workers are passed over, blacklisted ones never get work."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from nats.aio.msg import Msg

from imagebus.protocol import AssignmentRefused, WorkerAdvert, encode
from imagebus.protocol import subjects as s
from imagebus.requester import GenerationFailed, ImageBusClient

from .conftest import Stack
from .helpers import SETTLE_S, eventually, raw_client


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
        status = busy.status()  # still on the long job, never given a second
        assert (status.running, status.tasks_done, status.free_slots) == (1, 0, 0), status

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
    status = shunned.status()
    assert (status.tasks_done, status.running, status.failures) == (0, 0, 0), status
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
    assert shunned.status().tasks_done == 0
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
        # LISTEN/NOTIFY delivers it in milliseconds.
        await eventually(lambda: "soon-distrusted" in orchestrator.blacklist, timeout=1.0)
        with pytest.raises(GenerationFailed):
            await client.generate("not ok", width=64, height=64, steps=2, timeout=30)


async def test_no_worker_at_all_waits_for_its_queue_timeout_then_fails_clearly(
    stack: Stack,
) -> None:
    orchestrator = await stack.start_orchestrator(max_attempts=3, queue_timeout_s=2.0)
    async with ImageBusClient(stack.nats_url) as client:
        started = asyncio.get_running_loop().time()
        with pytest.raises(GenerationFailed) as failed:
            await client.generate("alone", width=64, height=64, steps=2, timeout=30)
        waited = asyncio.get_running_loop().time() - started
    failure = failed.value.failures[0]
    assert failure.code == "no_worker"
    assert waited >= 2.0  # a wait, not a failure at the first empty round
    # One count, and the reasons add up to it: every ask met no worker at all.
    error = failure.error or ""
    assert "no worker available within 2s: no worker connected (" in error, error
    attempts = int(error.rsplit("(", 1)[1].split()[0])
    assert attempts >= 6  # at least two rounds of 3
    assert await orchestrator.settle(SETTLE_S)
    (row,) = await _task_rows(stack.database_url)
    assert row["recruit_attempts"] == attempts


@pytest.mark.parametrize("fake", ["refuses", "garbles", "is gone"])
async def test_an_assignment_not_taken_goes_to_another_worker_at_once(
    stack: Stack, fake: str
) -> None:
    """A worker takes an assignment silently. One it will not run it refuses on the
    assignment's reply subject (a garbled answer counts as a refusal), and if no one
    listens on the worker's subject the server answers there itself (503). Either
    way the image goes to another worker at once: with a 120 s heartbeat timeout,
    a lost assignment would outlast the 30 s this test waits."""
    orchestrator = await stack.start_orchestrator(heartbeat_timeout_s=120.0)
    nc = await raw_client(stack.nats_url)
    recruiting = asyncio.Event()  # the orchestrator asks around: it is done with the fake

    async def on_assign(msg: Msg) -> None:
        refusal = AssignmentRefused("fake-worker", "no free slot", 0, 2**62)
        await nc.publish(msg.reply, encode(refusal) if fake == "refuses" else b"\xc1garbage")

    async def on_recruit(_msg: Msg) -> None:
        recruiting.set()

    try:
        if fake != "is gone":
            await nc.subscribe(s.worker_assign_subject("fake-worker"), cb=on_assign)
        asked = await nc.subscribe(s.RECRUIT_SUBJECT, queue=s.WORKER_QUEUE, cb=on_recruit)
        advert = WorkerAdvert("fake-worker", ["tiny"], "cpu", 1, 1, 2048 * 2048, "idle")
        await nc.publish(s.worker_advert_subject("fake-worker"), encode(advert))
        # The only worker the orchestrator knows, with a free slot: assigned directly.
        assert await eventually(lambda: orchestrator.registry.free("fake-worker") == 1)
        async with ImageBusClient(stack.nats_url) as client:
            job = await client.submit("not here", width=64, height=64, steps=2)
            await asyncio.wait_for(recruiting.wait(), 30)
            await asked.unsubscribe()
            await stack.start_worker("real-worker")
            (image,) = await job.wait(30)
    finally:
        await nc.close()
    assert image.worker_id == "real-worker"
    assert await orchestrator.settle(SETTLE_S)
    conn = await asyncpg.connect(stack.database_url)
    try:
        attempts = await conn.fetch(
            "SELECT attempt, worker_id, outcome, error FROM task_attempts ORDER BY attempt"
        )
    finally:
        await conn.close()
    expected_error = {
        "refuses": "no free slot",
        "garbles": "malformed refusal",
        "is gone": "worker not connected",
    }[fake]
    assert [(a["attempt"], a["worker_id"], a["outcome"]) for a in attempts] == [
        (1, "fake-worker", "refused"),
        (2, "real-worker", "done"),
    ], attempts
    assert expected_error in attempts[0]["error"]
