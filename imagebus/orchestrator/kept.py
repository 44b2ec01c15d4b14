"""Reading a job's kept images back from the results stream (take-over, verification).

With the job's secret, only copies MAC'd by one of the image's assignments are used
(any worker's key may publish into the stream: protocol/results.py); the others are
logged and skipped. Without one (the prototype's clients), the first whole copy wins.
"""

from __future__ import annotations

import contextlib

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from structlog.typing import FilteringBoundLogger

from ..protocol import results
from ..protocol import subjects as s

# Unverified copies logged one by one per read; beyond, only counted.
_LOGGED_SKIPS = 10


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
    js = nc.jetstream()
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
        inactive_threshold=30.0, mem_storage=True,
    )  # fmt: skip
    subscription = await js.pull_subscribe(
        s.results_subject(job_id, index), stream=s.RESULTS_STREAM, config=config
    )
    stored: list[tuple[str, dict[str, str], bytes]] = []
    try:
        # Asked first, so that a job with nothing kept costs no fetch timeout.
        pending = (await subscription.consumer_info()).num_pending or 0
        while len(stored) < pending:
            try:
                batch = await subscription.fetch(batch=256, timeout=timeout_s)
            except (NatsTimeoutError, TimeoutError):
                break  # what is read so far is used
            stored += [(m.subject, m.headers or {}, m.data) for m in batch]
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
    verified = None if secret is None else results.verified_by(secret, job_id)
    worker_made = None if not sha256 or index is None else results.reported({index: sha256})
    kept = results.assemble(stored, results.every(worker_made, verified))
    log = log.bind(job_id=job_id)
    for skipped_index, why in kept.skipped[:_LOGGED_SKIPS]:
        log.warning("kept copy not verified; skipped", index=skipped_index, reason=why)
    if len(kept.skipped) > _LOGGED_SKIPS:
        log.warning("kept copies not verified; skipped", count=len(kept.skipped))
    return kept.images
