"""Durable intake: requests on `img-gen` are kept in a JetStream stream until served.

The stream captures every publish on `img-gen` (the prototype's plain publishes
included), with work-queue retention: a request stays stored until an
orchestrator acknowledges it, and it acknowledges only once every image of the
job has been answered. While a job runs its message is kept "in progress"; if
the orchestrator dies, JetStream redelivers the request after `ack_wait` to
another (or the restarted) orchestrator. All orchestrators pull from one durable
consumer, so each request goes to exactly one of them at a time.

Each orchestrator keeps pull requests standing (as nats.go's `Consume` does): it
asks for up to `_PULL_BATCH` requests ahead, never more than its free capacity,
and each arrives on its inbox the moment it is stored. No fetch round trip sits on
the dispatch path, and an orchestrator is sent no more than it can take. While
`pause_reason` gives a reason, it asks for none: requests wait in the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    Header,
    RetentionPolicy,
    StatusCode,
    StorageType,
    StreamConfig,
)

from ..logs import get_logger
from ..protocol import subjects as s
from ..protocol.request import REQUEST_DEDUP_WINDOW_S, REQUEST_HEADER_ROOM_BYTES
from ..tasks import stop_task, stop_tasks, wait_event


@dataclass(frozen=True)
class IntakeLimits:
    """Bounds on what the request stream stores, so that requests cannot fill the disk."""

    max_request_bytes: int  # a request's payload (Limits.max_payload_bytes)
    max_bytes: int  # all requests stored together
    max_msgs: int
    max_age_s: float  # requests not served within this long are dropped


async def ensure_intake_stream(js: JetStreamContext, limits: IntakeLimits) -> str:
    """Create the stream if missing, or bring an existing one (an older version's, say)
    to `limits`; returns an epoch that tells apart re-created streams.

    A full stream refuses new requests (discard-new) rather than dropping stored ones:
    the requester is told at once, and nothing accepted is lost."""
    wanted: dict[str, Any] = {
        "max_age": limits.max_age_s,
        "max_bytes": limits.max_bytes,
        "max_msgs": limits.max_msgs,
        # JetStream counts the headers too: room for them on top of the payload.
        "max_msg_size": limits.max_request_bytes + REQUEST_HEADER_ROOM_BYTES,
        "discard": DiscardPolicy.NEW,
        "duplicate_window": REQUEST_DEDUP_WINDOW_S,
    }
    try:
        info = await js.stream_info(s.INTAKE_STREAM)
    except nats.js.errors.NotFoundError:
        config = StreamConfig(
            name=s.INTAKE_STREAM,
            subjects=[s.REQUEST_SUBJECT],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            **wanted,
        )
        info = await js.add_stream(config)
    else:
        current = {key: getattr(info.config, key) for key in wanted}
        if current != wanted:
            get_logger(component="intake").info(
                "request stream limits updated", before=current, after=wanted
            )
            info = await js.update_stream(replace(info.config, **wanted))
    created = info.created or ""
    return hashlib.sha256(str(created).encode()).hexdigest()[:12]


def job_id_for(msg: Msg, epoch: str) -> str:
    """Stable across redeliveries, so a re-served job keeps its id and seeds."""
    sequence = msg.metadata.sequence.stream
    # blake2b is built into Python: OpenSSL's hashes (uuid5's SHA-1) cost ~25 us each on
    # the dispatch path, where the process wakes up with cold caches.
    key = f"{epoch}:{sequence}".encode()
    return hashlib.blake2b(key, digest_size=16, person=b"imagebus-job").hexdigest()


def redelivered(msg: Msg) -> bool:
    """Whether the request was delivered before (its orchestrator died, say): read from
    the delivery's reply subject, no JetStream lookup."""
    return msg.metadata.num_delivered > 1


@dataclass(eq=False)
class _Pull:
    """One standing pull request. Its statuses (heartbeats, expiry, refusal) come on its
    own inbox; the requests it brings carry their own subject, so are not told apart."""

    batch: int
    ends_at: float  # past this, the server has dropped it for sure


class Intake:
    # Requests asked for ahead: enough to cover a burst, few enough that a second
    # orchestrator gets its share.
    _PULL_BATCH = 64
    _PULL_EXPIRES_S = 5.0
    # While a pull request waits, the server says so this often; silence for three of
    # these means it is gone (a server restart, say) and is asked for again.
    _PULL_HEARTBEAT_S = 1.0

    def __init__(
        self,
        nc: Client,
        handle: Callable[[Msg, str], Awaitable[None]],
        *,
        capacity: int,
        ack_wait_s: float,
        max_deliver: int,
        limits: IntakeLimits,
        pause_reason: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.handle = handle
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.limits = limits
        self._capacity = capacity
        self._pause_reason = pause_reason
        self.paused_for: str | None = None  # why no new request is asked for now
        self._running: dict[asyncio.Task[None], Msg] = {}
        self._asked = 0  # requests asked for and neither delivered nor expired
        self._heard_at = time.monotonic()  # the last request or status that came in
        self._pulls: dict[str, _Pull] = {}  # by the inbox their statuses come on
        self._pulls_sent = 0
        self._refused = False  # a pull request was refused: check the consumer, ask again
        self._stopping = False
        self._pull_needed = asyncio.Event()
        self._puller: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        self._inbox = ""
        self._epoch = ""
        self.served = 0  # requests served to the end and acknowledged
        self._log = get_logger(component="intake")

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def pulling(self) -> bool:
        """Whether it still asks the stream for requests (false once stopped)."""
        return self._puller is not None and not self._puller.done()

    async def start(self) -> None:
        self._epoch = await ensure_intake_stream(self.js, self.limits)
        try:
            await self._ensure_consumer()
        except nats.js.errors.Error as exc:
            # An existing consumer with a setting the server will not change: use it as is.
            await self.js.consumer_info(s.INTAKE_STREAM, s.INTAKE_CONSUMER)
            self._log.warning("intake consumer kept with its own settings", error=str(exc))
        self._inbox = self.nc.new_inbox()
        self._subscription = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_delivery)
        self._puller = asyncio.create_task(self._keep_pulling(), name="imagebus-intake")
        self._pull_needed.set()

    async def _ensure_consumer(self) -> None:
        config = ConsumerConfig(
            durable_name=s.INTAKE_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=-1,
        )
        await self.js.add_consumer(s.INTAKE_STREAM, config)  # create, or update its settings

    async def stop(self, grace_s: float) -> None:
        """Stop pulling; give running jobs `grace_s`, then hand the rest back at once."""
        self._stopping = True  # requests still arriving go back to the stream at once
        await stop_task(self._puller)
        if self._subscription is not None:
            # The server skips pull requests that nobody listens to any more; draining
            # hands back the requests it had sent before it heard.
            with contextlib.suppress(Exception):
                await self._subscription.drain()
        if self._running:
            self._log.info("draining jobs", running=len(self._running))
            _, pending = await asyncio.wait(self._running, timeout=grace_s)
            await stop_tasks(pending)  # bounded: a stop must end, whatever a job is stuck on

    # --- standing pull requests ------------------------------------------------------

    def _to_ask(self) -> int:
        """How many more requests to ask for now: none while over half a batch is still
        outstanding, and never more than the free capacity."""
        room = self._capacity - len(self._running) - self._asked
        want = min(room, self._PULL_BATCH - self._asked)
        if want <= 0 or self._asked > self._PULL_BATCH // 2 or self._pause_reason():
            return 0
        return want

    async def _keep_pulling(self) -> None:
        while True:
            await wait_event(self._pull_needed, self._PULL_HEARTBEAT_S)
            self._pull_needed.clear()
            if self._refused:
                self._refused = False
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):
                    await self._ensure_consumer()
            self._forget_ended_pulls()
            self._note_pause()  # checked at least every heartbeat: a pause ends by itself
            want = self._to_ask()
            if not want or not self.nc.is_connected:
                continue
            inbox = f"{self._inbox}.{self._pulls_sent}"
            self._pulls_sent += 1
            request = {
                "batch": want,
                "expires": int(self._PULL_EXPIRES_S * 1e9),
                "idle_heartbeat": int(self._PULL_HEARTBEAT_S * 1e9),
            }
            now = time.monotonic()
            if not self._asked:
                self._heard_at = now  # the silence counts from now
            # Counted before it is sent: its first request may come back meanwhile.
            self._asked += want
            self._pulls[inbox] = _Pull(want, now + self._PULL_EXPIRES_S + 1.0)
            try:
                await self.nc.publish(
                    s.INTAKE_PULL_SUBJECT, json.dumps(request).encode(), reply=inbox
                )
            except Exception as exc:  # reconnecting: try again shortly
                del self._pulls[inbox]
                self._asked -= want
                self._log.warning("asking for requests failed; retrying", error=repr(exc))
                await asyncio.sleep(0.5)
                self._pull_needed.set()

    def _note_pause(self) -> None:
        reason = self._pause_reason()
        if reason and not self.paused_for:
            self._log.warning("taking no new requests; they wait in the stream", reason=reason)
        elif self.paused_for and not reason:
            self._log.info("taking requests again")
        self.paused_for = reason

    def _forget_ended_pulls(self) -> None:
        now = time.monotonic()
        for inbox, pull in list(self._pulls.items()):
            if now > pull.ends_at:
                del self._pulls[inbox]  # filled, or expired
        # A waiting pull request hears from the server every heartbeat; silence means
        # the server dropped them all (it restarted, say). If they did stand after all,
        # more requests may come than there is room for: those are handed back.
        if self._asked and now - self._heard_at > 3 * self._PULL_HEARTBEAT_S:
            self._log.warning("standing pull requests went unanswered; asking again")
            self._pulls.clear()
            self._asked = 0

    async def _on_delivery(self, msg: Msg) -> None:
        self._heard_at = time.monotonic()
        status = (msg.headers or {}).get(Header.STATUS)
        if status is not None:
            self._on_status(status, msg)
        else:
            self._asked = max(self._asked - 1, 0)
            if self._stopping or len(self._running) >= self._capacity:
                # Not to be served here: stopping (another orchestrator takes it now), or
                # more came than asked for (pull requests taken for lost were not).
                with contextlib.suppress(Exception):
                    await msg.nak(delay=None if self._stopping else 0.5)
                return
            task = asyncio.create_task(self._serve(msg))
            self._running[task] = msg
            task.add_done_callback(self._served)
        if not self._stopping and self._to_ask():
            self._pull_needed.set()

    def _on_status(self, status: str, msg: Msg) -> None:
        if status == StatusCode.CONTROL_MESSAGE:
            return  # an idle heartbeat: the pull requests still stand
        pull = self._pulls.pop(msg.subject, None)  # this pull request is over
        headers = msg.headers or {}
        unfilled = headers.get("Nats-Pending-Messages", "")
        if unfilled.isdigit():
            self._asked = max(self._asked - int(unfilled), 0)
        elif pull is not None:
            self._asked = max(self._asked - pull.batch, 0)  # refused before it brought any
        if status == StatusCode.REQUEST_TIMEOUT:
            return  # it expired: a new one is asked for
        # Refused (no consumer, too many waiting, a leader change): the puller makes
        # sure the consumer exists and asks afresh (not here: deliveries would wait).
        self._log.warning(
            "pull request ended", status=status, description=headers.get(Header.DESCRIPTION)
        )
        self._refused = True
        self._pull_needed.set()

    def _served(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        if not self._stopping and self._to_ask():
            self._pull_needed.set()

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
