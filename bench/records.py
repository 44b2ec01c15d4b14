"""What recording jobs costs PostgreSQL: CPU per job of the recorder's batch writes.

    python -m bench.records [--batches 150] [--per-batch 40]

Writes batches like the orchestrator's recorder does under load (about 40 jobs
per 50 ms at 800 jobs/s): per job its row, a "running" and a "done" update of its
one task, and one attempt; half the jobs end in the batch after the one they
started in. Prints PostgreSQL's CPU milliseconds per job (its whole process
tree) and this process's (the asyncpg side), measured alone, without the rest of
the bus sharing the cores: over all batches, and over the first and the last
third of them, since the cost of a batch must not grow with the tables.
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
from imagebus.protocol import TaskState

from .harness import postgres_pid, tree_cpu


def _ending(job_id: str, worker_id: str, now: datetime) -> list[Record]:
    return [
        AttemptRecord(job_id, 0, 1, worker_id, "done", now, now),
        TaskUpdate(job_id, 0, TaskState.DONE, worker_id, finished_at=now, seconds=0.001),
    ]


def _batch(number: int, jobs: int) -> list[Record]:
    now = datetime.now(UTC)
    records: list[Record] = []
    for i in range(jobs):
        job_id, worker_id = f"job-{number}-{i}", f"worker-{i % 16}"
        records += [
            JobRow(job_id, "o", "native", "_INBOX.x", "p", None, None, 64, 64, 2, 7.5, 1, now, [i]),
            TaskUpdate(
                job_id, 0, TaskState.RUNNING, worker_id, recruit_attempts=1, assigned_at=now
            ),
        ]
        if i % 2 == 0:
            records += _ending(job_id, worker_id, now)
        elif number > 0:  # this one's twin in the last batch ends now
            records += _ending(f"job-{number - 1}-{i}", worker_id, now)
    return records


async def measure(postgres: Postgres, batches: int, per_batch: int) -> list[tuple[float, float]]:
    """(PostgreSQL, client) CPU milliseconds per job, for each third of the batches."""
    db = await Database.connect(postgres.create_database("records"))
    try:
        await db.migrate()
        for number in range(20):  # warm up: plans cached, tables not empty
            await db.write(_batch(number, per_batch))
        server = psutil.Process(postgres_pid(postgres))
        thirds = []
        numbers = range(20, 20 + batches)
        for third in (numbers[: batches // 3], numbers[batches // 3 : -(batches // 3)],
                      numbers[-(batches // 3) :]):  # fmt: skip
            server_start, client_start = tree_cpu(server), time.process_time()
            for number in third:
                await db.write(_batch(number, per_batch))
            jobs = len(third) * per_batch
            thirds.append(
                (
                    1000 * (tree_cpu(server) - server_start) / jobs,
                    1000 * (time.process_time() - client_start) / jobs,
                )
            )
        return thirds
    finally:
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--per-batch", type=int, default=40)
    args = parser.parse_args()
    postgres = Postgres(Path(tempfile.mkdtemp(prefix="imagebus-records-")) / "pg").start()
    try:
        thirds = asyncio.run(measure(postgres, args.batches, args.per_batch))
    finally:
        postgres.stop()
    print(f"{args.batches} batches of {args.per_batch} jobs, CPU ms per job:")
    print("            all     first third  last third")
    for name, part in (("postgres", 0), ("asyncpg", 1)):
        costs = [third[part] for third in thirds]
        print(f"  {name:9s} {sum(costs) / 3:.3f}   {costs[0]:.3f}        {costs[-1]:.3f}")


if __name__ == "__main__":
    main()
