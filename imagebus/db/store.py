"""PostgreSQL access: migrations, job and task records, workers, the blacklist.

Only the orchestrator and the `imagebus blacklist` command talk to Postgres;
workers never do.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import asyncpg

from ..protocol import FINAL_TASK_STATES, ErrorCode, JobState, JobStatus, TaskState, TaskStatus

# Errors that mean "Postgres is not reachable right now": retry later, lose nothing.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,  # includes a connection that died under us
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up
)

MIGRATION_LOCK_ID = 0x1A6EB05  # any constant: serialises migrations between orchestrators
BLACKLIST_CHANNEL = "imagebus_blacklist"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("imagebus.db").joinpath("migrations").iterdir():
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    return sorted(found, key=lambda m: m.version)


@dataclass(frozen=True, slots=True)
class BlacklistEntry:
    worker_id: str
    reason: str
    added_at: datetime


@dataclass(frozen=True, slots=True)
class JobRow:
    job_id: str
    orchestrator_id: str
    dialect: str
    inbox: str
    prompt: str
    negative_prompt: str | None
    model: str | None
    width: int
    height: int
    steps: int
    guidance: float
    n: int
    created_at: datetime
    seeds: Sequence[int]


@dataclass(frozen=True, slots=True)
class TaskUpdate:
    """A change to one task's row; None fields leave the stored value as it is."""

    job_id: str
    index: int
    state: TaskState
    worker_id: str | None = None
    recruit_attempts: int | None = None
    assigned_at: datetime | None = None
    finished_at: datetime | None = None
    seconds: float | None = None
    error: str | None = None
    error_code: str | None = None
    sha256: str | None = None  # of the image made, as its worker reported it


_TASK_UPDATE_FIELDS = tuple(f.name for f in dataclasses.fields(TaskUpdate))


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One assignment of a task to a worker, and how it ended."""

    job_id: str
    index: int
    attempt: int
    worker_id: str
    outcome: str  # how the assignment ended (the orchestrator's AttemptOutcome)
    started_at: datetime
    ended_at: datetime
    error: str | None = None


Record = JobRow | TaskUpdate | AttemptRecord


class Database:
    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self.pool = pool
        self.url = url

    @classmethod
    async def connect(cls, url: str, *, min_size: int = 1, max_size: int = 4) -> Database:
        pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size)
        return cls(pool, url)

    async def close(self) -> None:
        await self.pool.close()

    async def migrate(self) -> list[int]:
        """Apply the migrations not yet applied; safe to run from many orchestrators."""
        applied_now = []
        async with self.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {
                    r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")
                }
                for migration in load_migrations():
                    if migration.version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(migration.sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                            migration.version,
                            migration.name,
                        )
                    applied_now.append(migration.version)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
        return applied_now

    # --- blacklist -----------------------------------------------------------------

    async def blacklisted_ids(self) -> set[str]:
        rows = await self.pool.fetch("SELECT worker_id FROM blacklist")
        return {r["worker_id"] for r in rows}

    async def blacklist(self) -> list[BlacklistEntry]:
        rows = await self.pool.fetch("SELECT * FROM blacklist ORDER BY added_at, worker_id")
        return [BlacklistEntry(r["worker_id"], r["reason"], r["added_at"]) for r in rows]

    async def add_to_blacklist(self, worker_id: str, reason: str = "") -> bool:
        """True if the id was not blacklisted before."""
        inserted = await self.pool.fetchval(
            "INSERT INTO blacklist (worker_id, reason) VALUES ($1, $2)"
            " ON CONFLICT (worker_id) DO UPDATE SET reason = EXCLUDED.reason"
            " RETURNING (xmax = 0)",
            worker_id,
            reason,
        )
        return bool(inserted)

    async def remove_from_blacklist(self, worker_id: str) -> bool:
        status = await self.pool.execute("DELETE FROM blacklist WHERE worker_id = $1", worker_id)
        return status == "DELETE 1"

    async def listen_blacklist(self, callback: Callable[[], Any]) -> asyncpg.Connection:
        """Call `callback` whenever the blacklist changes. Returns the listening connection."""
        conn: asyncpg.Connection = await asyncpg.connect(dsn=self.url)
        await conn.add_listener(BLACKLIST_CHANNEL, lambda *_: callback())
        return conn

    # --- job records (written behind by JobRecorder) -------------------------------

    async def write(self, records: Sequence[Record]) -> None:
        """Write a batch in one transaction, one pipelined statement per kind of record.

        Records are grouped by kind: jobs first (a job's row always comes before its
        tasks' updates), then each task's updates merged in order into one, then the
        attempts. A task whose job is new in this batch is inserted as it ends up, and
        its job with its state, instead of being inserted and then updated. The
        result is the same as applying the records one by one.
        """
        jobs = [r for r in records if isinstance(r, JobRow)]
        task_updates = [r for r in records if isinstance(r, TaskUpdate)]
        updates = _merge_task_updates(task_updates)
        attempts = [r for r in records if isinstance(r, AttemptRecord)]
        new_jobs = {j.job_id for j in jobs}
        folded = {(u.job_id, u.index): u for u in updates if u.job_id in new_jobs}
        later = [u for u in updates if u.job_id not in new_jobs]
        async with self.pool.acquire() as conn, conn.transaction():
            if jobs:
                await _insert_jobs(conn, jobs, folded)
            if later:
                await _update_tasks(conn, later)
            if updates:
                # From every update, not the merged ones: each finished task counts once
                # for the worker it names, as when written one by one.
                await _count_for_workers(conn, task_updates)
                await _settle_jobs(conn, sorted({u.job_id for u in updates}))
            if attempts:
                await _insert_attempts(conn, attempts)


def _merge_task_updates(updates: Iterable[TaskUpdate]) -> list[TaskUpdate]:
    """One update per task: the last state, and each field's last non-None value
    (as the UPDATE's COALESCE would leave it after applying them in order)."""
    merged: dict[tuple[str, int], TaskUpdate] = {}
    for update in updates:
        key = (update.job_id, update.index)
        earlier = merged.get(key)
        if earlier is None:
            merged[key] = update
            continue
        changes = {
            name: getattr(update, name)
            for name in _TASK_UPDATE_FIELDS
            if getattr(update, name) is not None
        }
        merged[key] = dataclasses.replace(earlier, **changes)
    return list(merged.values())


def _job_state(job: JobRow, folded: dict[tuple[str, int], TaskUpdate]) -> tuple[JobState, bool]:
    """A new job's state, and whether it is finished, from its tasks' updates in this
    batch: what _settle_jobs would make of them once inserted."""
    tasks = [folded.get((job.job_id, i)) for i in range(len(job.seeds))]
    if not any(tasks):
        return JobState.QUEUED, False
    if not all(t is not None and t.state in FINAL_TASK_STATES for t in tasks):
        return JobState.RUNNING, False
    failed = sum(t is not None and t.state == TaskState.FAILED for t in tasks)
    cancelled = sum(t is not None and t.error_code == ErrorCode.CANCELLED for t in tasks)
    if failed == 0:
        return JobState.DONE, True
    if cancelled == len(tasks):
        return JobState.CANCELLED, True
    return (JobState.FAILED if failed == len(tasks) else JobState.PARTIAL), True


async def _insert_jobs(
    conn: asyncpg.Connection, jobs: Sequence[JobRow], folded: dict[tuple[str, int], TaskUpdate]
) -> None:
    """New jobs and their tasks, with the updates they already have in this batch.

    A job served again after its orchestrator was lost is already there: its job row
    is left for _settle_jobs, and its tasks are updated as _update_tasks would.
    """
    rows = []
    for j in jobs:
        state, finished = _job_state(j, folded)
        rows.append(
            (
                j.job_id, j.orchestrator_id, j.dialect, j.inbox, j.prompt, j.negative_prompt,
                j.model, j.width, j.height, j.steps, j.guidance, j.n, j.created_at, state,
                finished,
            )
        )  # fmt: skip
    await conn.executemany(
        "INSERT INTO jobs (job_id, orchestrator_id, dialect, inbox, prompt,"
        " negative_prompt, model, width, height, steps, guidance, n, created_at,"
        " state, finished_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,"
        " $14, CASE WHEN $15::boolean THEN now() END)"
        " ON CONFLICT (job_id) DO NOTHING",
        rows,
    )
    untouched = []
    touched = []
    for j in jobs:
        for i, seed in enumerate(j.seeds):
            u = folded.get((j.job_id, i))
            if u is None:
                untouched.append((j.job_id, i, seed))
            else:
                touched.append((*_task_changes(u), seed))
    if untouched:
        await conn.executemany(
            "INSERT INTO tasks (job_id, task_index, seed) VALUES ($1, $2, $3)"
            " ON CONFLICT (job_id, task_index) DO NOTHING",
            untouched,
        )
    if touched:
        # A task already there (its job served again) is updated as _update_tasks would.
        await conn.executemany(
            "INSERT INTO tasks (job_id, task_index, state, worker_id, recruit_attempts,"
            " assigned_at, finished_at, seconds, error, error_code, sha256, seed)"
            " VALUES ($1, $2, $3, $4, COALESCE($5, 0), $6, $7, $8, $9, $10, $11, $12)"
            f" ON CONFLICT (job_id, task_index) DO UPDATE SET {_TASK_CHANGES}",
            touched,
        )


# What a TaskUpdate changes, from _task_changes' $1..$11: each field only if given.
_TASK_CHANGES = (
    "state = $3,"
    " worker_id = COALESCE($4, tasks.worker_id),"
    " recruit_attempts = COALESCE($5, tasks.recruit_attempts),"
    " assigned_at = COALESCE($6, tasks.assigned_at),"
    " finished_at = COALESCE($7, tasks.finished_at),"
    " seconds = COALESCE($8, tasks.seconds),"
    " error = COALESCE($9, tasks.error),"
    " error_code = COALESCE($10, tasks.error_code),"
    " sha256 = COALESCE($11, tasks.sha256)"
)


def _task_changes(u: TaskUpdate) -> tuple[Any, ...]:
    return (
        u.job_id, u.index, u.state, u.worker_id, u.recruit_attempts, u.assigned_at,
        u.finished_at, u.seconds, u.error, u.error_code, u.sha256,
    )  # fmt: skip


async def _update_tasks(conn: asyncpg.Connection, updates: Sequence[TaskUpdate]) -> None:
    await conn.executemany(
        f"UPDATE tasks SET {_TASK_CHANGES} WHERE job_id = $1 AND task_index = $2",
        [_task_changes(u) for u in updates],
    )


async def _count_for_workers(conn: asyncpg.Connection, updates: Sequence[TaskUpdate]) -> None:
    """Finished tasks per worker: one row change per worker and batch, not per task."""
    done: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for u in updates:
        if u.worker_id and u.state in FINAL_TASK_STATES:
            (done if u.state == TaskState.DONE else failed)[u.worker_id] += 1
    if done or failed:
        await conn.executemany(
            "INSERT INTO workers (worker_id, tasks_done, failures) VALUES ($1, $2, $3)"
            " ON CONFLICT (worker_id) DO UPDATE SET last_seen = now(),"
            " tasks_done = workers.tasks_done + EXCLUDED.tasks_done,"
            " failures = workers.failures + EXCLUDED.failures",
            [(w, done[w], failed[w]) for w in sorted(done.keys() | failed.keys())],
        )


async def _settle_jobs(conn: asyncpg.Connection, job_ids: Sequence[str]) -> None:
    """A job is finished once none of its tasks is still open, running once one is
    assigned. (New jobs were inserted so: this only reads their tasks.)

    One statement per job, each on the primary keys. Statements over all the
    batch's jobs at once (`job_id = ANY($1)`, a GROUP BY) were planned as scans of
    whole tables whenever the statistics were missing or stale (a new database, a
    busy minute): every batch cost more than the one before (`python -m
    bench.records`: 0.110 -> 0.215 CPU ms per job from the first to the last third).
    """
    await conn.executemany(
        "UPDATE jobs SET state = CASE WHEN agg.open > 0 THEN 'running'"
        "   WHEN agg.failed = 0 THEN 'done'"
        "   WHEN agg.cancelled = agg.total THEN 'cancelled'"
        "   WHEN agg.failed = agg.total THEN 'failed' ELSE 'partial' END,"
        " finished_at = CASE WHEN agg.open = 0 THEN now() END"
        " FROM (SELECT count(*) AS total,"
        "        count(*) FILTER (WHERE state = 'failed') AS failed,"
        "        count(*) FILTER (WHERE error_code = 'cancelled') AS cancelled,"
        "        count(*) FILTER (WHERE state NOT IN ('done', 'failed')) AS open"
        "       FROM tasks WHERE job_id = $1) AS agg"
        " WHERE jobs.job_id = $1 AND agg.total > 0 AND jobs.finished_at IS NULL"
        " AND (agg.open = 0 OR jobs.state = 'queued')",
        [(job_id,) for job_id in job_ids],
    )


async def _insert_attempts(conn: asyncpg.Connection, attempts: Sequence[AttemptRecord]) -> None:
    await conn.executemany(
        "INSERT INTO task_attempts (job_id, task_index, attempt, worker_id, outcome,"
        " started_at, ended_at, error) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT DO NOTHING",
        [
            (
                a.job_id,
                a.index,
                a.attempt,
                a.worker_id,
                a.outcome,
                a.started_at,
                a.ended_at,
                a.error,
            )
            for a in attempts
        ],
    )


async def fetch_job_status(db: Database, job_id: str) -> JobStatus | None:
    """The job's status as recorded (no live progress: steps are 0); None if unknown."""
    async with db.pool.acquire() as conn:
        job = await conn.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)
        if job is None:
            return None
        tasks = await conn.fetch(
            "SELECT * FROM tasks WHERE job_id = $1 ORDER BY task_index", job_id
        )
        rows = await conn.fetch(
            "SELECT task_index, count(*) AS n FROM task_attempts WHERE job_id = $1"
            " GROUP BY task_index",
            job_id,
        )
    attempts = {r["task_index"]: r["n"] for r in rows}
    statuses = [
        TaskStatus(
            index=t["task_index"],
            seed=t["seed"],
            state=TaskState(t["state"]),
            worker_id=t["worker_id"],
            seconds=t["seconds"],
            error=t["error"],
            attempts=attempts.get(t["task_index"], 0),
            steps=job["steps"],
            sha256=t["sha256"],
        )
        for t in tasks
    ]
    return JobStatus(
        job_id=job_id,
        state=JobState(job["state"]),
        n=job["n"],
        succeeded=sum(t.state == TaskState.DONE for t in statuses),
        failed=sum(t.state == TaskState.FAILED for t in statuses),
        prompt=job["prompt"],
        created_at=job["created_at"].isoformat(),
        finished_at=job["finished_at"].isoformat() if job["finished_at"] else None,
        tasks=statuses,
    )
