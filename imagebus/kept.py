"""A job's kept images in the results stream: reading its chunks back, choosing copies.

The orchestrator reads them (take-over, verification), and so does the client
(`ImageBusClient.fetch`). Any worker's key may publish into the stream
(protocol/results.py), so each reader passes a check: an assignment's MAC, or the
SHA-256 the image's worker reported. The copies that fail it are logged and passed over.
"""

from __future__ import annotations

import contextlib
import time
import uuid

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from structlog.typing import FilteringBoundLogger

from .protocol import results
from .protocol import subjects as s

Chunk = tuple[str, dict[str, str], bytes]  # subject, headers, payload

# Copies that fail the check, logged one by one per read; beyond, only counted.
_LOGGED_SKIPS = 10


async def read_chunks(
    nc: Client, job_id: str, index: int | None = None, timeout_s: float = 5.0
) -> list[Chunk]:
    """Every chunk kept for the job (or for its image `index`), in stream order: those
    stored when the read began. nats.js.errors.Error if there is no results stream."""
    # A short-lived pull consumer over this job's subjects only: it reads just the
    # job's chunks, at the speed of the fetch (no push flow-control stalls).
    js = nc.jetstream()
    config = ConsumerConfig(
        name=uuid.uuid4().hex,
        filter_subject=s.results_subject(job_id, index),
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
        inactive_threshold=30.0, mem_storage=True,
    )  # fmt: skip
    # Created here, not by pull_subscribe, for the count its answer holds: a job with
    # nothing kept costs no fetch timeout, and no CONSUMER.INFO (a requester's
    # credential may not ask it).
    created = await js.add_consumer(s.RESULTS_STREAM, config)
    pending = created.num_pending or 0
    subscription = await js.pull_subscribe_bind(stream=s.RESULTS_STREAM, name=created.name)
    chunks: list[Chunk] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(chunks) < pending and (left := deadline - time.monotonic()) > 0:
            try:
                batch = await subscription.fetch(batch=256, timeout=left)
            except (NatsTimeoutError, TimeoutError):
                break  # what is read so far is used
            chunks += [(m.subject, m.headers or {}, m.data) for m in batch]
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
    return chunks


def choose(
    chunks: list[Chunk], check: results.CopyCheck | None, log: FilteringBoundLogger
) -> results.Kept:
    """The images whole in `chunks` and passing `check` (None: the first whole copy of
    each), by index; the copies passed over are logged on `log`."""
    kept = results.assemble(chunks, check)
    for index, why in kept.skipped[:_LOGGED_SKIPS]:
        log.warning("kept copy not verified; skipped", index=index, reason=why)
    if len(kept.skipped) > _LOGGED_SKIPS:
        log.warning("kept copies not verified; skipped", count=len(kept.skipped))
    return kept
