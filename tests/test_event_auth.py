"""Authentic events (issue 13, section 2): forged events into a requester's inbox and
forged cancels on the public subject do no harm (docs/event-authentication.md).

Each attack is made by a raw NATS client that knows the job's inbox and id (as one
that listened in on them would), against a real orchestrator, worker and requester.
"""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from imagebus.protocol import JobAccepted, JobCancel, JobRejected, TaskResult, encode
from imagebus.protocol import subjects as s
from imagebus.requester import ImageBusClient, Job

from .conftest import Stack
from .helpers import raw_client

pytestmark = pytest.mark.faults


def _png(colour: str = "black") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


async def _forge(url: str, subject: str, payload: bytes, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    nc = await raw_client(url)
    try:
        await nc.publish(subject, payload, headers=headers)
        await nc.flush()
    finally:
        await nc.close()


def _forged_result(job_id: str, index: int = 0) -> bytes:
    return encode(
        TaskResult(job_id, index, ok=True, seed=1, worker_id="mallory", png=_png(), width=64,
                   height=64)  # fmt: skip
    )


async def _accepted_with_no_worker(client: ImageBusClient, n: int = 1) -> tuple[Job, str]:
    """A job accepted while no worker runs: it waits in line, open to forgeries."""
    job = await client.submit("a lighthouse", n=n, width=64, height=64, steps=2)
    return job, await job.accepted()


async def test_a_forged_result_is_dropped_and_the_real_image_arrives(stack: Stack) -> None:
    await stack.start_orchestrator()
    async with ImageBusClient(stack.nats_url) as client:
        job, job_id = await _accepted_with_no_worker(client)
        await _forge(stack.nats_url, s.event_subject(job.inbox, s.EVENT_RESULT),
                     _forged_result(job_id))  # fmt: skip
        await asyncio.sleep(0.3)
        worker = await stack.start_worker()
        images = await job.wait(60)
    print(f"\nforged result: {len(images)} image(s), from {images[0].worker_id}")
    assert [image.worker_id for image in images] == [worker.id]


async def test_a_forged_rejection_does_not_fail_the_job(stack: Stack) -> None:
    await stack.start_orchestrator()
    async with ImageBusClient(stack.nats_url) as client:
        job, job_id = await _accepted_with_no_worker(client)
        forged = JobRejected("forged", "invalid_request", job_id=job_id)
        await _forge(stack.nats_url, s.event_subject(job.inbox, s.EVENT_REJECTED), encode(forged))
        await asyncio.sleep(0.3)
        await stack.start_worker()
        images = await job.wait(60)
    print(f"\nforged rejection: {len(images)} image(s)")
    assert len(images) == 1


async def test_a_forged_acceptance_does_not_shrink_the_job(stack: Stack) -> None:
    await stack.start_orchestrator()
    async with ImageBusClient(stack.nats_url) as client:
        job, job_id = await _accepted_with_no_worker(client, n=2)
        forged = JobAccepted(job_id, 1, [job.seeds[0]])
        await _forge(stack.nats_url, s.event_subject(job.inbox, s.EVENT_ACCEPTED), encode(forged))
        await asyncio.sleep(0.3)
        await stack.start_worker()
        images = await job.wait(60)
    print(f"\nforged acceptance (n=1 of 2): {len(images)} image(s)")
    assert [image.index for image in images] == [0, 1]


@pytest.mark.parametrize("index", [None, 0], ids=["job", "image"])
async def test_a_forged_cancel_on_the_public_subject_changes_nothing(
    stack: Stack, index: int | None
) -> None:
    """Once a cancel by job id stopped the job; one naming job and image (the form used
    for re-assignment) stopped the image and left the requester unanswered."""
    await stack.start_orchestrator()
    worker = await stack.start_worker()
    started = asyncio.Event()
    async with ImageBusClient(stack.nats_url) as client:
        job = await client.submit(
            "long", n=2, width=64, height=64, steps=8, on_progress=lambda p: started.set()
        )
        job_id = await job.accepted()
        await asyncio.wait_for(started.wait(), 60)
        forged = JobCancel(job_id, index, "forged")
        await _forge(stack.nats_url, s.CANCEL_SUBJECT, encode(forged))
        images = await job.wait(120)
    print(f"\nforged cancel ({'job' if index is None else 'job + image'}): {len(images)} images")
    assert [image.index for image in images] == [0, 1]
    assert {image.worker_id for image in images} == {worker.id}
