"""Reading a job's kept images back from the results stream (take-over, verification).

With the job's secret, only copies MAC'd by one of the image's assignments are used
(any worker's key may publish into the stream: protocol/results.py); the others are
logged and skipped. Without one (the prototype's clients), the first whole copy wins.
"""

from __future__ import annotations

from nats.aio.client import Client
from structlog.typing import FilteringBoundLogger

from ..kept import choose, read_chunks
from ..protocol import results


async def read_kept(
    nc: Client,
    job_id: str,
    secret: bytes | None,
    log: FilteringBoundLogger,
    index: int | None = None,
    timeout_s: float = 5.0,
    sha256: str | None = None,
) -> dict[int, bytes]:
    """The job's kept images (or image `index` only), by index: whole, checked by
    SHA-256 and, with the job's secret, by their assignment's MAC; with `index` and
    `sha256`, only the copy with that digest (the one its worker reported: another
    attempt's copy of the same image, made by another worker, is not this worker's)."""
    chunks = await read_chunks(nc, job_id, index, timeout_s)
    verified = None if secret is None else results.verified_by(secret, job_id)
    worker_made = None if not sha256 or index is None else results.reported({index: sha256})
    return choose(chunks, results.every(worker_made, verified), log.bind(job_id=job_id)).images
