"""Authentic events (issue 13, section 2): forged events into a requester's inbox and
forged cancels on the public subject do no harm (docs/event-authentication.md).

Each attack is made by a raw NATS client that knows the job's inbox and id (as one
that listened in on them would), against a real orchestrator, worker and requester.
"""

from __future__ import annotations

import asyncio
import io

import pytest
import structlog.testing
from PIL import Image

from imagebus.protocol import (
    Dialect,
    JobAccepted,
    JobCancel,
    JobRejected,
    TaskResult,
    encode,
    events,
)
from imagebus.protocol import subjects as s
from imagebus.protocol.auth import (
    AuthError,
    EventKey,
    EventVerifier,
    assignment_key,
    new_secret,
    secret_header,
    secret_of,
)
from imagebus.requester import GenerationFailed, ImageBusClient, ImageBusError, Job

from .conftest import Stack
from .helpers import raw_client

pytestmark = pytest.mark.faults


def _png(colour: str = "black") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


async def _forge(
    url: str, subject: str, payload: bytes, headers: dict[str, str] | None = None
) -> None:
    nc = await raw_client(url)
    try:
        await nc.publish(subject, payload, headers=headers)
        await nc.flush()
    finally:
        await nc.close()


def _forged_result(job_id: str, index: int = 0) -> bytes:
    return encode(
        TaskResult(
            job_id, index, ok=True, seed=1, worker_id="mallory", png=_png(), width=64, height=64
        )
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


async def test_bad_macs_are_dropped_and_counted_and_nothing_crashes(stack: Stack) -> None:
    """Garbage, a MAC of the wrong length, none, a bad attempt number, a MAC by one
    image's worker key over another image, and a job's own event under a worker's key:
    each is dropped (and counted); the real image still arrives, and the worker and
    orchestrator go on serving."""
    await stack.start_orchestrator()
    async with ImageBusClient(stack.nats_url) as client:
        job, job_id = await _accepted_with_no_worker(client, n=2)
        assert job.secret is not None
        result = s.event_subject(job.inbox, s.EVENT_RESULT)
        image_1 = _forged_result(job_id, index=1)
        # Image 0's worker (attempt 1) holds a key for image 0 only.
        worker_key = EventKey(assignment_key(job.secret, job_id, 0, 1), 1)
        accepted = encode(JobAccepted(job_id, 1, [job.seeds[0]]))
        forgeries: list[tuple[str, bytes, dict[str, str] | None]] = [
            (result, image_1, {s.HEADER_EVENT_MAC: "not hex at all", s.HEADER_EVENT_ATTEMPT: "1"}),
            (result, image_1, {s.HEADER_EVENT_MAC: "ab" * 16, s.HEADER_EVENT_ATTEMPT: "0"}),
            (result, image_1, {s.HEADER_EVENT_MAC: "ab" * 32, s.HEADER_EVENT_ATTEMPT: "0"}),
            (result, image_1, {s.HEADER_EVENT_MAC: "ab" * 32, s.HEADER_EVENT_ATTEMPT: "-1"}),
            (result, image_1, {s.HEADER_EVENT_ATTEMPT: "1"}),
            (result, image_1, None),
            (result, image_1, worker_key.headers(s.EVENT_RESULT, job_id, 1, image_1)),
            (
                s.event_subject(job.inbox, s.EVENT_ACCEPTED),
                accepted,
                worker_key.headers(s.EVENT_ACCEPTED, job_id, None, accepted),
            ),
        ]
        with structlog.testing.capture_logs() as logs:
            for subject, payload, headers in forgeries:
                await _forge(stack.nats_url, subject, payload, headers)
            await asyncio.sleep(0.3)
        assert job.unverified == len(forgeries)
        reasons = [e["reason"] for e in logs if e["event"] == "unverified event dropped"]
        assert reasons == [
            "MAC is not hexadecimal",
            "MAC of 16 bytes, not 32",
            "MAC does not verify",
            "no valid attempt number",
            "no MAC",
            "no MAC",
            "MAC does not verify",
            "a job's own event under a worker's key",
        ]
        worker = await stack.start_worker()
        images = await job.wait(120)
    print(f"\nbad MACs: {len(forgeries)} forged events dropped, {len(images)} real images")
    assert [(image.index, image.worker_id) for image in images] == [(0, worker.id), (1, worker.id)]


async def test_the_owner_and_an_admin_cancel_from_another_process(stack: Stack) -> None:
    """A job is cancelled by its owner's token from any client, or by an admin, and each
    of its images is answered `cancelled`; a wrong token changes nothing."""
    await stack.start_orchestrator()
    async with ImageBusClient(stack.nats_url) as owner, ImageBusClient(stack.nats_url) as other:
        jobs = [await owner.submit("wait", n=2, width=64, height=64, steps=2) for _ in range(2)]
        ids = [await job.accepted() for job in jobs]  # no worker: they wait in line
        recorder = stack.orchestrators[0].recorder
        assert recorder is not None and await recorder.flush(30)  # their records exist
        with pytest.raises(ImageBusError) as refused:
            await other.cancel_job(ids[0], timeout=5)
        assert refused.value.code == "not_owner"
        with pytest.raises(ImageBusError, match="still"):  # a wrong token: still waiting
            await other.cancel_job(ids[0], timeout=2, token="00" * 32)
        assert jobs[0].cancel_token is not None
        by_owner = await other.cancel_job(ids[0], timeout=60, token=jobs[0].cancel_token)
        by_admin = await other.cancel_job(ids[1], timeout=60, admin=True)
        errors = []
        for job in jobs:
            with pytest.raises(GenerationFailed) as failed:
                await job.wait(60)
            assert [f.code for f in failed.value.failures] == ["cancelled", "cancelled"]
            errors.append(failed.value.failures[0].error)
    assert (by_owner.state, by_admin.state) == ("cancelled", "cancelled")
    assert errors == ["cancelled by the requester", "cancelled by an admin"]


def test_a_malformed_secret_is_a_clear_error_and_every_chunk_verifies() -> None:
    assert secret_of({}) is None and secret_of(None) is None
    with pytest.raises(AuthError, match="not hexadecimal"):
        secret_of({s.HEADER_JOB_SECRET: "zz" * 32})
    with pytest.raises(AuthError, match="32 bytes, not 16"):
        secret_of({s.HEADER_JOB_SECRET: "ab" * 16})
    secret = new_secret()
    assert secret_of(secret_header(secret)) == secret
    # A result split in chunks: each message is MACed, and each verifies on its own.
    key = EventKey(assignment_key(secret, "job", 3, 2), 2)
    result = TaskResult("job", 3, ok=True, seed=1, png=bytes(range(256)) * 40)
    _, messages = events.result_messages(Dialect.NATIVE, "_INBOX.x", result, 4096, key)
    assert len(messages) > 2
    verifier = EventVerifier(secret)
    for out in messages:
        kind = out.subject.rsplit(".", 1)[1]
        assert verifier.why_not(kind, "job", 3, out.payload, out.headers) is None
        assert verifier.why_not(kind, "job", 4, out.payload, out.headers) == ("MAC does not verify")
    assert (
        EventVerifier(new_secret()).why_not(
            s.EVENT_RESULT, "job", 3, messages[-1].payload, messages[-1].headers
        )
        == "MAC does not verify"
    )


def test_the_macs_are_hmac_sha256_of_the_documented_fields() -> None:
    """auth.py works HMAC-SHA256 out on hashlib's SHA-256 (faster than hmac.new): it
    must agree with hmac.digest for any key and fields, and give the MACs the wire has
    always carried (values from the hmac.new implementation it replaced)."""
    import hashlib
    import hmac
    import random

    from imagebus.protocol import auth

    rng = random.Random(7)
    for key_length in [*range(0, 70), 127, 128, 129, 1000]:
        key = rng.randbytes(key_length)
        parts = [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(0, 5))]
        fields = b"".join(
            [b"imagebus-events-v1", *(len(p).to_bytes(8, "big") + p for p in [*parts, b"x"])]
        )
        assert auth._hmac(key, *parts, "x") == hmac.digest(key, fields, hashlib.sha256)
    secret = bytes(range(32))
    key = auth.assignment_key(secret, "job-1", 3, 2)
    assert auth.orchestrator_key(secret).hex() == (
        "4bade2c2a7fbc200dded5e5b4db405aed6eeca2f981952740404f86c13f2d2ac"
    )
    assert key.hex() == "2f034fbc4f842ae23443064d8c64e9d991235a5a92c4feb76e6b3c88a7354b00"
    assert auth.cancel_proof(secret).hex() == (
        "d1af89f6244403dacd578114e25683aa11f2cca59f804b5c939aae127b64385f"
    )
    assert auth.event_mac(key, "result", "job-1", 3, 2, b"payload").hex() == (
        "f73d2924f74441c766ea7925a50d1d5e1739d294fda43ea07fb1e9c7cba3b32d"
    )
    assert auth.event_mac(
        auth.orchestrator_key(secret), "accepted", "job-1", None, 0, b""
    ).hex() == ("8e74219ad10dbee1f12cb425a590c33ec70a6b5cefdb9019ea90af861d3be6e7")
