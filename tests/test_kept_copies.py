"""Kept copies of images are authentic (docs/security.md): any worker's key may publish
into the results stream, under any job id, so a forged copy of another job's image is
published there, before the image is made and after, with no MAC, a wrong one, or a
valid MAC under another job's key. `ImageBusClient.fetch` (holding the job's secret,
given it, or by job id alone), `imagebus job fetch` and the orchestrator's reading of
kept copies (what a take-over re-sends, what verification compares) get the worker's
image, and count the forged copies.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import signal
from pathlib import Path

import pytest
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from PIL import Image

from imagebus.embedded import NatsServer
from imagebus.orchestrator import Orchestrator
from imagebus.orchestrator.kept import read_kept
from imagebus.protocol import TaskResult, decode
from imagebus.protocol import subjects as s
from imagebus.protocol.auth import KEPT_COPY, assignment_key, event_mac
from imagebus.requester import ImageBusClient
from imagebus.settings import BusSettings, OrchestratorSettings, WorkerSettings
from imagebus.worker import Worker
from imagebus.worker.engine import DiffusionEngine

from .conftest import Stack
from .helpers import SETTLE_S, eventually, raw_client, run_cli, wait_for_orchestrator
from .test_handoff import _spawn_orchestrator
from .test_liveness import _SlowEngine, _start_worker
from .test_permissions import _connect, server, url, violations

__all__ = ["server"]  # the permissions test's nats-server fixture, used here too

pytestmark = pytest.mark.faults


def _png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


async def _forge_copy(
    forger: Client,
    job_id: str,
    png: bytes,
    msg_id: str,
    mac: bytes | str | None = None,
    attempt: int = 1,
) -> None:
    """Store `png` as image 0 of `job_id` in the results stream, as one whole chunk
    (built by hand, as a rogue worker would); `mac`: its Imagebus-Mac, for `attempt`."""
    headers = {
        s.HEADER_MSG_ID: msg_id,
        s.HEADER_CHUNK: "0",
        s.HEADER_CHUNKS: "1",
        s.HEADER_SHA256: hashlib.sha256(png).hexdigest(),
    }
    if mac is not None:
        headers[s.HEADER_EVENT_MAC] = mac if isinstance(mac, str) else mac.hex()
        headers[s.HEADER_EVENT_ATTEMPT] = str(attempt)
    ack = await forger.jetstream().publish(s.results_subject(job_id, 0), png, headers=headers)
    assert not ack.duplicate, "the forged copy was not stored"


async def test_forged_kept_copies_are_skipped_by_fetch_and_by_the_orchestrator(
    server: NatsServer, database_url: str, tiny_engine: DiffusionEngine, tmp_path: Path
) -> None:
    orchestrator = Orchestrator(
        OrchestratorSettings(database_url, bus=BusSettings(url(server, "orchestrator"), None))
    )
    await orchestrator.start()
    errors: list[str] = []
    forger = await _connect(server, "gpu-1", errors)  # a worker's own credentials
    worker: Worker | None = None
    try:
        async with ImageBusClient(url(server, "alice"), inbox_prefix="_INBOX.alice") as client:
            # Accepted while no worker runs: the forger, given another image of the job,
            # would know its id this early.
            job = await client.submit("the real one", width=64, height=64, steps=2)
            job_id = await job.accepted()
            other = await client.submit("another job", width=64, height=64, steps=2)
            other_key = assignment_key(other.secret or b"", await other.accepted(), 0, 1)
            forged_sha = hashlib.sha256(_png("blue")).hexdigest().encode()
            # Before the image is made: under the Nats-Msg-Id the worker's copy once
            # had (so that JetStream dropped the real copy as a duplicate), with a wrong
            # MAC, and with a MAC under another job's assignment key.
            await _forge_copy(forger, job_id, _png("red"), f"{job_id}.0.0")
            await _forge_copy(forger, job_id, _png("green"), "forged-2", "ab" * 32)
            mac = event_mac(other_key, "kept", job_id, 0, 1, forged_sha)
            await _forge_copy(forger, job_id, _png("blue"), "forged-3", mac)
            worker = Worker(
                WorkerSettings(
                    "gpu-1", bus=BusSettings(url(server, "gpu-1"), None, "_INBOX.gpu-1")
                ),
                engine=tiny_engine,
            )
            await worker.start()
            real = (await job.wait(60))[0].png
            await other.wait(60)
            # After it is kept: a later copy, without MAC and with a wrong one.
            await _forge_copy(forger, job_id, _png("yellow"), "forged-4")
            await _forge_copy(forger, job_id, _png("white"), "forged-5", "cd" * 32)

            fetched = await client.fetch(job_id)
            assert fetched == {0: real}, "fetch returned a forged copy"
            assert client.kept_copies_skipped == 5
        # Another process, given the job's secret; or with its id alone, checked against
        # the digest the job's records hold (the worker's report).
        assert await orchestrator.settle(SETTLE_S)
        alice = url(server, "alice")
        async with ImageBusClient(alice, inbox_prefix="_INBOX.alice") as other_client:
            assert await other_client.fetch(job_id, secret=job.secret) == {0: real}
            assert await other_client.fetch(job_id) == {0: real}
            assert other_client.kept_copies_skipped == 10
        code, stdout, stderr = await run_cli(
            "job", "fetch", job_id, "--out", str(tmp_path), "--nats-url", alice,
            "--inbox-prefix", "_INBOX.alice",
        )  # fmt: skip
        assert code == 0, stderr
        assert Path(stdout.split()[0]).read_bytes() == real, "imagebus job fetch: a forged copy"
        # What a take-over re-sends and a verification compares.
        assert orchestrator.nc is not None
        log = structlog.get_logger()
        assert await read_kept(orchestrator.nc, job_id, job.secret, log) == {0: real}
        assert await read_kept(orchestrator.nc, job_id, job.secret, log, index=0) == {0: real}
    finally:
        await forger.close()
        if worker is not None:
            await worker.stop(grace_s=5)
        await orchestrator.stop(grace_s=5)
    # The forger stayed within a worker's permissions: that is the gap closed here.
    assert violations(server) == []


async def test_a_take_over_re_sends_the_workers_copy_not_a_forged_one(stack: Stack) -> None:
    """The orchestrator serving a job dies once its first image is made and kept; a
    forged copy of that image was put into the stream first. The orchestrator taking
    over re-sends the worker's image, under its own MAC."""
    slow = _SlowEngine(stack.engine, step_s=0.4, warmup_s=0.4)
    await _start_worker(stack, slow, "taken-over", slots=1)
    doomed = await _spawn_orchestrator(stack, ack_wait_s=2.0)
    await wait_for_orchestrator(stack.nats_url)
    watcher = await raw_client(stack.nats_url)
    re_sent: list[TaskResult] = []

    async def on_result(msg: Msg) -> None:
        if (msg.headers or {}).get(s.HEADER_EVENT_ATTEMPT) == "0":  # the orchestrator's
            re_sent.append(decode(TaskResult, msg.data))

    try:
        async with ImageBusClient(stack.nats_url) as client:
            job = await client.submit("taken over", width=64, height=64, steps=4, n=2)
            await watcher.subscribe(s.event_subject(job.inbox, s.EVENT_RESULT), cb=on_result)
            job_id = await job.accepted()
            await _forge_copy(watcher, job_id, _png("red"), "forged-first")
            while 0 not in job.results:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # its copy, published before the result, is stored
            await stack.start_orchestrator(intake_ack_wait_s=2.0)
            doomed.send_signal(signal.SIGKILL)
            await doomed.wait()
            images = await job.wait(60)
            assert await eventually(lambda: bool(re_sent), 10.0), "nothing was re-sent"
    finally:
        await watcher.close()
        if doomed.returncode is None:
            doomed.send_signal(signal.SIGKILL)
            await doomed.wait()
    print(f"\ntake-over re-sent {[(r.index, len(r.png or b'')) for r in re_sent]}")
    made = {image.index: image.png for image in images}
    assert 0 in {r.index for r in re_sent}
    assert all(r.png == made[r.index] for r in re_sent), "a forged copy re-sent"


async def test_verification_reads_the_copy_its_worker_reported(stack: Stack) -> None:
    """An image re-assigned after a first worker kept a copy has two copies, each MAC'd
    by its own assignment. Verification must compare the one the reporting worker
    made (the digest it reported), not the first in the stream: else it would judge
    one worker by another's image (and strike an honest one)."""
    await stack.start_orchestrator()
    async with ImageBusClient(stack.nats_url) as client:
        job = await client.submit("two copies", width=64, height=64, steps=2)
        job_id = await job.accepted()  # no worker yet: it waits
        other = _png("black")  # another attempt's image, kept first
        nc = await raw_client(stack.nats_url)
        try:
            digest = hashlib.sha256(other).hexdigest()
            key = assignment_key(job.secret or b"", job_id, 0, 2)
            mac = event_mac(key, KEPT_COPY, job_id, 0, 2, digest.encode())
            await _forge_copy(nc, job_id, other, f"{job_id}.0.attempt-2", mac, attempt=2)
        finally:
            await nc.close()
        await stack.start_worker()
        (image,) = await job.wait(60)
        assert await stack.orchestrators[0].settle(SETTLE_S)  # the report is recorded
        status = await client.job_status(job_id)
    reported = status.tasks[0].sha256
    assert reported == hashlib.sha256(image.png or b"").hexdigest()
    orchestrator = stack.orchestrators[0]
    assert orchestrator.nc is not None
    log = structlog.get_logger()
    first_verified = await read_kept(orchestrator.nc, job_id, job.secret, log, index=0)
    assert first_verified == {0: other}  # both verify: the first in the stream wins
    worker_made = await read_kept(
        orchestrator.nc, job_id, job.secret, log, index=0, sha256=reported
    )
    assert worker_made == {0: image.png}
