"""A worker that forges what other workers say (issue 13's attacks): adverts, capacity
notices, heartbeats and reports for another worker's id are refused by the server under
deploy/nats-permissions.conf; what a worker may still send under its own id (a forged
advert, a report for a task that is not its own) is ignored by the orchestrator, on an
open bus too; and the pool keeps serving at its normal latency."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from imagebus.embedded import NatsServer
from imagebus.orchestrator import Orchestrator
from imagebus.protocol import (
    CapacityNotice,
    TaskAssignment,
    TaskHeartbeat,
    TaskReport,
    WorkerAdvert,
    decode,
    encode,
)
from imagebus.protocol import subjects as s
from imagebus.requester import ImageBusClient
from imagebus.settings import BusSettings, OrchestratorSettings, WorkerSettings
from imagebus.worker import Worker
from imagebus.worker.engine import DiffusionEngine

from .conftest import Stack
from .helpers import eventually, raw_client
from .test_permissions import _connect, _refused, server, url, violations

__all__ = ["server"]  # the permissions test's nats-server fixture, used here too

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _advert(worker_id: str, **changes: object) -> WorkerAdvert:
    fields: dict[str, object] = dict(
        worker_id=worker_id, models=["tiny"], device="cpu", slots=1, free_slots=1,
        max_pixels=2048 * 2048, state="idle",
    )  # fmt: skip
    fields.update(changes)
    return WorkerAdvert(**fields)  # type: ignore[arg-type]


async def test_a_worker_cannot_speak_for_another_worker_id(server: NatsServer) -> None:
    errors: list[str] = []
    forger = await _connect(server, "gpu-1", errors)  # gpu-1's own credentials
    task = TaskReport("j1", 0, "gpu-2", ok=True, seconds=0.1)
    forged = [
        (s.worker_advert_subject("gpu-2"), encode(_advert("gpu-2", free_slots=0))),
        (s.capacity_subject("gpu-2"), encode(CapacityNotice("gpu-2", 0, 2**62))),
        (s.heartbeat_subject("orch-1", "gpu-2"), encode(TaskHeartbeat("j1", 0, "gpu-2"))),
        (s.report_subject("orch-1", "gpu-2"), encode(task)),
        # A refusal is an answer to an assignment it received, never a publication.
        (s.refusal_subject("orch-1", "j1", 0, 1), b""),
    ]
    try:
        for subject, payload in forged:
            await forger.publish(subject, payload)
            assert await _refused(forger, errors, f'Publish to "{subject}"'), subject
        refused = len(violations(server))
        # Under its own id, the same messages go through (the orchestrator judges them).
        for subject, payload in forged[:4]:
            await forger.publish(subject.replace("gpu-2", "gpu-1"), payload)
        await forger.flush()
        await asyncio.sleep(0.5)
        assert len(violations(server)) == refused
    finally:
        await forger.close()
    print(f"forged for another worker id: {len(forged)} sent, {refused} refused by the server")


async def _latencies(client: ImageBusClient, count: int) -> list[float]:
    seconds = []
    for i in range(count):
        began = time.monotonic()
        job = await client.submit(f"latency {i}", width=64, height=64, steps=2)
        await job.wait(30)  # raises if the image failed
        seconds.append(time.monotonic() - began)
    return seconds


async def test_forged_adverts_under_a_workers_own_id_do_not_freeze_the_pool(
    server: NatsServer, database_url: str, tiny_engine: DiffusionEngine
) -> None:
    """gpu-1's own credentials used against it: an advert with no free slot and a huge
    sequence number (once believed, no later report of the real gpu-1 outranked it:
    every job waited for a slot the pool thought taken), a capacity notice alike, and
    an advert that accepts no image at all (once believed, every request failed)."""
    orchestrator = Orchestrator(
        OrchestratorSettings(database_url, bus=BusSettings(url(server, "orchestrator"), None))
    )
    worker = Worker(
        WorkerSettings("gpu-1", bus=BusSettings(url(server, "gpu-1"), None, "_INBOX.gpu-1")),
        engine=tiny_engine,
    )
    await orchestrator.start()
    await worker.start()
    forger = await _connect(server, "gpu-1", [])
    try:
        async with ImageBusClient(url(server, "alice"), inbox_prefix="_INBOX.alice") as client:
            await _latencies(client, 2)  # warm-up
            baseline = await _latencies(client, 10)
            for forged in [
                _advert("gpu-1", free_slots=0, free_seq=2**62, instance="forged"),
                _advert("gpu-1", free_slots=0, free_seq=2**62),
                _advert("gpu-1", max_pixels=0, free_seq=2**62 + 1),
            ]:
                await forger.publish(s.worker_advert_subject("gpu-1"), encode(forged))
            notice = CapacityNotice("gpu-1", 0, 2**62 + 2)
            await forger.publish(s.capacity_subject("gpu-1"), encode(notice))
            await forger.flush()
            # The pool view is the real gpu-1's again at its next report (an advert every
            # 2 s); believed, the forged sequence number outranked every later one.
            assert await eventually(lambda: orchestrator.registry.free("gpu-1") == 0, 5)
            began = time.monotonic()  # the forgeries have landed: gpu-1 looks busy
            restored = await eventually(lambda: orchestrator.registry.free("gpu-1") == 1, 10)
            print(
                f"forged adverts: gpu-1's free slot seen again "
                f"{time.monotonic() - began:.1f} s after"
            )
            assert restored, "a forged sequence number froze gpu-1's free slots at 0"
            after = await _latencies(client, 20)
    finally:
        await forger.close()
        await worker.stop(grace_s=5)
        await orchestrator.stop(grace_s=5)
    base_p50, after_p50 = statistics.median(baseline), statistics.median(after)
    print(
        f"forged adverts: 20 jobs after them, 0 failed; p50 latency {after_p50:.2f} s "
        f"(max {max(after):.2f} s) against {base_p50:.2f} s before"
    )
    assert after_p50 <= 2 * base_p50 + 0.3


class _FakeWorker:
    """A worker that takes assignments and says nothing (it was killed, say)."""

    def __init__(self, nc: Client, worker_id: str) -> None:
        self.nc = nc
        self.worker_id = worker_id
        self.assignments: asyncio.Queue[TaskAssignment] = asyncio.Queue()

    async def start(self) -> None:
        async def on_assign(msg: Msg) -> None:
            await self.assignments.put(decode(TaskAssignment, msg.data))

        await self.nc.subscribe(s.worker_assign_subject(self.worker_id), cb=on_assign)
        await self.nc.publish(s.worker_advert_subject(self.worker_id), encode(_advert("honest")))


async def test_heartbeats_and_reports_for_a_task_not_the_senders_are_ignored(
    stack: Stack,
) -> None:
    """On an open bus: "mallory" forges a finished report, then heartbeats, for the task
    of "honest", a worker that went silent, each under its own id (all the server's
    permissions let it). The task stays unfinished and is re-assigned once honest's
    heartbeats stop, not kept alive until the task timeout."""
    orchestrator = await stack.start_orchestrator(heartbeat_timeout_s=1.0, task_timeout_s=60.0)
    nc = await raw_client(stack.nats_url)
    honest = _FakeWorker(nc, "honest")
    await honest.start()
    assert await eventually(lambda: orchestrator.registry.free("honest") == 1)
    try:
        async with ImageBusClient(stack.nats_url) as client:
            job = await client.submit("not forged", width=64, height=64, steps=2)
            assignment = await asyncio.wait_for(honest.assignments.get(), 10)
            assert assignment.heartbeat_subject == s.heartbeat_subject(orchestrator.id, "honest")
            key = (assignment.job_id, assignment.index)
            watch = orchestrator._watches[key]
            for worker_id in ["honest", "mallory"]:  # as honest, then as itself
                report = TaskReport(*key, worker_id=worker_id, ok=True, seconds=0.1)
                await nc.publish(s.report_subject(orchestrator.id, "mallory"), encode(report))
            await nc.flush()
            await asyncio.sleep(0.5)
            assert not watch.report.done(), "a forged report finished the task"

            async def forge_heartbeats() -> None:
                beat = TaskHeartbeat(*key, worker_id="honest", step=1, steps=2)
                while True:
                    await nc.publish(s.heartbeat_subject(orchestrator.id, "mallory"), encode(beat))
                    await asyncio.sleep(0.2)

            forging = asyncio.create_task(forge_heartbeats())
            began = time.monotonic()
            try:
                reassigned = await eventually(
                    lambda: orchestrator._watches.get(key) is not watch, 8.0
                )
            finally:
                forging.cancel()
            print(
                f"forged heartbeats for a silent worker's task: re-assigned after "
                f"{time.monotonic() - began:.1f} s (heartbeat timeout 1 s, task timeout 60 s)"
            )
            assert reassigned, "forged heartbeats kept a silent worker's task alive"
            await job.cancel()
    finally:
        await nc.close()
