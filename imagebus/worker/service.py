"""The worker: answers recruitment calls, runs diffusion jobs, streams results.

The event loop only talks to NATS; the model runs in a thread pool with one
thread per slot, so a busy worker still answers `request-worker` at once (as
unwilling). Slot accounting and reservations live in slots.py, getting results
to requesters and copies into the results stream in delivery.py, and what a task
ends with (its result and report) in outcomes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..connections import connect
from ..logs import get_logger
from ..looplag import LoopLag
from ..metrics import MetricsServer
from ..protocol import (
    AssignmentRefused,
    CapacityNotice,
    ErrorCode,
    Fault,
    JobCancel,
    OfferReason,
    ProtocolError,
    RecruitCall,
    ReservationRelease,
    TaskAssigned,
    TaskAssignment,
    TaskHeartbeat,
    TaskProgress,
    WorkerAdvert,
    WorkerOffer,
    decode,
    encode,
    events,
)
from ..protocol import subjects as s
from ..protocol.events import Outbound
from ..protocol.routing import unfit_reason
from ..settings import WorkerSettings
from .adoption import Adoptions
from .batching import Batcher, Queued
from .delivery import COPY_ANSWER_WITHIN_S, Delivery
from .engine import Engine, load_engines
from .identity import IdClaim
from .metrics import serve_metrics
from .outcomes import failure, for_the_requester, report_of, result_of
from .slots import Slots
from .tasks import RunningTask, WorkerStatus

# How long stop() waits for aborted runs to end (each reports its task lost first).
ABORT_WAIT_S = 5.0


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine | None = None,
        *,
        copy_answer_within_s: float = COPY_ANSWER_WITHIN_S,
    ) -> None:
        """`engine`: a loaded model to serve instead of loading `settings.model`.
        `copy_answer_within_s`: how long JetStream may take to answer for a kept copy
        of an image before the copy is logged as not kept."""
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
        self._slots = Slots(settings.slots)
        self._seconds_total = 0.0
        self._running: dict[tuple[str, int], RunningTask] = {}
        self._runs: dict[asyncio.Task[None], RunningTask] = {}  # for stop()
        self._heartbeats: asyncio.Task[None] | None = None
        self._id_claim: IdClaim | None = None
        self._draining = False
        self._subscriptions: list[Subscription] = []
        self._executor = ThreadPoolExecutor(
            settings.slots, thread_name_prefix=f"imagebus-{self.id}"
        )
        self._batchers: dict[str, Batcher] = {}
        self._copy_answer_within_s = copy_answer_within_s
        self._delivery: Delivery | None = None
        self.loop_lag = LoopLag()
        self._metrics: MetricsServer | None = None
        self._log = get_logger(worker_id=self.id)

    @property
    def models(self) -> list[str]:
        return list(self.engines) or self.settings.model_names

    @property
    def default_engine(self) -> Engine:
        return next(iter(self.engines.values()))

    # --- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Claim the worker id on the bus (WorkerIdInUse if a running worker holds it),
        load the models, then take work."""
        self.loop_lag.start()
        self.nc = await connect(self.settings.bus, name=f"imagebus-worker-{self.id}")
        # Before the model loads, which takes a while: a second worker with this id is
        # refused in under a second, and two started at once cannot both pass.
        self._id_claim = IdClaim(self.nc, self.id, self._log)
        try:
            await self._id_claim.acquire()
            await self._load_engines()
        except BaseException:
            await self._id_claim.release()
            await self.loop_lag.stop()
            await self.nc.close()
            raise
        self._delivery = Delivery(self.nc, self._log, self._copy_answer_within_s)
        self._subscriptions = [
            await self._delivery.subscribe(),
            await self.nc.subscribe(s.worker_ping_subject(self.id), cb=self._on_ping),
            await self.nc.subscribe(s.worker_release_subject(self.id), cb=self._on_release),
            await self.nc.subscribe(s.worker_assign_subject(self.id), cb=self._on_assign),
            await self.nc.subscribe(s.worker_cancel_subject(self.id), cb=self._on_cancel),
            await self.nc.subscribe(
                s.WORKER_ADOPT_SUBJECT, cb=Adoptions(self.nc, self.id, self._running).on_call
            ),
            await self.nc.subscribe(s.RECRUIT_SUBJECT, queue=s.WORKER_QUEUE, cb=self._on_recruit),
        ]
        await self.nc.flush()
        self._heartbeats = asyncio.create_task(self._send_heartbeats(), name="imagebus-heartbeats")
        await self._advertise()
        if self.settings.metrics_port is not None:
            self._metrics = serve_metrics(self.settings.metrics_port, self)
        self._log.info(
            "worker ready",
            models=self.models,
            device=self.settings.device,
            slots=self.settings.slots,
        )

    async def _load_engines(self) -> None:
        """Load the models not given to the constructor, and a batcher for each."""
        if not self.engines:
            self.engines.update(await load_engines(self.settings))
        for model, engine in self.engines.items():
            self._batchers[model] = Batcher(
                engine,
                self._executor,
                runners=self.settings.runners,
                max_batch=self.settings.max_batch,
                window_s=self.settings.batch_window_ms / 1000,
                on_rendered=self._announce_capacity,
            )
            self._batchers[model].start()

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
                self._runs[run].abort()
            if pending:  # bounded: a stop must end, whatever a run is stuck on
                _, stuck = await asyncio.wait(pending, timeout=ABORT_WAIT_S)
                if stuck:
                    self._log.warning("tasks still stuck after abort", stuck=len(stuck))
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        for batcher in self._batchers.values():
            await batcher.stop()
        await self.loop_lag.stop()
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.stop)
        if self._id_claim is not None:
            await self._id_claim.release()  # last: it held the id while it ran tasks
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._log.info("worker stopped", tasks_done=self.tasks_done, failures=self.failures)

    # --- what the worker tells about itself ----------------------------------------

    def status(self) -> WorkerStatus:
        batches = sum(b.batches for b in self._batchers.values())
        images = sum(b.images for b in self._batchers.values())
        return WorkerStatus(
            state="draining" if self._draining else ("busy" if self._running else "idle"),
            slots=self.settings.slots,
            free_slots=0 if self._draining else max(self._slots.free, 0),
            running=len(self._running),
            generating=self._slots.generating,
            peak_generating=self._slots.peak_generating,
            tasks_done=self.tasks_done,
            failures=self.failures,
            batches=batches,
            mean_batch=round(images / batches, 2) if batches else 0.0,
            seconds_per_image=self._seconds_total / self.tasks_done if self.tasks_done else 0.0,
            copies_unanswered=self._delivery.copies_unanswered if self._delivery else 0,
        )

    def advert(self) -> WorkerAdvert:
        """The advertisement the orchestrators keep in their pool view (it numbers
        its report of free slots, so each call takes the next number)."""
        self._slots.expire()
        status = self.status()
        return WorkerAdvert(
            worker_id=self.id,
            models=self.models,
            device=self.settings.device,
            slots=status.slots,
            free_slots=status.free_slots,
            max_pixels=self.settings.max_pixels,
            state=status.state,
            tasks_done=status.tasks_done,
            failures=status.failures,
            seconds_per_image=status.seconds_per_image,
            gpu_name=self.default_engine.gpu_name if self.engines else None,
            vram_gb=self.default_engine.vram_gb if self.engines else None,
            max_batch=self.settings.max_batch,
            mean_batch=status.mean_batch,
            loop_lag_p99_ms=self.loop_lag.summary()["p99_ms"],
            free_seq=self._slots.next_free_seq(),
            dtype=self.default_engine.dtype if self.engines else "",
            instance=self._slots.instance,
            batch_sizes=self.batch_sizes(),
        )

    def batch_sizes(self) -> list[int]:
        """Pipeline calls made so far by images per call: [calls of 1, calls of 2, ...]."""
        calls: Counter[int] = Counter()
        for batcher in self._batchers.values():
            calls.update(batcher.batch_sizes)
        return [calls[size] for size in range(1, max(calls, default=0) + 1)]

    async def _advertise(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.publish(s.worker_advert_subject(self.id), encode(self.advert()))

    async def _announce_capacity(self) -> None:
        self._slots.expire()
        free = self._slots.free
        if self.nc is not None and not self._draining and free > 0:
            notice = CapacityNotice(self.id, free, *self._slots.next_free_stamp())
            await self.nc.publish(s.capacity_subject(self.id), encode(notice))

    async def _send_heartbeats(self) -> None:
        """Every second: a heartbeat per running task; every few, an advertisement."""
        beats = 0
        every = max(round(self.settings.advert_s / self.settings.heartbeat_s), 1)
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            beats += 1
            try:
                for running in list(self._running.values()):
                    if running.heartbeat_subject and self.nc is not None:
                        beat = self._heartbeat(running)
                        await self.nc.publish(running.heartbeat_subject, encode(beat))
                if beats % every == 0:
                    await self._advertise()
                if self._delivery is not None:
                    self._delivery.give_up_unanswered_copies()
            except Exception as exc:  # a missed beat is survivable; a dead loop is not
                self._log.warning("heartbeat failed", error=repr(exc))

    def _heartbeat(self, running: RunningTask) -> TaskHeartbeat:
        engine = self.engines.get(running.assignment.params.model or "", self.default_engine)
        return running.heartbeat(self.id, self._batchers[engine.model].seconds_per_step)

    # --- bus callbacks -------------------------------------------------------------

    async def _on_ping(self, msg: Msg) -> None:
        self._slots.expire()
        offer = self._offer(reservation_id=None, reason=None, free_slots=self._slots.free)
        await self._reply(msg, encode(offer))

    async def _on_recruit(self, msg: Msg) -> None:
        try:
            call: RecruitCall | None = decode(RecruitCall, msg.data)
        except ProtocolError:
            call = None  # no requirements stated: judge by capacity alone
        self._slots.expire()
        reason = self._decline_reason(call)
        free = self._slots.free  # as before this answer's reservation, which is the offer's
        reservation_id = self._slots.reserve(self.settings.lease_s) if reason is None else None
        offer = self._offer(reservation_id=reservation_id, reason=reason, free_slots=free)
        headers = {
            s.HEADER_WILLING: "true" if offer.willing else "false",
            s.HEADER_WORKER_ID: self.id,
        }
        await self._reply(msg, encode(offer), headers)

    def _decline_reason(self, call: RecruitCall | None) -> OfferReason | None:
        if self._draining:
            return OfferReason.DRAINING
        if call is not None:
            unfit = unfit_reason(self.advert(), call)
            if unfit is not None:
                return unfit
        if self._slots.free <= 0:
            return OfferReason.BUSY
        return None

    def _offer(
        self, *, reservation_id: str | None, reason: OfferReason | None, free_slots: int
    ) -> WorkerOffer:
        willing = reservation_id is not None
        return WorkerOffer(
            worker_id=self.id,
            willing=willing,
            slots=self.settings.slots,
            free_slots=free_slots,
            device=self.settings.device,
            models=self.models,
            reservation_id=reservation_id,
            lease_s=self.settings.lease_s if willing else 0.0,
            reason=reason.value if reason else None,
        )

    async def _on_release(self, msg: Msg) -> None:
        try:
            release = decode(ReservationRelease, msg.data)
        except ProtocolError:
            return
        if self._slots.release(release.reservation_id):
            await self._announce_capacity()

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = decode(JobCancel, msg.data)
        except ProtocolError:
            return
        # Only the orchestrator speaks here (a verified cancel, a re-assignment, a job
        # timeout), always by job id: see orchestrator/cancels.py.
        for (job_id, index), running in self._running.items():
            if job_id == cancel.job_id and cancel.index in (None, index):
                self._log.info("cancelling task", job_id=job_id, index=index, reason=cancel.reason)
                running.cancel(reassigned=cancel.index is not None)

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
        reason = self._refusal_reason(assignment)
        if reason is not None:
            log = self._log.bind(job_id=assignment.job_id, index=assignment.index)
            log.info("assignment refused", reason=reason)
            await self._refuse(msg, reason)
            return
        running = RunningTask(assignment)
        self._running[(assignment.job_id, assignment.index)] = running
        self._slots.start_generating()
        # Queued before "assigned" goes out: the model's thread wakes while it travels.
        # The run (which frees the slot whatever happens) exists before anything can fail.
        running.run = asyncio.create_task(self._run(running, self._queue_image(running)))
        self._runs[running.run] = running
        running.run.add_done_callback(self._forget_run)
        assigned = TaskAssigned(assignment.job_id, assignment.index, self.id)
        inbox, key = assignment.reply_inbox, running.event_key
        await self._send(events.assigned(running.dialect, inbox, assigned, key))

    def _refusal_reason(self, assignment: TaskAssignment) -> str | None:
        """Why this worker will not run `assignment`, claiming its reservation if it will."""
        held = self._slots.release(assignment.reservation_id)
        if (assignment.job_id, assignment.index) in self._running:
            return "already running this task"
        if self._draining:
            return "worker is shutting down"
        if not held:
            self._slots.expire()
            if self._slots.free <= 0:
                return "no free slot" if not assignment.reservation_id else "reservation expired"
        if not s.is_valid_inbox(assignment.reply_inbox):
            return "invalid reply inbox"
        return None

    async def _refuse(self, msg: Msg, reason: str) -> None:
        self._slots.expire()
        free = max(self._slots.free, 0)
        refusal = AssignmentRefused(self.id, reason, free, *self._slots.next_free_stamp())
        await self._reply(msg, encode(refusal))

    # --- running one task ------------------------------------------------------------

    def _queue_image(self, running: RunningTask) -> Queued:
        assignment = running.assignment
        engine = self.engines.get(assignment.params.model or "", self.default_engine)
        dialect, key = running.dialect, running.event_key

        async def on_step(step: int, steps: int) -> None:
            running.step = step
            progress = TaskProgress(assignment.job_id, assignment.index, step, steps, self.id)
            await self._send(events.progress(dialect, assignment.reply_inbox, progress, key))

        running.queued = self._batchers[engine.model].submit(
            assignment.params,
            assignment.seed,
            on_step,
            lambda: running.cancelled,
            lambda: self._rendered(running),
        )
        return running.queued

    def _forget_run(self, run: asyncio.Task[None]) -> None:
        self._runs.pop(run, None)

    def _rendered(self, running: RunningTask) -> None:
        """The image is rendered (or never will be): the next may start while this one
        is encoded and travels."""
        if running.generating:
            running.generating = False
            self._slots.rendered()

    async def _run(self, running: RunningTask, queued: Queued) -> None:
        """Run one task; whatever happens, its slot is freed afterwards."""
        assignment = running.assignment
        try:
            await self._run_body(running, queued)
        except asyncio.CancelledError:  # aborted by stop(): another worker should take it
            if self.nc is not None and not running.reassigned:
                aborted = failure(
                    assignment, self.id, "worker shutting down", ErrorCode.WORKER_LOST, Fault.WORKER
                )
                report = report_of(aborted, self.id, time.monotonic() - running.started)
                running.reported = True
                with contextlib.suppress(Exception):
                    await self.nc.publish(running.report_subject, encode(report))
            raise
        except Exception:
            self._log.exception("task ended badly", job_id=assignment.job_id)
        finally:
            self._running.pop((assignment.job_id, assignment.index), None)
            self._slots.finished(rendered=not running.generating)
            if running.generating:  # it ended before its image: the slot is free now
                running.generating = False
                with contextlib.suppress(Exception):
                    await self._announce_capacity()

    async def _run_body(self, running: RunningTask, queued: Queued) -> None:
        assert self.nc is not None and self._delivery is not None
        assignment = running.assignment
        engine = self.engines.get(assignment.params.model or "", self.default_engine)
        log = self._log.bind(job_id=assignment.job_id, index=assignment.index)
        params = assignment.params
        log.info("task started", width=params.width, height=params.height, steps=params.steps)
        started = time.perf_counter()
        rendering = self._batchers[engine.model].result(queued)
        result = await result_of(assignment, self.id, rendering, log)
        seconds = time.perf_counter() - started
        dialect = running.dialect
        result, messages = events.result_messages(
            dialect, assignment.reply_inbox, result, self.nc.max_payload, running.event_key
        )
        # The copy and the result go out in one write (a write per message is most of
        # the bus's cost per job). The slot was freed when the image was rendered.
        # A failure of this worker's own goes to the orchestrator only: it retries it
        # on another worker, and answers the requester itself if none succeeds.
        if not running.reassigned and for_the_requester(result):
            if result.ok and result.png is not None:
                await self._delivery.keep(assignment.job_id, assignment.index, result.png)
            if not await self._delivery.deliver(messages, dialect):
                log.warning("requester did not confirm the result; giving up on it")
        if result.ok:
            self.tasks_done += 1
            self._seconds_total += seconds
        else:
            self.failures += 1
        running.reported = True  # from here on, an orchestrator adopting it would wait in vain
        await self.nc.publish(running.report_subject, encode(report_of(result, self.id, seconds)))
        log.info("task finished", ok=result.ok, seconds=round(seconds, 3), error=result.error)

    # --- sending ---------------------------------------------------------------------

    async def _reply(self, msg: Msg, payload: bytes, headers: dict[str, str] | None = None) -> None:
        # Not msg.respond(): it would copy the request's headers onto the reply.
        if msg.reply and self.nc is not None:
            await self.nc.publish(msg.reply, payload, headers=headers)

    async def _send(self, out: Outbound) -> None:
        assert self.nc is not None
        await self.nc.publish(out.subject, out.payload, headers=out.headers)
