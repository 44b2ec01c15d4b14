"""nats-server restarted mid-run (JetStream data on disk): everything reconnects."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from imagebus.embedded import NatsServer, free_port
from imagebus.requester import ImageBusClient
from imagebus.worker.engine import DiffusionEngine

from .conftest import Stack

pytestmark = pytest.mark.faults


async def _restart(server: NatsServer, data: Path) -> NatsServer:
    """Stop the server, then start a new one on the same port and JetStream data."""
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(1.0)
    return await asyncio.to_thread(NatsServer("127.0.0.1", server.port, data).start)


async def test_nats_restart_mid_run_serves_every_request(
    database_url: str, tiny_engine: DiffusionEngine, tmp_path: Path
) -> None:
    server = NatsServer("127.0.0.1", free_port(), tmp_path / "nats").start()
    stack = Stack(server.url, database_url, tiny_engine)
    try:
        await stack.start_orchestrator(heartbeat_timeout_s=3.0)
        for _ in range(3):
            await stack.start_worker()
        async with ImageBusClient(server.url) as client:
            jobs = [
                await client.submit(f"request {i}", width=64, height=64, steps=15)
                for i in range(20)
            ]
            while sum(job.done for job in jobs) < 4:
                await asyncio.sleep(0.05)
            server = await _restart(server, tmp_path / "nats")
            results = await asyncio.gather(*(job.wait(120) for job in jobs))
        assert [len(images) for images in results] == [1] * 20
    finally:
        await stack.stop()
        server.stop()


async def test_requests_after_a_restart_while_idle_are_served(
    database_url: str, tiny_engine: DiffusionEngine, tmp_path: Path
) -> None:
    # The orchestrator's standing pull requests die with the server; it must ask again.
    server = NatsServer("127.0.0.1", free_port(), tmp_path / "nats").start()
    stack = Stack(server.url, database_url, tiny_engine)
    try:
        await stack.start_orchestrator()
        await stack.start_worker()
        async with ImageBusClient(server.url) as client:
            assert len(await (await client.submit("before", width=64, height=64)).wait(30)) == 1
            server = await _restart(server, tmp_path / "nats")
            job = await client.submit("after", width=64, height=64)
            images = await job.wait(60)
        assert len(images) == 1
    finally:
        await stack.stop()
        server.stop()
