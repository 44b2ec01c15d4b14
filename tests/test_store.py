"""The write-behind store: a batch written at once leaves what one-by-one writes leave."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from imagebus.db import AttemptRecord, Database, JobRow, Record, TaskUpdate

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _job(job_id: str, n: int = 2) -> JobRow:
    seeds = list(range(5, 5 + n))
    return JobRow(
        job_id, "orch", "native", "_INBOX.x", "a cat", None, None, 64, 64, 2, 7.5, n, T0, seeds
    )


def _partial(job_id: str) -> list[Record]:
    """Two images: one re-assigned after its worker was lost, then done; one failed."""
    return [
        _job(job_id),
        TaskUpdate(job_id, 0, "running", worker_id="w1", recruit_attempts=1, assigned_at=T0),
        TaskUpdate(job_id, 1, "running", worker_id="w2", recruit_attempts=3, assigned_at=T0),
        AttemptRecord(job_id, 0, 1, "w1", "lost", T0, T0 + timedelta(seconds=3), "worker lost"),
        TaskUpdate(job_id, 0, "running", worker_id="w3", assigned_at=T0 + timedelta(seconds=3)),
        TaskUpdate(job_id, 1, "failed", finished_at=T0, error="boom", error_code="failed"),
        AttemptRecord(job_id, 0, 2, "w3", "done", T0, T0 + timedelta(seconds=4), None),
        TaskUpdate(job_id, 0, "done", worker_id="w3", finished_at=T0, seconds=1.5),
    ]


def _running(job_id: str) -> list[Record]:
    """Three images: one done, one running, one not yet assigned."""
    return [
        _job(job_id, 3),
        TaskUpdate(job_id, 0, "running", worker_id="w1", recruit_attempts=1, assigned_at=T0),
        TaskUpdate(job_id, 0, "done", worker_id="w1", finished_at=T0, seconds=1.0),
        TaskUpdate(job_id, 1, "running", worker_id="w2", recruit_attempts=1, assigned_at=T0),
    ]


def _cancelled(job_id: str) -> list[Record]:
    return [
        _job(job_id),
        *(
            TaskUpdate(job_id, i, "failed", finished_at=T0, error="x", error_code="cancelled")
            for i in range(2)
        ),
    ]


def _queued(job_id: str) -> list[Record]:
    return [_job(job_id)]


def _served_again(job_id: str) -> list[Record]:
    """Its orchestrator was lost mid-job: another serves the request again from the
    start (the same job row again), and this time it finishes, one image failing
    with no worker (the task keeps the fields the first serving gave it)."""
    return [
        *_running(job_id),
        _job(job_id, 3),
        TaskUpdate(job_id, 0, "done", worker_id="w4", recruit_attempts=2, finished_at=T0),
        TaskUpdate(job_id, 1, "failed", finished_at=T0, error="no slot", error_code="timeout"),
        TaskUpdate(job_id, 2, "done", worker_id="w4", recruit_attempts=1, finished_at=T0),
    ]


async def _rows(db: Database, job_id: str) -> tuple[list[dict[str, object]], ...]:
    async with db.pool.acquire() as conn:
        job = await conn.fetch(
            "SELECT state, finished_at IS NOT NULL AS finished FROM jobs WHERE job_id = $1",
            job_id,
        )
        tasks = await conn.fetch(
            "SELECT task_index, seed, state, worker_id, recruit_attempts, assigned_at,"
            " finished_at, seconds, error, error_code FROM tasks WHERE job_id = $1"
            " ORDER BY task_index",
            job_id,
        )
        attempts = await conn.fetch(
            "SELECT task_index, attempt, worker_id, outcome FROM task_attempts"
            " WHERE job_id = $1 ORDER BY task_index, attempt",
            job_id,
        )
    return tuple([dict(r) for r in rows] for rows in (job, tasks, attempts))


async def _worker_counts(db: Database) -> dict[str, tuple[int, int]]:
    rows = await db.pool.fetch("SELECT worker_id, tasks_done, failures FROM workers")
    return {r["worker_id"]: (r["tasks_done"], r["failures"]) for r in rows}


@pytest.mark.parametrize(
    ("records", "job_state"),
    [
        (_partial, ("partial", True)),
        (_running, ("running", False)),
        (_cancelled, ("cancelled", True)),
        (_queued, ("queued", False)),
        (_served_again, ("partial", True)),
    ],
)
async def test_a_batch_leaves_the_same_rows_as_writing_records_one_by_one(
    database_url: str, records: Callable[[str], list[Record]], job_state: tuple[str, bool]
) -> None:
    db = await Database.connect(database_url)
    try:
        await db.migrate()
        await db.write(records("batched"))
        counted_batched = await _worker_counts(db)
        await db.pool.execute("DELETE FROM workers")
        for record in records("one-by-one"):
            await db.write([record])
        counted_one_by_one = await _worker_counts(db)
        # Served again: the first serving's records were written in an earlier batch.
        if records is _served_again:
            first = _running("split")
            await db.write(first)
            await db.write(records("split")[len(first) :])
            assert await _rows(db, "split") == await _rows(db, "one-by-one")
        batched = await _rows(db, "batched")
        one_by_one = await _rows(db, "one-by-one")
    finally:
        await db.close()
    assert batched == one_by_one
    assert counted_batched == counted_one_by_one
    job, tasks, attempts = batched
    assert job == [{"state": job_state[0], "finished": job_state[1]}]
    if records is _partial:
        assert [(t["state"], t["worker_id"], t["recruit_attempts"]) for t in tasks] == [
            ("done", "w3", 1),
            ("failed", "w2", 3),
        ]
        assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "lost"), (2, "done")]
    if records is _served_again:
        assert [(t["state"], t["worker_id"], t["assigned_at"]) for t in tasks] == [
            ("done", "w4", T0),
            ("failed", "w2", T0),
            ("done", "w4", None),
        ]


async def test_a_batch_counts_a_worker_s_tasks_as_one_by_one_writes_do(database_url: str) -> None:
    def finished_by(worker_id: str) -> list[Record]:
        records: list[Record] = []
        for i, state in enumerate(("done", "failed", "done")):
            job_id = f"{worker_id}-{i}"
            records.append(
                JobRow(job_id, "orch", "native", "_INBOX.x", "a", None, None, 64, 64, 2, 7.5, 1,
                       T0, [i])
            )  # fmt: skip
            records.append(TaskUpdate(job_id, 0, state, worker_id=worker_id, finished_at=T0))
        return records

    db = await Database.connect(database_url)
    try:
        await db.migrate()
        await db.write(finished_by("w-batched"))
        for record in finished_by("w-single"):
            await db.write([record])
        async with db.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT worker_id, tasks_done, failures FROM workers"
                " WHERE worker_id IN ('w-batched', 'w-single') ORDER BY worker_id"
            )
    finally:
        await db.close()
    assert [tuple(r) for r in rows] == [("w-batched", 2, 1), ("w-single", 2, 1)]
