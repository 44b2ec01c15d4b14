"""Durable intake: requests on `img-gen` are kept in a JetStream stream until served.

The stream captures every publish on `img-gen` (the prototype's plain publishes
included), with work-queue retention: a request stays stored until an
orchestrator acknowledges it, and it acknowledges only once every image of the
job has been answered. While a job runs its message is kept "in progress"; if
the orchestrator dies, JetStream redelivers the request after `ack_wait` to
another (or the restarted) orchestrator. All orchestrators pull from one durable
consumer, so each request goes to exactly one of them at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from ..logs import get_logger
from ..protocol import subjects as s

_JOB_NAMESPACE = uuid.UUID("6f1d7c1e-6a0b-4d35-9a53-4a2f1e0b9c11")


async def ensure_intake_stream(js: JetStreamContext, max_age_s: float) -> str:
    """Create the stream if missing; returns an epoch that tells apart re-created streams."""
    config = StreamConfig(
        name=s.INTAKE_STREAM,
        subjects=[s.REQUEST_SUBJECT],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_age=max_age_s,
        duplicate_window=120.0,
    )
    try:
        info = await js.stream_info(s.INTAKE_STREAM)
    except nats.js.errors.NotFoundError:
        info = await js.add_stream(config)
    created = info.created or ""
    return hashlib.sha256(str(created).encode()).hexdigest()[:12]


def job_id_for(msg: Msg, epoch: str) -> str:
    """Stable across redeliveries, so a re-served job keeps its id and seeds."""
    sequence = msg.metadata.sequence.stream
    return uuid.uuid5(_JOB_NAMESPACE, f"{epoch}:{sequence}").hex


class Intake:
    def __init__(
        self,
        js: JetStreamContext,
        handle: Callable[[Msg, str], Awaitable[None]],
        *,
        capacity: int,
        ack_wait_s: float,
        max_deliver: int,
        max_age_s: float,
    ) -> None:
        self.js = js
        self.handle = handle
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.max_age_s = max_age_s
        self._capacity = capacity
        self._slot_freed = asyncio.Event()
        self._running: dict[asyncio.Task[None], Msg] = {}
        self._puller: asyncio.Task[None] | None = None
        self._subscription: JetStreamContext.PullSubscription | None = None
        self._epoch = ""
        self.served = 0  # requests served to the end and acknowledged
        self._log = get_logger(component="intake")

    @property
    def running(self) -> int:
        return len(self._running)

    async def start(self) -> None:
        self._epoch = await ensure_intake_stream(self.js, self.max_age_s)
        config = ConsumerConfig(
            durable_name=s.INTAKE_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=-1,
        )
        with contextlib.suppress(nats.js.errors.Error):
            await self.js.add_consumer(s.INTAKE_STREAM, config)  # create, or update its settings
        self._subscription = await self.js.pull_subscribe(
            s.REQUEST_SUBJECT, durable=s.INTAKE_CONSUMER, stream=s.INTAKE_STREAM, config=config
        )
        self._puller = asyncio.create_task(self._pull(self._subscription), name="imagebus-intake")

    async def stop(self, grace_s: float) -> None:
        """Stop pulling; give running jobs `grace_s`, then hand the rest back at once."""
        if self._puller is not None:
            self._puller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._puller
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()  # the durable consumer stays
        if self._running:
            self._log.info("draining jobs", running=len(self._running))
            _, pending = await asyncio.wait(self._running, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _pull(self, subscription: JetStreamContext.PullSubscription) -> None:
        while True:
            while len(self._running) >= self._capacity:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            free = min(self._capacity - len(self._running), 64)
            try:
                messages = await subscription.fetch(batch=free, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                messages = []
            except Exception as exc:  # reconnecting, server restarting: try again shortly
                self._log.warning("fetching requests failed; retrying", error=repr(exc))
                messages = []
                await asyncio.sleep(0.5)
            for message in messages:
                task = asyncio.create_task(self._serve(message))
                self._running[task] = message
                task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._slot_freed.set()

    async def _serve(self, msg: Msg) -> None:
        keepalive = _InProgress(msg, self.ack_wait_s / 3)
        try:
            await self.handle(msg, job_id_for(msg, self._epoch))
        except asyncio.CancelledError:
            # Shutting down mid-job: hand the request to another orchestrator now.
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        except Exception as exc:
            self._log.exception("serving a request failed; it will be redelivered", error=repr(exc))
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)
            return
        finally:
            keepalive.cancel()
        with contextlib.suppress(Exception):
            await msg.ack()
        self.served += 1


class _InProgress:
    """Tells JetStream every `every_s` that a request is still being served, so it is
    not redelivered meanwhile. A timer, not a task: most jobs end before it fires."""

    def __init__(self, msg: Msg, every_s: float) -> None:
        self.msg = msg
        self.every_s = every_s
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(every_s, self._fire)
        self._sending: asyncio.Task[None] | None = None

    def _fire(self) -> None:
        self._sending = self._loop.create_task(self._send())
        self._timer = self._loop.call_later(self.every_s, self._fire)

    async def _send(self) -> None:
        with contextlib.suppress(Exception):
            await self.msg.in_progress()

    def cancel(self) -> None:
        self._timer.cancel()
        if self._sending is not None:
            self._sending.cancel()
