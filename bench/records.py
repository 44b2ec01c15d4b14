"""What recording jobs costs PostgreSQL: CPU per job of the recorder's batch writes.

    python -m bench.records [--batches 150] [--per-batch 40]

Writes batches like the orchestrator's recorder does under load (about 40 jobs
per 50 ms at 800 jobs/s): per job its row, a "running" and a "done" update of its
one task, and one attempt. Prints PostgreSQL's CPU milliseconds per job (its
whole process tree) and this process's (the asyncpg side), measured alone,
without the rest of the bus sharing the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from imagebus.db import AttemptRecord, Database, JobRow, Record, TaskUpdate
from imagebus.embedded import Postgres

from .run import _tree_cpu, postgres_pid


def _batch(number: int, jobs: int) -> list[Record]:
    now = datetime.now(UTC)
    records: list[Record] = []
    for i in range(jobs):
        job_id, worker_id = f"job-{number}-{i}", f"worker-{i % 16}"
        records += [
            JobRow(job_id, "o", "native", "_INBOX.x", "p", None, None, 64, 64, 2, 7.5, 1, now, [i]),
            TaskUpdate(job_id, 0, "running", worker_id, recruit_attempts=1, assigned_at=now),
            AttemptRecord(job_id, 0, 1, worker_id, "done", now, now),
            TaskUpdate(job_id, 0, "done", worker_id, finished_at=now, seconds=0.001),
        ]
    return records


async def measure(postgres: Postgres, batches: int, per_batch: int) -> tuple[float, float]:
    """(PostgreSQL, client) CPU milliseconds per job."""
    db = await Database.connect(postgres.create_database("records"))
    try:
        await db.migrate()
        for number in range(20):  # warm up: plans cached, tables not empty
            await db.write(_batch(number, per_batch))
        server = psutil.Process(postgres_pid(postgres))
        server_start, client_start = _tree_cpu(server), time.process_time()
        for number in range(20, 20 + batches):
            await db.write(_batch(number, per_batch))
        jobs = batches * per_batch
        return (
            1000 * (_tree_cpu(server) - server_start) / jobs,
            1000 * (time.process_time() - client_start) / jobs,
        )
    finally:
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--per-batch", type=int, default=40)
    args = parser.parse_args()
    postgres = Postgres(Path(tempfile.mkdtemp(prefix="imagebus-records-")) / "pg").start()
    try:
        server_ms, client_ms = asyncio.run(measure(postgres, args.batches, args.per_batch))
    finally:
        postgres.stop()
    print(f"{args.batches} batches of {args.per_batch} jobs:")
    print(f"  postgres  {server_ms:.3f} CPU ms/job")
    print(f"  asyncpg   {client_ms:.3f} CPU ms/job")


if __name__ == "__main__":
    main()
