"""Small helpers for tests that speak raw NATS, as a foreign client would."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

# How long a test lets the orchestrator settle (finish its jobs, write its records).
# An upper bound, not an expectation: `settle` returns as soon as it is done, and on a
# loaded 2-core machine a re-assigned image can need a re-run plus a gone-requester wait.
SETTLE_S = 90.0


@dataclass
class Collected:
    messages: list[Msg]

    @property
    def subjects(self) -> list[str]:
        return [m.subject for m in self.messages]


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether `condition` holds within `timeout`. For counters a process bumps just
    after the requester already holds its result (the worker counts a task once it has
    also stored the image and heard the requester's confirmation)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def raw_client(url: str) -> Client:
    return await nats.connect(url, max_reconnect_attempts=1)


async def collect(nc: Client, subject: str) -> tuple[Collected, asyncio.Queue[Msg]]:
    """Subscribe to `subject`; messages land in the list and a queue (to await them)."""
    collected = Collected([])
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_message(msg: Msg) -> None:
        collected.messages.append(msg)
        queue.put_nowait(msg)

    await nc.subscribe(subject, cb=on_message)
    return collected, queue


async def run_cli(*args: str, timeout: float = 120.0) -> tuple[int, str, str]:
    """Run `python -m imagebus ARGS` without blocking the test's event loop."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagebus",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def wait_for_workers(url: str, worker_ids: list[str], timeout: float = 120.0) -> None:
    """Wait until every worker answers its ping subject (they load a model first)."""
    from imagebus.protocol import subjects

    nc = await raw_client(url)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        pending = set(worker_ids)
        while pending:
            assert asyncio.get_running_loop().time() < deadline, f"workers not up: {pending}"
            for worker_id in list(pending):
                try:
                    await nc.request(subjects.worker_ping_subject(worker_id), b"", timeout=0.2)
                    pending.discard(worker_id)
                except Exception:
                    await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def wait_for_orchestrator(url: str, timeout: float = 60.0) -> None:
    from imagebus.protocol import subjects

    nc = await raw_client(url)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await nc.request(subjects.ORCHESTRATOR_PING_SUBJECT, b"", timeout=0.2)
                return
            except Exception:
                assert asyncio.get_running_loop().time() < deadline, "no orchestrator came up"
                await asyncio.sleep(0.1)
    finally:
        await nc.close()
