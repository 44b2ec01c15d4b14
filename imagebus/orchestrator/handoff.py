"""Taking over a job another orchestrator was serving when it died.

JetStream redelivers the request with the same job id and seeds. The images its
workers already made are kept in the results stream: they are read back, sent to
the requester again (its Job handle drops copies it already has) and recorded as
done, so that only the missing images are made.
"""

from __future__ import annotations

import contextlib

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ..protocol import results
from ..protocol import subjects as s


async def kept_images(nc: Client, job_id: str, timeout_s: float = 5.0) -> dict[int, bytes]:
    """The job's images kept in the results stream, by index (whole and checked only)."""
    js = nc.jetstream()
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        inactive_threshold=30.0,
        mem_storage=True,
    )
    subscription = await js.pull_subscribe(
        s.results_subject(job_id), stream=s.RESULTS_STREAM, config=config
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
    return results.assemble(stored)
