"""An orchestrator that dies hands its jobs over quickly, and no image is made twice:
not those already made (kept in the results stream), nor those still being made on
its workers (adopted by the orchestrator that takes over)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter

import asyncpg
import pytest
from nats.aio.msg import Msg

from imagebus.protocol import TaskReport, decode
from imagebus.protocol import subjects as s
from imagebus.requester import ImageBusClient

from .conftest import Stack
from .helpers import SETTLE_S, raw_client, wait_for_orchestrator
from .test_liveness import _SlowEngine, _start_worker

pytestmark = [pytest.mark.faults, pytest.mark.slow]

JOBS, IMAGES = 4, 4


async def _spawn_orchestrator(stack: Stack, ack_wait_s: float = 10.0) -> asyncio.subprocess.Process:
    # The default ack wait unless told: the hand-over time measured is the one users get.
    env = {
        **os.environ,
        "IMAGEBUS_LOG_LEVEL": "warning",
        "IMAGEBUS_INTAKE_ACK_WAIT": f"{ack_wait_s:g}",
    }
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


ADOPTED_IMAGES, STEP_S, ACK_WAIT_S = 6, 0.5, 2.0


async def test_images_still_being_made_when_their_orchestrator_dies_are_adopted_not_made_again(
    stack: Stack,
) -> None:
    # Two workers of two slots each, whose images take 10 s: 4 of the job's 6 images
    # are being made when their orchestrator is killed, 2 wait for a slot. The request
    # comes back after the (shortened) ack wait, long before those 4 are done.
    slow = _SlowEngine(stack.engine, step_s=STEP_S, warmup_s=STEP_S)
    for name in ("adopt-1", "adopt-2"):
        await _start_worker(stack, slow, name, slots=2)
    doomed = await _spawn_orchestrator(stack, ack_wait_s=ACK_WAIT_S)
    await wait_for_orchestrator(stack.nats_url)
    # Every report a worker sends, to whichever orchestrator: one per image made.
    made: Counter[int] = Counter()
    adoption_calls: list[float] = []
    watcher = await raw_client(stack.nats_url)

    async def on_report(msg: Msg) -> None:
        report = decode(TaskReport, msg.data)
        if report.ok:
            made[report.index] += 1

    async def on_adoption_call(_msg: Msg) -> None:
        adoption_calls.append(time.monotonic())

    await watcher.subscribe(s.report_subject("*"), cb=on_report)
    await watcher.subscribe(s.WORKER_ADOPT_SUBJECT, cb=on_adoption_call)
    assigned: set[int] = set()
    try:
        async with ImageBusClient(stack.nats_url) as client:
            job = await client.submit(
                "adopted", width=64, height=64, steps=20, n=ADOPTED_IMAGES,
                on_assigned=lambda index, _worker: assigned.add(index),
            )  # fmt: skip
            while len(assigned) < 4:  # every slot is making one of its images
                await asyncio.sleep(0.02)
            survivor = await stack.start_orchestrator(intake_ack_wait_s=ACK_WAIT_S)
            doomed.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await doomed.wait()
            running_at_kill = len(assigned) - len(job.results)
            images = await job.wait(55)
            answered_s = time.monotonic() - killed_at
            copies_dropped = job.duplicates  # (not the job in asserts: its repr holds PNGs)
            job_id = await job.accepted()
            assert await survivor.settle(SETTLE_S)
            status = await client.job_status(job_id)
    finally:
        await watcher.close()
        if doomed.returncode is None:
            doomed.send_signal(signal.SIGKILL)
            await doomed.wait()
    twice = sum(count - 1 for count in made.values() if count > 1)
    takeover = f"{adoption_calls[0] - killed_at:.1f} s" if adoption_calls else "none"
    print(
        f"\norchestrator killed: {ADOPTED_IMAGES} images ({running_at_kill} being made), "
        f"{twice} made twice, {copies_dropped} copies to the requester, "
        f"takeover (adoption call) {takeover} after the kill, "
        f"all answered after {answered_s:.1f} s (ack wait {ACK_WAIT_S:g} s)"
    )
    assert sorted(image.index for image in images) == list(range(ADOPTED_IMAGES))
    assert copies_dropped == 0  # the requester received each image once
    assert twice == 0, f"made per index: {dict(made)}"
    assert sorted(made) == list(range(ADOPTED_IMAGES))
    # The record says who made each image, in one attempt each.
    assert status.state == "done"
    assert [(t.state, t.worker_id, t.attempts) for t in status.tasks] == [
        ("done", image.worker_id, 1) for image in images
    ]


async def test_an_adopted_task_keeps_the_attempt_its_worker_runs_under(nats_url: str) -> None:
    """The dead orchestrator may have re-assigned an image before it died: its worker
    says which attempt it runs, and the watch (so the records, and the number of a
    re-assignment from here) carries it. A worker that does not say counts as 1."""
    from imagebus.orchestrator.adoption import adopt_running_tasks
    from imagebus.orchestrator.watch import Watch
    from imagebus.protocol import AdoptionAnswer, AdoptionCall, encode

    workers = await raw_client(nats_url)

    async def answer(msg: Msg) -> None:
        call = decode(AdoptionCall, msg.data)
        assert call.job_id == "job-1"
        await workers.publish(msg.reply, encode(AdoptionAnswer("w-new", [0, 2], [3, 1])))
        old_worker = msg.reply  # a worker from before `attempts`: indexes only
        await workers.publish(old_worker, encode({"worker_id": "w-old", "indexes": [1]}))

    await workers.subscribe(s.WORKER_ADOPT_SUBJECT, cb=answer)
    await workers.flush()
    orchestrator = await raw_client(nats_url)
    watches: dict[tuple[str, int], Watch] = {}
    try:
        adopted = await adopt_running_tasks(
            orchestrator, "job-1", "o-2", unanswered=[0, 1, 2, 3],
            live_workers=["w-new", "w-old"], watches=watches, window_s=5.0,
        )  # fmt: skip
    finally:
        await orchestrator.close()
        await workers.close()
    assert adopted == {0: "w-new", 1: "w-old", 2: "w-new"}
    assert {i: (w.worker_id, w.attempt) for (_, i), w in watches.items()} == {
        0: ("w-new", 3),
        1: ("w-old", 1),
        2: ("w-new", 1),
    }
