"""The recent jobs, for dashboards (answered over the bus by an orchestrator)."""

from __future__ import annotations

from ..protocol.control import JobSummary
from .store import Database

_RECENT_JOBS = """
SELECT j.job_id, j.state, j.n, j.prompt, j.model, j.width, j.height, j.created_at,
       j.finished_at, j.orchestrator_id, c.succeeded, c.failed
FROM (SELECT * FROM jobs ORDER BY created_at DESC LIMIT $1) AS j,
     LATERAL (SELECT count(*) FILTER (WHERE t.state = 'done') AS succeeded,
                     count(*) FILTER (WHERE t.state = 'failed') AS failed
              FROM tasks AS t WHERE t.job_id = j.job_id) AS c
ORDER BY j.created_at DESC
"""


async def fetch_recent_jobs(db: Database, limit: int) -> list[JobSummary]:
    """The `limit` latest jobs as recorded, newest first."""
    async with db.pool.acquire() as conn:
        rows = await conn.fetch(_RECENT_JOBS, limit)
    return [
        JobSummary(
            job_id=row["job_id"],
            state=row["state"],
            n=row["n"],
            succeeded=row["succeeded"],
            failed=row["failed"],
            prompt=row["prompt"],
            model=row["model"],
            width=row["width"],
            height=row["height"],
            created_at=row["created_at"].isoformat(timespec="seconds"),
            finished_at=(
                row["finished_at"].isoformat(timespec="seconds") if row["finished_at"] else None
            ),
            orchestrator_id=row["orchestrator_id"],
        )
        for row in rows
    ]
