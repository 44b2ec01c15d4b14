"""A worker id is held by one running worker at a time, atomically: two workers started
at the same moment with one id cannot both run, the second is refused in under a second,
and the id of a worker killed with kill -9 is free again within seconds."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import pytest
from nats.aio.msg import Msg

from imagebus.logs import get_logger
from imagebus.protocol import subjects as s
from imagebus.settings import BusSettings, WorkerSettings
from imagebus.worker import Worker, WorkerIdInUse
from imagebus.worker.identity import ID_TTL_S, IdClaim

from .conftest import Stack
from .helpers import raw_client, wait_for_workers

pytestmark = pytest.mark.faults


async def _timed_start(worker: Worker) -> float:
    started = time.monotonic()
    try:
        await worker.start()
    except WorkerIdInUse:
        return -(time.monotonic() - started)  # refused: negative
    return time.monotonic() - started


async def _answering(nats_url: str, worker_id: str) -> int:
    """How many running workers answer `worker_id`'s ping."""
    nc = await raw_client(nats_url)
    try:
        inbox = nc.new_inbox()
        answers: list[Msg] = []

        async def on_answer(msg: Msg) -> None:
            answers.append(msg)

        sub = await nc.subscribe(inbox, cb=on_answer)
        await nc.publish(s.worker_ping_subject(worker_id), b"", reply=inbox)
        await asyncio.sleep(0.5)
        await sub.unsubscribe()
        return len(answers)
    finally:
        await nc.close()


async def test_two_workers_started_at_once_with_one_id(stack: Stack) -> None:
    settings = WorkerSettings("twin", bus=BusSettings(stack.nats_url, None))
    pair = [Worker(settings, engine=stack.engine), Worker(settings, engine=stack.engine)]
    times = await asyncio.gather(*(_timed_start(w) for w in pair))
    running = [w for w, t in zip(pair, times, strict=True) if t >= 0]
    stack.workers += running
    refused = [-t for t in times if t < 0]
    print(f"two workers, one id, started together: {len(running)} runs, refused in {refused}s")
    assert len(running) == 1 and len(refused) == 1
    assert refused[0] < 1.0
    assert await _answering(stack.nats_url, "twin") == 1
    # A clean stop frees the id at once.
    await running[0].stop(grace_s=1)
    stack.workers.remove(running[0])
    again = Worker(settings, engine=stack.engine)
    took = await _timed_start(again)
    assert took >= 0
    stack.workers.append(again)
    print(f"restart after a clean stop: started in {took:.2f}s")
    assert took < 1.0


async def test_an_id_whose_holder_died_is_free_within_its_ttl(stack: Stack) -> None:
    # A holder that stops refreshing without freeing the id: as a worker killed with
    # kill -9 (its connection is gone, its entry stays until it lapses).
    nc = await raw_client(stack.nats_url)
    holder = IdClaim(nc, "orphan", get_logger())
    await holder.acquire()
    assert holder._keeper is not None
    holder._keeper.cancel()
    await nc.close()
    worker = Worker(
        WorkerSettings("orphan", bus=BusSettings(stack.nats_url, None)), engine=stack.engine
    )
    took = await _timed_start(worker)
    assert took >= 0, "the id of a dead worker was refused"
    stack.workers.append(worker)
    print(f"id of a dead worker taken after {took:.2f}s (ttl {ID_TTL_S:g}s)")
    assert took < ID_TTL_S + 2


async def _spawn(nats_url: str, worker_id: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagebus", "--log-level", "warning", "worker",
        "--worker_id", worker_id, "--nats-url", nats_url, "--threads", "1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


@pytest.mark.slow
async def test_two_worker_processes_with_one_id(nats_url: str) -> None:
    started = time.monotonic()
    first, second = await asyncio.gather(_spawn(nats_url, "twin"), _spawn(nats_url, "twin"))
    try:
        waits = [asyncio.ensure_future(p.wait()) for p in (first, second)]
        done, _ = await asyncio.wait(waits, timeout=45, return_when=asyncio.FIRST_COMPLETED)
        assert done, "neither worker was refused"
        refused = first if waits[0] in done else second
        assert refused.returncode == 2
        assert refused.stderr is not None
        stderr = (await refused.stderr.read()).decode()
        assert "already used by a running worker" in stderr, stderr
        took = time.monotonic() - started
        await wait_for_workers(nats_url, ["twin"], timeout=60)
        ready = time.monotonic() - started
        print(
            f"two worker processes, one id: one refused (exit 2) {took:.1f}s after both "
            f"started, the other serving after {ready:.1f}s"
        )
        assert await _answering(nats_url, "twin") == 1
    finally:
        for process in (first, second):
            if process.returncode is None:
                process.terminate()
                await process.wait()


@pytest.mark.slow
async def test_a_worker_killed_with_kill_9_restarts_with_its_id(nats_url: str) -> None:
    worker = await _spawn(nats_url, "phoenix")
    restarted = None
    try:
        await wait_for_workers(nats_url, ["phoenix"], timeout=60)
        worker.send_signal(signal.SIGKILL)
        await worker.wait()
        killed_at = time.monotonic()
        restarted = await _spawn(nats_url, "phoenix")
        await wait_for_workers(nats_url, ["phoenix"], timeout=60)
        took = time.monotonic() - killed_at
        print(f"kill -9, restarted with its id: serving {took:.1f}s later (model load included)")
        assert restarted.returncode is None
    finally:
        for process in (worker, restarted):
            if process is not None and process.returncode is None:
                process.terminate()
                await process.wait()
