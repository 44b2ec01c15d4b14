"""PostgreSQL stopped and restarted mid-run: dispatch goes on, no record is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from imagebus.embedded import Postgres
from imagebus.requester import ImageBusClient
from imagebus.worker.engine import DiffusionEngine

from .conftest import Stack
from .helpers import SETTLE_S

pytestmark = pytest.mark.faults


async def test_postgres_restart_mid_run_loses_no_record(
    nats_url: str, tiny_engine: DiffusionEngine, tmp_path: Path
) -> None:
    postgres = await asyncio.to_thread(Postgres(tmp_path / "pg").start)
    database_url = await asyncio.to_thread(postgres.create_database, "faults")
    stack = Stack(nats_url, database_url, tiny_engine)
    try:
        orchestrator = await stack.start_orchestrator()
        await stack.start_worker()
        await stack.start_worker()
        async with ImageBusClient(nats_url) as client:
            before = await client.generate("before", n=3, width=64, height=64, steps=2)
            await asyncio.to_thread(postgres.stop)
            # Postgres is down: requests are still served, records wait in memory.
            during = await client.generate("during", n=4, width=64, height=64, steps=2)
            assert orchestrator.recorder is not None
            assert orchestrator.recorder.backlog > 0
            postgres = await asyncio.to_thread(Postgres(tmp_path / "pg").start)
            after = await client.generate("after", n=2, width=64, height=64, steps=2)
        assert await orchestrator.settle(SETTLE_S)
        assert len(before) + len(during) + len(after) == 9
        conn = await asyncpg.connect(database_url)
        try:
            jobs = await conn.fetch("SELECT prompt, state FROM jobs ORDER BY created_at")
            tasks = await conn.fetchval("SELECT count(*) FROM tasks WHERE state = 'done'")
        finally:
            await conn.close()
        assert [(j["prompt"], j["state"]) for j in jobs] == [
            ("before", "done"),
            ("during", "done"),
            ("after", "done"),
        ]
        assert tasks == 9
    finally:
        await stack.stop()
        await asyncio.to_thread(postgres.stop)
