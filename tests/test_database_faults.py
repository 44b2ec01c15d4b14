"""PostgreSQL stopped and restarted mid-run: dispatch goes on, no record is lost; a
long outage pauses the intake rather than filling the orchestrator's memory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from imagebus.embedded import Postgres
from imagebus.requester import ImageBusClient
from imagebus.worker.engine import DiffusionEngine

from .conftest import Stack
from .helpers import SETTLE_S, eventually

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
            (stats,) = await client.orchestrator_stats()
            assert stats.records_not_yet_written > 0
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


async def test_a_long_postgres_outage_pauses_the_intake_and_loses_nothing(
    nats_url: str, tiny_engine: DiffusionEngine, tmp_path: Path
) -> None:
    postgres = await asyncio.to_thread(Postgres(tmp_path / "pg").start)
    database_url = await asyncio.to_thread(postgres.create_database, "outage")
    stack = Stack(nats_url, database_url, tiny_engine)
    size = {"width": 64, "height": 64, "steps": 2}
    try:
        # At most two requests asked for ahead (the capacity), and a backlog of ten
        # records, about three one-image jobs' worth.
        orchestrator = await stack.start_orchestrator(max_concurrent_jobs=2, max_record_backlog=10)
        await stack.start_worker()
        assert orchestrator.recorder is not None and orchestrator.intake is not None
        async with ImageBusClient(nats_url) as client:
            await client.generate("before", **size)
            await asyncio.to_thread(postgres.stop)
            served_while_down = 0
            while not orchestrator.recorder.full:
                await client.generate("down", **size)
                served_while_down += 1
                assert served_while_down <= 5, "records did not pile up while postgres was down"
            assert await eventually(lambda: orchestrator.intake.paused_for is not None, 5.0)
            assert "IMAGEBUS_MAX_RECORD_BACKLOG" in str(orchestrator.intake.paused_for)

            # Requests sent now are stored, and wait in the stream: at most the two
            # already asked for are served, however long the outage lasts.
            waiting = [await client.submit(f"queued {i}", **size) for i in range(4)]
            await asyncio.sleep(7.0)  # past the standing pull requests' expiry (5 s)
            assert sum(job.done for job in waiting) <= 2
            (stats,) = await client.orchestrator_stats()
            assert stats.records_not_yet_written <= 10 + 2 * 4
            assert "IMAGEBUS_MAX_RECORD_BACKLOG" in str(stats.taking_no_requests_because)

            postgres = await asyncio.to_thread(Postgres(tmp_path / "pg").start)
            for job in waiting:  # the backlog is written, and the intake takes them again
                assert len(await job.wait(60)) == 1
        assert orchestrator.intake.paused_for is None
        assert await orchestrator.settle(SETTLE_S)
        conn = await asyncpg.connect(database_url)
        try:
            states = await conn.fetch("SELECT prompt, state FROM jobs ORDER BY created_at")
        finally:
            await conn.close()
        prompts = [row["prompt"] for row in states]
        assert prompts[: 1 + served_while_down] == ["before"] + ["down"] * served_while_down
        assert sorted(prompts[1 + served_while_down :]) == [f"queued {i}" for i in range(4)]
        assert {row["state"] for row in states} == {"done"}
    finally:
        await stack.stop()
        await asyncio.to_thread(postgres.stop)
