"""Taking over a job another orchestrator was serving when it died.

JetStream redelivers the request with the same job id and seeds. The images still
being made on workers are adopted: their workers report here from now on
(adoption.py). The images its workers already made are kept in the results stream:
they are read back (with the job's secret, only copies MAC'd by the image's
assignment: kept.py), sent to the requester again (its Job handle drops copies it
already has) and recorded as done. Only the rest are made.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.client import Client
from structlog.typing import FilteringBoundLogger

from ..db import Record, TaskUpdate
from ..protocol import TaskResult, TaskState, events
from ..protocol.events import Outbound
from .adoption import adopt_running_tasks
from .jobs import RunningJob
from .kept import read_kept
from .watch import Watch


@dataclass(frozen=True, slots=True)
class Takeover:
    """What is left of a job taken over: the indexes to run (those not kept), of
    which `adopted` already run on a worker, by index."""

    indexes: list[int]
    adopted: dict[int, str]


async def take_over(
    nc: Client,
    job: RunningJob,
    orchestrator_id: str,
    live_workers: Collection[str],
    watches: dict[tuple[str, int], Watch],
    send: Callable[[Outbound], Awaitable[None]],
    record: Callable[[Record], None],
    log: FilteringBoundLogger,
) -> Takeover:
    """Adopt the job's running tasks, answer its kept images again, say what is left."""
    # Adopted first: an image that finishes meanwhile is then kept, and read below.
    adopted = await adopt_running_tasks(
        nc, job.job_id, orchestrator_id,
        unanswered=range(job.request.n), live_workers=live_workers, watches=watches,
    )  # fmt: skip
    try:
        kept = await read_kept(nc, job.job_id, job.secret, log)
    except Exception as exc:  # no results stream, say: make them all again
        log.warning("kept images not readable; making every image", error=repr(exc))
        kept = {}
    params = job.request.params
    for index, png in kept.items():
        if not 0 <= index < job.request.n or index in adopted:
            continue  # an adopted task's worker delivers its image and reports it
        result = TaskResult(
            job.job_id, index, ok=True, seed=job.seeds[index], png=png,
            width=params.width, height=params.height,
        )  # fmt: skip
        digest = hashlib.sha256(png).hexdigest()
        _, messages = events.result_messages(
            job.dialect, job.inbox, result, nc.max_payload, job.event_key, digest
        )
        for out in messages:
            await send(out)
        job.answered.add(index)
        record(
            TaskUpdate(
                job.job_id, index, TaskState.DONE, finished_at=datetime.now(UTC), sha256=digest
            )
        )
    left = [i for i in range(job.request.n) if i not in job.answered]
    log.info(
        "job taken over",
        images_kept=len(job.answered),
        images_adopted=len(adopted),
        images_to_make=len(left) - len(adopted),
    )
    return Takeover(left, adopted)
