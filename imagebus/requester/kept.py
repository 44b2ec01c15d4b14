"""Reading a job's kept images from the results stream, for `ImageBusClient.fetch`.

With the job's secret, only copies MAC'd by one of the image's assignments are taken
(any worker's key may publish into the stream: protocol/results.py); the others are
logged and passed over. Without it, the first whole copy of each image is taken.
"""

from __future__ import annotations

import contextlib
import time

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ..logs import get_logger
from ..protocol import results
from ..protocol import subjects as s
from .job import ImageBusError

_LOGGED_SKIPS = 10  # unverified copies logged one by one per read; beyond, counted


async def read_kept(nc: Client, job_id: str, secret: bytes | None, timeout: float) -> results.Kept:
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
    check = None if secret is None else results.verified_by(secret, job_id)
    kept = results.assemble(stored, check)
    log = get_logger(job_id=job_id)
    for index, why in kept.skipped[:_LOGGED_SKIPS]:
        log.warning("kept copy not verified; skipped", index=index, reason=why)
    if len(kept.skipped) > _LOGGED_SKIPS:
        log.warning("kept copies not verified; skipped", count=len(kept.skipped))
    return kept
