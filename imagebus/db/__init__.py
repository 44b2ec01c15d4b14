"""PostgreSQL: versioned migrations, job records and the blacklist.

The only package that imports asyncpg; everything the orchestrator and the CLI use
is exported here.
"""

from .blacklist import BlacklistCache
from .history import fetch_recent_jobs
from .recorder import JobRecorder
from .store import (
    TRANSIENT_ERRORS,
    AttemptRecord,
    BlacklistEntry,
    Database,
    JobRow,
    Record,
    TaskUpdate,
    fetch_job_status,
    load_migrations,
)

__all__ = [
    "TRANSIENT_ERRORS",
    "AttemptRecord",
    "BlacklistCache",
    "BlacklistEntry",
    "Database",
    "JobRecorder",
    "JobRow",
    "Record",
    "TaskUpdate",
    "fetch_job_status",
    "fetch_recent_jobs",
    "load_migrations",
]
