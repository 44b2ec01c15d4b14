"""Submitting across a NATS blip: every request is stored once, none is reported failed
once stored (so a caller has nothing to retry), and each image is handed over once."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from imagebus.embedded import NatsServer, free_port
from imagebus.protocol import ResultChunk, TaskAssigned, TaskResult, encode
from imagebus.protocol import subjects as s
from imagebus.protocol.auth import EventKey, assignment_key
from imagebus.requester import ImageBusClient, ImageBusError, Job
from imagebus.worker.engine import DiffusionEngine

from .conftest import Stack
from .helpers import SETTLE_S, eventually, raw_client

pytestmark = [pytest.mark.faults, pytest.mark.slow]

REQUESTS = 36
OUTAGE_S = 8.0


async def _outage(server: NatsServer, after_s: float, down_s: float) -> NatsServer:
    """Stop nats-server after `after_s`, start it again `down_s` later on the same port
    and JetStream store: what it had stored survives, as in a real restart."""
    await asyncio.sleep(after_s)
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(down_s)
    return await asyncio.to_thread(NatsServer(server.host, server.port, server.store_dir).start)


async def test_nats_down_8s_during_submissions_fails_nothing_and_runs_nothing_twice(
    database_url: str, tiny_engine: DiffusionEngine, tmp_path: Path
) -> None:
    server = NatsServer("127.0.0.1", free_port(), tmp_path / "nats").start()
    stack = Stack(server.url, database_url, tiny_engine)
    failures: list[str] = []
    jobs: dict[int, Job] = {}
    assigned: Counter[tuple[int, int, str]] = Counter()
    try:
        # Heartbeats are lost while the bus is down: a long timeout keeps the
        # orchestrator from re-assigning running tasks, which is not what is measured.
        orchestrator = await stack.start_orchestrator(heartbeat_timeout_s=30.0)
        workers = [await stack.start_worker() for _ in range(2)]
        async with ImageBusClient(server.url) as client:

            async def submit_as_a_caller_would(i: int) -> None:
                # A failed submit is retried once, as scripts do: a false failure
                # then runs the request twice.
                for _ in range(2):
                    try:
                        jobs[i] = await client.submit(
                            f"blip {i}",
                            width=64,
                            height=64,
                            steps=2,
                            on_assigned=lambda index, wid, i=i: assigned.update([(i, index, wid)]),
                        )
                        return
                    except ImageBusError as exc:
                        failures.append(f"{i}: {exc.code}: {exc}")

            outage = asyncio.create_task(_outage(server, after_s=1.0, down_s=OUTAGE_S))
            submitting = []
            for i in range(REQUESTS):
                submitting.append(asyncio.create_task(submit_as_a_caller_would(i)))
                await asyncio.sleep(0.3)
            server = await outage
            await asyncio.gather(*submitting)
            results = {i: await job.wait(120) for i, job in jobs.items()}
        assert await orchestrator.settle(SETTLE_S)
        conn = await asyncpg.connect(database_url)
        try:
            stored = Counter(r["prompt"] for r in await conn.fetch("SELECT prompt FROM jobs"))
        finally:
            await conn.close()
        runs = sum(stored.values())
        await eventually(lambda: sum(w.tasks_done for w in workers) >= runs, timeout=10)
        tasks = sum(w.tasks_done for w in workers)
        handed = sum(len(images) for images in results.values())
        dropped = sum(job.duplicates for job in jobs.values())
        print(
            f"\nNATS down {OUTAGE_S:g} s: {REQUESTS} submitted, {len(failures)} failed, "
            f"{runs} jobs stored and run ({runs - len(stored)} twice), {tasks} images made, "
            f"{handed} handed to the requester ({dropped} re-sent copies dropped), "
            f"{sum(n - 1 for n in assigned.values())} repeated assignment events"
        )
        assert failures == [], failures[:3]
        assert sorted(stored) == sorted(f"blip {i}" for i in range(REQUESTS))
        assert set(stored.values()) == {1}, "a request was stored (and run) twice"
        assert [len(results[i]) for i in range(REQUESTS)] == [1] * REQUESTS
        assert all(n == 1 for n in assigned.values()), "an assignment was reported twice"
    finally:
        await stack.stop()
        server.stop()


async def test_submit_to_an_unreachable_bus_says_so(tmp_path: Path) -> None:
    server = NatsServer("127.0.0.1", free_port(), tmp_path / "nats").start()
    try:
        async with ImageBusClient(server.url, submit_timeout_s=2.0) as client:
            await asyncio.to_thread(server.stop)
            with pytest.raises(ImageBusError) as failed:
                await client.submit("nobody hears", width=64, height=64)
    finally:
        server.stop()
    print(f"\nbus down: {failed.value.code}: {failed.value}")
    assert failed.value.code == "bus_unreachable"
    assert "unreachable" in str(failed.value) and "permission" not in str(failed.value)


async def test_result_copies_after_a_reconnect_are_handed_over_once(stack: Stack) -> None:
    # A worker's re-sends, as they reach a requester after a reconnect: a copy with a
    # chunk lost, then complete copies, and the assignment told twice. Sent raw, as the
    # worker sends them; the request itself waits in the stream (no orchestrator runs).
    orchestrator = await stack.start_orchestrator()
    await orchestrator.stop(grace_s=1)
    stack.orchestrators.clear()
    png = bytes(range(256)) * 40
    parts = [png[:4000], png[4000:8000], png[8000:]]
    assigned: list[tuple[int, str]] = []
    worker = await raw_client(stack.nats_url)
    try:
        async with ImageBusClient(stack.nats_url) as client:
            job = await client.submit(
                "re-sent", width=64, height=64, on_assigned=lambda i, w: assigned.append((i, w))
            )
            head = TaskResult(
                "j1", 0, ok=True, seed=1, worker_id="w1", width=64, height=64, chunks=3,
                size=len(png), sha256=hashlib.sha256(png).hexdigest(),
            )  # fmt: skip
            # Signed as the assigned worker signs them (its assignment's key), or the
            # client would drop them unheard (docs/event-authentication.md).
            assert job.secret is not None
            key = EventKey(assignment_key(job.secret, "j1", 0, 1), attempt=1)

            def signed(kind: str, payload: bytes) -> dict[str, str]:
                return key.headers(kind, "j1", 0, payload)

            for _ in range(2):
                told = encode(TaskAssigned("j1", 0, "w1"))
                await worker.publish(
                    f"{job.inbox}.{s.EVENT_ASSIGNED}", told, headers=signed(s.EVENT_ASSIGNED, told)
                )

            async def send_copy(seqs: list[int]) -> bool:
                for seq in seqs:
                    chunk = encode(ResultChunk("j1", 0, seq, parts[seq]))
                    await worker.publish(
                        f"{job.inbox}.{s.EVENT_CHUNK}", chunk, headers=signed(s.EVENT_CHUNK, chunk)
                    )
                result = encode(head)
                try:
                    await worker.request(
                        f"{job.inbox}.{s.EVENT_RESULT}", result, timeout=1,
                        headers=signed(s.EVENT_RESULT, result),
                    )  # fmt: skip
                    return True
                except Exception:
                    return False

            confirmed = [await send_copy(seqs) for seqs in ([0, 2], [0, 1, 2], [0, 1, 2])]
            images = await job.wait(10)
    finally:
        await worker.close()
    print(
        f"\nresult copies: 3 sent (1 missing a chunk), confirmed {confirmed}, "
        f"{len(images)} image handed over, {job.duplicates} copy dropped, "
        f"assignment reported {len(assigned)} time(s)"
    )
    assert confirmed == [False, True, True]
    assert [image.png for image in images] == [png]
    assert job.duplicates == 1 and assigned == [(0, "w1")]
