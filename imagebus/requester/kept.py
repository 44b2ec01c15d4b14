"""Reading a job's kept images from the results stream, for `ImageBusClient.fetch`.

Any worker's key may publish into the stream (protocol/results.py), so a copy is
checked before it is taken: with the job's secret, by its assignment's MAC; without
it, against the SHA-256 its worker reported, as the job's records hold it
(`recorded`). The copies that fail are logged and passed over.
"""

from __future__ import annotations

import contextlib
import time

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ..logs import get_logger
from ..protocol import JobStatus, results
from ..protocol import subjects as s
from .job import ImageBusError

_LOGGED_SKIPS = 10  # unverified copies logged one by one per read; beyond, counted


async def read_stored(
    nc: Client, job_id: str, timeout: float
) -> list[tuple[str, dict[str, str], bytes]]:
    """Every chunk kept for the job, as (subject, headers, payload), in stream order."""
    js = nc.jetstream()
    # A short-lived pull consumer over this job's subjects only: it reads just
    # the job's chunks, at the speed of the fetch (no push flow-control stalls).
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        inactive_threshold=30.0,
        mem_storage=True,
    )
    try:
        subscription = await js.pull_subscribe(
            s.results_subject(job_id), stream=s.RESULTS_STREAM, config=config
        )
    except Exception as exc:  # no results stream yet (no orchestrator ever ran)
        raise ImageBusError(f"no results kept for job {job_id}: {exc}", "not_found") from None
    stored: list[tuple[str, dict[str, str], bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                batch = await subscription.fetch(batch=256, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                break  # nothing (more) stored for this job
            stored += [(m.subject, m.headers or {}, m.data) for m in batch]
            if batch and batch[-1].metadata.num_pending == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
    return stored


def recorded(status: JobStatus) -> results.CopyCheck:
    """The check of kept copies against the digests the job's records hold (an image
    whose digest is not recorded, not yet written or older than the digests: taken
    unchecked)."""
    return results.reported({task.index: task.sha256 for task in status.tasks if task.sha256})


def choose(
    job_id: str,
    stored: list[tuple[str, dict[str, str], bytes]],
    check: results.CopyCheck | None,
) -> results.Kept:
    """The job's images from its stored chunks, the copies that fail `check` logged."""
    kept = results.assemble(stored, check)
    log = get_logger(job_id=job_id)
    for index, why in kept.skipped[:_LOGGED_SKIPS]:
        log.warning("kept copy not verified; skipped", index=index, reason=why)
    if len(kept.skipped) > _LOGGED_SKIPS:
        log.warning("kept copies not verified; skipped", count=len(kept.skipped))
    return kept
