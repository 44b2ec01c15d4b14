"""PostgreSQL: versioned migrations, job records and the blacklist."""

from .recorder import JobRecorder
from .store import (
    AttemptRecord,
    BlacklistEntry,
    Database,
    JobRow,
    Record,
    TaskUpdate,
    load_migrations,
)

__all__ = [
    "AttemptRecord",
    "BlacklistEntry",
    "Database",
    "JobRecorder",
    "JobRow",
    "Record",
    "TaskUpdate",
    "load_migrations",
]
