"""The worker: answers recruitment calls, runs diffusion jobs, streams results.

The event loop only talks to NATS; the model runs in a thread pool with one
thread per slot, so a busy worker still answers `request-worker` at once (as
unwilling). A willing answer reserves a slot for `lease_s` seconds, so two
orchestrators can never book the same slot: the assignment must name the
reservation, and an unclaimed reservation lapses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from ..connections import connect
from ..logs import get_logger
from ..looplag import LoopLag
from ..protocol import (
    AssignmentRefused,
    CapacityNotice,
    Dialect,
    ErrorCode,
    JobCancel,
    OfferReason,
    ProtocolError,
    RecruitCall,
    ReservationRelease,
    TaskAssigned,
    TaskAssignment,
    TaskHeartbeat,
    TaskProgress,
    TaskReport,
    TaskResult,
    WorkerAdvert,
    WorkerOffer,
    decode,
    encode,
    events,
    results,
)
from ..protocol import subjects as s
from ..protocol.events import Outbound
from ..protocol.routing import unfit_reason
from ..settings import WorkerSettings
from .batching import Batcher, Queued
from .engine import Engine, GenerationCancelled, NoopEngine, load_engine

_DELIVERY_PATIENCE_S = 30.0
# A kept copy that JetStream has not answered for this long is taken as lost.
_COPY_ANSWER_WITHIN_S = 10.0
_DELIVERIES_PER_SLOT = 4
_REQUESTER_GONE_AFTER_S = 5.0


class WorkerIdInUse(RuntimeError):
    pass


@dataclass
class _UnansweredCopy:
    """An image's copy on its way to the results stream, until JetStream answers."""

    chunks_left: int
    sent_at: float = field(default_factory=time.monotonic)


@dataclass
class RunningTask:
    assignment: TaskAssignment
    started: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # Re-assigned elsewhere: stop quietly, the requester will hear from the new worker.
    reassigned: bool = False
    step: int = 0
    # True until its image is made; then it only delivers, and no longer holds a slot.
    generating: bool = True


class Worker:
    def __init__(self, settings: WorkerSettings, engine: Engine | None = None) -> None:
        if not s.is_valid_worker_id(settings.worker_id):
            raise ValueError(
                f"worker id {settings.worker_id!r} must be 1-64 letters, digits, '-' or '_'"
            )
        self.settings = settings
        self.id = settings.worker_id
        # One engine per model held; the first is the default for requests naming none.
        self.engines: dict[str, Engine] = {engine.model: engine} if engine is not None else {}
        self.nc: Client | None = None
        self.tasks_done = 0
        self.failures = 0
        self.peak_generating = 0  # the most images made at once: never above `slots`
        self._generating = 0  # tasks holding a slot: their image is not made yet
        # Numbers each report of free slots (see AssignmentRefused). It starts from the wall
        # clock in microseconds, so a restarted worker's reports outrank its last life's.
        self._free_seq = time.time_ns() // 1000
        self._seconds_total = 0.0
        self._reservations: dict[str, float] = {}  # reservation id -> lease expiry
        self._running: dict[tuple[str, int], RunningTask] = {}
        self._runs: set[asyncio.Task[None]] = set()
        self._heartbeats: asyncio.Task[None] | None = None
        self._draining = False
        self._subscriptions: list[Subscription] = []
        self._executor = ThreadPoolExecutor(
            settings.slots, thread_name_prefix=f"imagebus-{self.id}"
        )
        self._batchers: dict[str, Batcher] = {}
        # JetStream's acks of the kept copies come here (see _keep), by "<job>.<index>".
        self._kept_inbox = ""
        self._unanswered_copies: dict[str, _UnansweredCopy] = {}
        self.loop_lag = LoopLag()
        self._log = get_logger(worker_id=self.id)

    @property
    def models(self) -> list[str]:
        return list(self.engines) or self.settings.model_names

    @property
    def default_engine(self) -> Engine:
        return next(iter(self.engines.values()))

    @property
    def free_slots(self) -> int:
        now = time.monotonic()
        for reservation_id, expiry in list(self._reservations.items()):
            if expiry <= now:
                del self._reservations[reservation_id]
        # A task holds a slot while its image is made, not while the result travels:
        # the next image starts meanwhile. Deliveries that pile up (requesters slow to
        # confirm) count again beyond a few per slot, so they stay bounded.
        delivering_over = (
            len(self._running) - self._generating - _DELIVERIES_PER_SLOT * (self.settings.slots)
        )
        held = self._generating + max(delivering_over, 0)
        return self.settings.slots - held - len(self._reservations)

    # --- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        self.loop_lag.start()
        runners = self.settings.runners
        for model in self.settings.model_names if not self.engines else []:
            if model == NoopEngine.model:
                self.engines[model] = NoopEngine(self.settings.noop_seconds)
                continue
            self.engines[model] = await asyncio.to_thread(
                functools.partial(
                    load_engine,
                    model,
                    self.settings.device,
                    self.settings.torch_threads,
                    runners,
                    channels_last=self.settings.channels_last,
                    compile_unet=self.settings.compile_unet,
                )
            )
        for model, engine in self.engines.items():
            self._batchers[model] = Batcher(
                engine,
                self._executor,
                runners=runners,
                max_batch=self.settings.max_batch,
                window_s=self.settings.batch_window_ms / 1000,
                on_rendered=self._announce_capacity,
            )
            self._batchers[model].start()
        self.nc = await connect(self.settings.bus, name=f"imagebus-worker-{self.id}")
        await self._check_id_unused()
        self._kept_inbox = self.nc.new_inbox()
        self._subscriptions = [
            await self.nc.subscribe(f"{self._kept_inbox}.>", cb=self._on_kept),
            await self.nc.subscribe(s.worker_ping_subject(self.id), cb=self._on_ping),
            await self.nc.subscribe(s.worker_release_subject(self.id), cb=self._on_release),
            await self.nc.subscribe(s.worker_assign_subject(self.id), cb=self._on_assign),
            await self.nc.subscribe(s.CANCEL_SUBJECT, cb=self._on_cancel),
            await self.nc.subscribe(s.RECRUIT_SUBJECT, queue=s.WORKER_QUEUE, cb=self._on_recruit),
        ]
        await self.nc.flush()
        self._heartbeats = asyncio.create_task(self._send_heartbeats(), name="imagebus-heartbeats")
        await self._advertise()
        self._log.info(
            "worker ready",
            models=self.models,
            device=self.settings.device,
            slots=self.settings.slots,
        )

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop taking work, finish what is running (up to `grace_s`), then disconnect."""
        self._draining = True
        await self._advertise()  # "draining", no free slot: orchestrators stop assigning here
        if self.nc is not None and self._subscriptions:
            with contextlib.suppress(Exception):
                await self._subscriptions[-1].unsubscribe()  # leave the queue group first
        if self._runs:
            self._log.info("finishing running tasks", running=len(self._runs))
            _, pending = await asyncio.wait(self._runs, timeout=grace_s)
            for run in pending:
                self._cancel(run)
            await asyncio.gather(*pending, return_exceptions=True)
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        for batcher in self._batchers.values():
            await batcher.stop()
        await self.loop_lag.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._log.info("worker stopped", tasks_done=self.tasks_done, failures=self.failures)

    async def _check_id_unused(self) -> None:
        assert self.nc is not None
        try:
            await self.nc.request(s.worker_ping_subject(self.id), b"", timeout=0.5)
        except (NoRespondersError, NatsTimeoutError, TimeoutError):
            return
        await self.nc.close()
        raise WorkerIdInUse(
            f"worker id {self.id!r} is already used by a running worker; "
            "give each worker its own --worker_id"
        )

    # --- bus callbacks -------------------------------------------------------------

    async def _on_ping(self, msg: Msg) -> None:
        await self._reply(msg, encode(self._offer(willing=False, reason=None)))

    async def _on_recruit(self, msg: Msg) -> None:
        try:
            call: RecruitCall | None = decode(RecruitCall, msg.data)
        except ProtocolError:
            call = None  # no requirements stated: judge by capacity alone
        reason = self._decline_reason(call)
        offer = self._offer(willing=reason is None, reason=reason)
        if offer.willing:
            assert offer.reservation_id is not None
            self._reservations[offer.reservation_id] = time.monotonic() + self.settings.lease_s
        headers = {
            s.HEADER_WILLING: "true" if offer.willing else "false",
            s.HEADER_WORKER_ID: self.id,
        }
        await self._reply(msg, encode(offer), headers)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = decode(JobCancel, msg.data)
        except ProtocolError:
            return
        for (job_id, index), running in self._running.items():
            named = job_id == cancel.job_id or (
                cancel.inbox and running.assignment.reply_inbox == cancel.inbox
            )
            if named and cancel.index in (None, index):
                self._log.info("cancelling task", job_id=job_id, index=index, reason=cancel.reason)
                running.cancelled = True
                running.reassigned = cancel.index is not None

    async def _send_heartbeats(self) -> None:
        """Every second: a heartbeat per running task; every few, an advertisement."""
        beats = 0
        every = max(round(self.settings.advert_s / self.settings.heartbeat_s), 1)
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            beats += 1
            try:
                for running in list(self._running.values()):
                    a = running.assignment
                    if a.heartbeat_subject and self.nc is not None:
                        beat = TaskHeartbeat(
                            a.job_id, a.index, self.id, running.step, a.params.steps
                        )
                        await self.nc.publish(a.heartbeat_subject, encode(beat))
                if beats % every == 0:
                    await self._advertise()
                self._give_up_unanswered_copies()
            except Exception as exc:  # a missed beat is survivable; a dead loop is not
                self._log.warning("heartbeat failed", error=repr(exc))

    def advert(self) -> WorkerAdvert:
        state = "draining" if self._draining else ("busy" if self._running else "idle")
        return WorkerAdvert(
            worker_id=self.id,
            models=self.models,
            device=self.settings.device,
            slots=self.settings.slots,
            free_slots=0 if self._draining else max(self.free_slots, 0),
            max_pixels=self.settings.max_pixels,
            state=state,
            tasks_done=self.tasks_done,
            failures=self.failures,
            seconds_per_image=self._seconds_total / self.tasks_done if self.tasks_done else 0.0,
            gpu_name=self.default_engine.gpu_name if self.engines else None,
            vram_gb=self.default_engine.vram_gb if self.engines else None,
            max_batch=self.settings.max_batch,
            mean_batch=self._mean_batch(),
            loop_lag_p99_ms=self.loop_lag.summary()["p99_ms"],
            free_seq=self._next_free_seq(),
        )

    def _next_free_seq(self) -> int:
        self._free_seq += 1
        return self._free_seq

    def _mean_batch(self) -> float:
        batches = sum(b.batches for b in self._batchers.values())
        images = sum(b.images for b in self._batchers.values())
        return round(images / batches, 2) if batches else 0.0

    async def _advertise(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.publish(s.WORKER_ADVERT_SUBJECT, encode(self.advert()))

    async def _on_release(self, msg: Msg) -> None:
        try:
            release = decode(ReservationRelease, msg.data)
        except ProtocolError:
            return
        if self._reservations.pop(release.reservation_id, None) is not None:
            await self._announce_capacity()

    async def _on_assign(self, msg: Msg) -> None:
        """Take an assignment, or refuse it on its reply subject. One taken gets no
        answer: the requester hears "assigned" from here, the orchestrator hears the
        task's heartbeats and its report."""
        try:
            assignment = decode(TaskAssignment, msg.data)
        except ProtocolError as exc:
            self._log.warning("malformed assignment refused", error=str(exc))
            await self._refuse(msg, f"malformed: {exc}")
            return
        log = self._log.bind(job_id=assignment.job_id, index=assignment.index)
        key = (assignment.job_id, assignment.index)
        held = self._reservations.pop(assignment.reservation_id, None)
        if key in self._running:
            reason = "already running this task"
        elif self._draining:
            reason = "worker is shutting down"
        elif held is None and self.free_slots <= 0:
            reason = "no free slot" if not assignment.reservation_id else "reservation expired"
        else:
            reason = None
        if reason is not None or not s.is_valid_inbox(assignment.reply_inbox):
            reason = reason or "invalid reply inbox"
            log.info("assignment refused", reason=reason)
            await self._refuse(msg, reason)
            return
        running = self._running[key] = RunningTask(assignment)
        self._generating += 1
        self.peak_generating = max(self.peak_generating, self._generating)
        # Queued before "assigned" goes out: the model's thread wakes while it travels.
        # The run (which frees the slot whatever happens) exists before anything can fail.
        run = asyncio.create_task(self._run(running, self._queue_image(running)))
        self._runs.add(run)
        run.add_done_callback(self._runs.discard)
        assigned = TaskAssigned(assignment.job_id, assignment.index, self.id)
        await self._send(events.assigned(_dialect_of(assignment), assignment.reply_inbox, assigned))

    async def _refuse(self, msg: Msg, reason: str) -> None:
        refusal = AssignmentRefused(self.id, reason, max(self.free_slots, 0), self._next_free_seq())
        await self._reply(msg, encode(refusal))

    # --- running one task ------------------------------------------------------------

    async def _run(self, running: RunningTask, queued: Queued) -> None:
        """Run one task; whatever happens, its slot is freed afterwards."""
        assignment = running.assignment
        try:
            await self._run_body(running, queued)
        except Exception:
            self._log.exception("task ended badly", job_id=assignment.job_id)
        finally:
            self._running.pop((assignment.job_id, assignment.index), None)
            if running.generating:  # it ended before its image: the slot is free now
                self._free_slot(running)
                with contextlib.suppress(Exception):
                    await self._announce_capacity()

    def _free_slot(self, running: RunningTask) -> None:
        """The image is rendered (or never will be): the next may start while this one
        is encoded and travels."""
        if running.generating:
            running.generating = False
            self._generating -= 1

    def _queue_image(self, running: RunningTask) -> Queued:
        assignment = running.assignment
        engine = self.engines.get(assignment.params.model or "", self.default_engine)
        dialect = _dialect_of(assignment)

        async def on_step(step: int, steps: int) -> None:
            running.step = step
            progress = TaskProgress(assignment.job_id, assignment.index, step, steps, self.id)
            await self._send(events.progress(dialect, assignment.reply_inbox, progress))

        return self._batchers[engine.model].submit(
            assignment.params,
            assignment.seed,
            on_step,
            lambda: running.cancelled,
            lambda: self._free_slot(running),
        )

    async def _run_body(self, running: RunningTask, queued: Queued) -> None:
        assert self.nc is not None
        assignment = running.assignment
        engine = self.engines.get(assignment.params.model or "", self.default_engine)
        log = self._log.bind(job_id=assignment.job_id, index=assignment.index)
        dialect = _dialect_of(assignment)
        params = assignment.params
        log.info("task started", width=params.width, height=params.height, steps=params.steps)
        started = time.perf_counter()
        try:
            image = await self._batchers[engine.model].result(queued)
            result = TaskResult(
                job_id=assignment.job_id,
                index=assignment.index,
                ok=True,
                seed=assignment.seed,
                worker_id=self.id,
                png=image.png,
                width=image.width,
                height=image.height,
                seconds=image.seconds,
            )
        except GenerationCancelled:
            result = self._failure(assignment, "cancelled", ErrorCode.CANCELLED)
        except Exception as exc:
            log.exception("generation failed")
            result = self._failure(
                assignment, f"{type(exc).__name__}: {exc}", ErrorCode.GENERATION_FAILED
            )
        seconds = time.perf_counter() - started
        result, messages = events.result_messages(
            dialect, assignment.reply_inbox, result, self.nc.max_payload
        )
        deliver = not running.reassigned
        # The copy and the result go out in one write (a write per message is most of
        # the bus's cost per job). The slot was freed when the image was rendered.
        if deliver and result.ok and result.png is not None:
            await self._keep(assignment, result.png)
        if deliver:
            delivered = await self._deliver(messages, dialect)
            if not delivered:
                log.warning("requester did not confirm the result; giving up on it")
        if result.ok:
            self.tasks_done += 1
            self._seconds_total += seconds
        else:
            self.failures += 1
        report = TaskReport(
            job_id=assignment.job_id,
            index=assignment.index,
            worker_id=self.id,
            ok=result.ok,
            seconds=seconds,
            error=result.error,
            code=result.code,
            png_bytes=len(result.png or b""),
        )
        await self.nc.publish(assignment.report_subject, encode(report))
        log.info("task finished", ok=result.ok, seconds=round(seconds, 3), error=result.error)

    def _failure(self, assignment: TaskAssignment, error: str, code: ErrorCode) -> TaskResult:
        return TaskResult(
            job_id=assignment.job_id,
            index=assignment.index,
            ok=False,
            seed=assignment.seed,
            worker_id=self.id,
            error=error,
            code=code,
        )

    def _cancel(self, run: asyncio.Task[None]) -> None:
        for running in self._running.values():
            running.cancelled = True
        run.cancel()

    # --- helpers -------------------------------------------------------------------

    def _decline_reason(self, call: RecruitCall | None) -> OfferReason | None:
        if self._draining:
            return OfferReason.DRAINING
        if call is not None:
            unfit = unfit_reason(self.advert(), call)
            if unfit is not None:
                return unfit
        if self.free_slots <= 0:
            return OfferReason.BUSY
        return None

    def _offer(self, *, willing: bool, reason: OfferReason | None) -> WorkerOffer:
        return WorkerOffer(
            worker_id=self.id,
            willing=willing,
            slots=self.settings.slots,
            free_slots=self.free_slots,
            device=self.settings.device,
            models=self.models,
            reservation_id=uuid.uuid4().hex if willing else None,
            lease_s=self.settings.lease_s if willing else 0.0,
            reason=reason.value if reason else None,
        )

    async def _announce_capacity(self) -> None:
        if self.nc is not None and not self._draining and self.free_slots > 0:
            notice = CapacityNotice(self.id, self.free_slots, self._next_free_seq())
            await self.nc.publish(s.CAPACITY_SUBJECT, encode(notice))

    async def _reply(self, msg: Msg, payload: bytes, headers: dict[str, str] | None = None) -> None:
        # Not msg.respond(): it would copy the request's headers onto the reply.
        if msg.reply and self.nc is not None:
            await self.nc.publish(msg.reply, payload, headers=headers)

    async def _send(self, out: Outbound) -> None:
        assert self.nc is not None
        await self.nc.publish(out.subject, out.payload, headers=out.headers)

    async def _keep(self, assignment: TaskAssignment, png: bytes) -> None:
        """Store the image in the results stream, for `imagebus job fetch` later.

        Published without waiting for JetStream's ack: the requester gets its image
        either way, and waiting would cost a request (a reply inbox, a future, a
        timer) per job. The acks come to `_on_kept`, which logs the refused copies;
        a copy left unanswered is logged by the heartbeat loop.
        """
        assert self.nc is not None
        copies = results.copy_messages(
            assignment.job_id, assignment.index, png, self.nc.max_payload
        )
        token = f"{assignment.job_id}.{assignment.index}"
        reply = f"{self._kept_inbox}.{token}"
        self._unanswered_copies[token] = _UnansweredCopy(len(copies))
        try:
            for out in copies:
                await self.nc.publish(out.subject, out.payload, reply=reply, headers=out.headers)
        except Exception as exc:  # the requester has its image; only the copy is missing
            self._unanswered_copies.pop(token, None)
            self._copy_not_kept(token, repr(exc))

    async def _on_kept(self, msg: Msg) -> None:
        """JetStream's answer for one chunk of a kept copy: silent when stored, logged
        (once per copy) when refused."""
        token = msg.subject[len(self._kept_inbox) + 1 :]
        copy = self._unanswered_copies.get(token)
        if copy is None:
            return  # already refused, or given up on
        status = (msg.headers or {}).get(s.HEADER_STATUS)
        if status is None and b'"error"' not in msg.data:
            copy.chunks_left -= 1
            if copy.chunks_left <= 0:
                del self._unanswered_copies[token]
            return
        del self._unanswered_copies[token]
        reason = (
            "no results stream on this bus"
            if status == s.STATUS_NO_RESPONDERS
            else msg.data[:300].decode(errors="replace")
        )
        self._copy_not_kept(token, reason)

    def _give_up_unanswered_copies(self) -> None:
        """Copies JetStream never answered (lost on the way, taken by a plain subscriber
        instead of a stream, no stream leader) are not kept: say so."""
        too_old = time.monotonic() - _COPY_ANSWER_WITHIN_S
        for token, copy in list(self._unanswered_copies.items()):
            if copy.sent_at < too_old:
                del self._unanswered_copies[token]
                reason = f"no answer from JetStream in {_COPY_ANSWER_WITHIN_S:g}s"
                self._copy_not_kept(token, reason)

    def _copy_not_kept(self, token: str, reason: str) -> None:
        job_id, _, index = token.partition(".")
        self._log.warning(
            "result not kept in the results stream", job_id=job_id, index=index, reason=reason
        )

    async def _deliver(self, messages: list[Outbound], dialect: Dialect) -> bool:
        """Send a result so that it survives a bus hiccup.

        Native clients confirm the last message; until they do it is sent again
        (chunks and all) for about `_DELIVERY_PATIENCE_S`: a result published
        while the requester was reconnecting would otherwise vanish. The
        prototype's clients cannot confirm, so they get one plain publish.
        """
        assert self.nc is not None
        *chunks, last = messages
        if dialect is Dialect.LEGACY:
            for out in messages:
                await self._send(out)
            return True
        started = time.monotonic()
        while time.monotonic() - started < _DELIVERY_PATIENCE_S:
            try:
                for out in chunks:
                    await self._send(out)
                await self.nc.request(last.subject, last.payload, timeout=2.0, headers=last.headers)
                return True
            except NoRespondersError:
                # Nobody listens on the inbox: the requester left (it can collect the
                # image later with `imagebus job fetch`), or is reconnecting right now.
                if time.monotonic() - started > _REQUESTER_GONE_AFTER_S:
                    return False
                await asyncio.sleep(0.5)
            except (NatsTimeoutError, TimeoutError):
                await asyncio.sleep(0.5)
            except Exception as exc:  # disconnected mid-send: wait for the reconnect
                self._log.debug("result delivery retry", error=repr(exc))
                await asyncio.sleep(0.5)
        return False

    def stats(self) -> dict[str, Any]:
        return {
            "tasks_done": self.tasks_done,
            "failures": self.failures,
            "running": len(self._running),
            # Pipeline calls made, and images per call on average (dynamic batching).
            "batches": sum(b.batches for b in self._batchers.values()),
            "mean_batch": self._mean_batch(),
        }


def _dialect_of(assignment: TaskAssignment) -> Dialect:
    try:
        return Dialect(assignment.dialect)
    except ValueError:
        return Dialect.NATIVE
