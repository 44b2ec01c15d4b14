"""The client's side of reading a job's kept images (`ImageBusClient.fetch`).

Reading and choosing copies is imagebus/kept.py's; here, what the client adds: the
error a caller sees, and the check against the SHA-256 its worker reported, as the
job's records hold it (`recorded`), for a fetch without the job's secret.
"""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client

from ..kept import Chunk, read_chunks
from ..protocol import JobStatus, results
from .job import ImageBusError


async def read_stored(nc: Client, job_id: str, timeout: float) -> list[Chunk]:
    """Every chunk kept for the job, as (subject, headers, payload), in stream order."""
    try:
        return await read_chunks(nc, job_id, timeout_s=timeout)
    except (nats.errors.Error, TimeoutError) as exc:  # no results stream yet, say
        raise ImageBusError(f"no results kept for job {job_id}: {exc}", "not_found") from None


def recorded(status: JobStatus) -> results.CopyCheck:
    """The check of kept copies against the digests the job's records hold (an image
    whose digest is not recorded, not yet written or older than the digests: taken
    unchecked)."""
    return results.reported({task.index: task.sha256 for task in status.tasks if task.sha256})
