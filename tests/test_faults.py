"""Fault injection: real worker processes killed with SIGKILL mid-job, cancellation."""

from __future__ import annotations

import asyncio
import io
import signal
import sys
from collections import Counter

import asyncpg
import pytest
from PIL import Image

from imagebus.protocol import JobCancel, encode
from imagebus.protocol import subjects as s
from imagebus.requester import GenerationFailed, ImageBusClient, ImageBusError

from .conftest import Stack
from .helpers import SETTLE_S, wait_for_workers

pytestmark = pytest.mark.faults


async def _spawn_worker(nats_url: str, worker_id: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagebus", "--log-level", "warning", "worker",
        "--worker_id", worker_id, "--nats-url", nats_url, "--threads", "1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def test_killing_workers_mid_job_loses_no_request(stack: Stack) -> None:
    orchestrator = await stack.start_orchestrator(heartbeat_timeout_s=3.0)
    ids = [f"fault-worker-{i}" for i in range(3)]
    workers = {wid: await _spawn_worker(stack.nats_url, wid) for wid in ids}
    busy_on: dict[str, str] = {}  # worker id -> job id it was last given
    kills = 0
    try:
        async with ImageBusClient(stack.nats_url) as client:
            await wait_for_workers(stack.nats_url, ids)

            jobs = []
            for i in range(50):
                job = await client.submit(
                    f"request {i}", width=64, height=64, steps=60,
                    on_assigned=lambda _index, wid, i=i: busy_on.__setitem__(wid, str(i)),
                )  # fmt: skip
                jobs.append(job)

            async def killer() -> None:
                # Three kills spread over the run, each of a worker in the middle of a job,
                # each restarted (same id) before the next: one fault at a time.
                nonlocal kills
                for threshold in (3, 10, 17):
                    while True:
                        await asyncio.sleep(0.05)
                        if sum(job.done for job in jobs) < threshold:
                            continue
                        victim = next(
                            (w for w, i in busy_on.items() if not jobs[int(i)].done), None
                        )
                        if victim is not None:
                            break
                    workers[victim].send_signal(signal.SIGKILL)
                    await workers[victim].wait()
                    busy_on.pop(victim, None)
                    kills += 1
                    workers[victim] = await _spawn_worker(stack.nats_url, victim)
                    await wait_for_workers(stack.nats_url, [victim])

            killing = asyncio.create_task(killer())
            results = await asyncio.gather(*(job.wait(300) for job in jobs))
            await asyncio.wait_for(killing, 60)
    finally:
        for process in workers.values():
            if process.returncode is None:
                process.send_signal(signal.SIGKILL)
                await process.wait()

    assert kills == 3
    assert len(results) == 50
    for images in results:
        (image,) = images
        with Image.open(io.BytesIO(image.png)) as png:
            assert png.size == (64, 64)
    assert await orchestrator.settle(SETTLE_S)
    conn = await asyncpg.connect(stack.database_url)
    try:
        states = Counter(r["state"] for r in await conn.fetch("SELECT state FROM tasks"))
        outcomes = Counter(
            r["outcome"] for r in await conn.fetch("SELECT outcome FROM task_attempts")
        )
    finally:
        await conn.close()
    assert states == {"done": 50}
    assert outcomes["lost"] >= kills  # the database shows the re-assignments
    print(f"\nfaults: 50 requests, {kills} workers killed, outcomes {dict(outcomes)}")


async def test_cancel_stops_running_and_queued_images(stack: Stack) -> None:
    await stack.start_orchestrator()
    worker = await stack.start_worker()
    started = asyncio.Event()
    async with ImageBusClient(stack.nats_url) as client:
        job = await client.submit(
            "cancel me", n=3, width=256, height=256, steps=100,
            on_progress=lambda p: started.set(),
        )  # fmt: skip
        await asyncio.wait_for(started.wait(), 30)
        await job.cancel()
        with pytest.raises(GenerationFailed) as failed:
            await job.wait(30)
        assert {f.code for f in failed.value.failures} == {"cancelled"}
        assert len(failed.value.failures) == 3
        # The slot is free again: the worker takes new work at once.
        images = await client.generate("after", width=64, height=64, steps=2, timeout=30)
    assert images[0].worker_id == worker.id


async def test_cancel_reaches_a_job_before_its_id_does(stack: Stack) -> None:
    """A request still waiting in the stream has no job id: it is cancelled by its inbox,
    and answered as cancelled once an orchestrator comes to serve it; a running job
    cancelled by its inbox (its acceptance not yet heard) stops as by its id."""
    await stack.start_orchestrator(max_concurrent_jobs=1)  # a second job waits in the stream
    await stack.start_worker()
    started = asyncio.Event()
    async with ImageBusClient(stack.nats_url) as client:
        running = await client.submit(
            "running", width=128, height=128, steps=60, on_progress=lambda p: started.set()
        )
        await asyncio.wait_for(started.wait(), 30)
        queued = await client.submit("queued", width=64, height=64, steps=2)
        with pytest.raises(ImageBusError, match="not accepted"):
            await queued.accepted(timeout=0.5)
        await queued.cancel()  # no job id yet: by its inbox
        assert client.nc is not None  # and the running one by its inbox too, as a
        assert running.cancel_token is not None  # requester would that had not heard
        proof = bytes.fromhex(running.cancel_token)  # "accepted" yet (with its proof)
        await client.nc.publish(
            s.CANCEL_SUBJECT, encode(JobCancel("", inbox=running.inbox, proof=proof))
        )
        for job in (running, queued):
            with pytest.raises(GenerationFailed) as failed:
                await job.wait(30)
            assert [f.code for f in failed.value.failures] == ["cancelled"]
        queued_id = await queued.accepted()
    assert await stack.orchestrators[0].settle(SETTLE_S)
    conn = await asyncpg.connect(stack.database_url)
    try:
        # The queued one was never given to a worker.
        attempts = await conn.fetchval(
            "SELECT count(*) FROM task_attempts WHERE job_id = $1", queued_id
        )
        state = await conn.fetchval("SELECT state FROM jobs WHERE job_id = $1", queued_id)
    finally:
        await conn.close()
    assert (attempts, state) == (0, "cancelled")


async def test_sigterm_lets_a_worker_finish_its_job_first(stack: Stack) -> None:
    await stack.start_orchestrator()
    process = await _spawn_worker(stack.nats_url, "leaving-worker")
    await wait_for_workers(stack.nats_url, ["leaving-worker"])
    started = asyncio.Event()
    async with ImageBusClient(stack.nats_url) as client:
        job = await client.submit(
            "finish me", width=128, height=128, steps=80, on_progress=lambda p: started.set()
        )
        await asyncio.wait_for(started.wait(), 30)
        process.send_signal(signal.SIGTERM)
        (image,) = await job.wait(60)
    assert image.worker_id == "leaving-worker"
    assert await asyncio.wait_for(process.wait(), 30) == 0


async def test_a_task_overrunning_its_timeout_is_reassigned_then_failed(stack: Stack) -> None:
    orchestrator = await stack.start_orchestrator(task_timeout_s=1.0, max_reassignments=1)
    await stack.start_worker()
    await stack.start_worker()
    async with ImageBusClient(stack.nats_url) as client:
        with pytest.raises(GenerationFailed) as failed:
            await client.generate("slow", width=256, height=256, steps=150, timeout=60)
    assert failed.value.failures[0].code == "task_timeout"
    assert await orchestrator.settle(SETTLE_S)
    conn = await asyncpg.connect(stack.database_url)
    try:
        outcomes = [r["outcome"] for r in await conn.fetch("SELECT outcome FROM task_attempts")]
    finally:
        await conn.close()
    assert outcomes.count("timeout") == 2  # the first worker, then its replacement
