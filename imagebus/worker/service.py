"""The worker: answers recruitment calls, runs diffusion jobs, streams results.

The event loop only talks to NATS; the model runs in a thread pool with one
thread per slot, so a busy worker still answers `request-worker` at once (as
unwilling). Slot accounting and reservations live in slots.py, running a task it
takes (from its image queued to its report) in runs.py, getting results to
requesters and copies into the results stream in delivery.py, and what a task
ends with (its result and report) in outcomes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    JobCancel,
    OfferReason,
    ProtocolError,
    RecruitCall,
    ReservationRelease,
    TaskAssignment,
    TaskHeartbeat,
    WorkerAdvert,
    WorkerOffer,
    decode,
    encode,
)
from ..protocol import subjects as s
from ..protocol.routing import unfit_reason
from ..settings import WorkerSettings
from .adoption import Adoptions
from .batching import Batcher, Queued
from .delivery import COPY_ANSWER_WITHIN_S, Delivery
from .engine import Engine, load_engines
from .identity import IdClaim
from .metrics import serve_metrics
from .runs import TaskRuns
from .slots import Slots
from .tasks import RunningTask, WorkerStatus


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
        self._log = get_logger(worker_id=self.id)
        self._slots = Slots(settings.slots)
        self._heartbeats: asyncio.Task[None] | None = None
        self._id_claim: IdClaim | None = None
        self._draining = False
        self._subscriptions: list[Subscription] = []
        self._executor = ThreadPoolExecutor(
            settings.slots, thread_name_prefix=f"imagebus-{self.id}"
        )
        self._batchers: dict[str, Batcher] = {}
        self._task_runs = TaskRuns(
            self.id, self.engines, self._batchers, self._slots, self._announce_capacity, self._log
        )
        self._copy_answer_within_s = copy_answer_within_s
        self._delivery: Delivery | None = None
        self.loop_lag = LoopLag()
        self._metrics: MetricsServer | None = None

    @property
    def models(self) -> list[str]:
        return list(self.engines) or self.settings.model_names

    @property
    def default_engine(self) -> Engine:
        return next(iter(self.engines.values()))

    @property
    def tasks_done(self) -> int:
        return self._task_runs.tasks_done

    @property
    def failures(self) -> int:
        return self._task_runs.failures

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
        self._task_runs.connect(self.nc, self._delivery)
        self._subscriptions = [
            await self._delivery.subscribe(),
            await self.nc.subscribe(s.worker_release_subject(self.id), cb=self._on_release),
            await self.nc.subscribe(s.worker_assign_subject(self.id), cb=self._on_assign),
            await self.nc.subscribe(s.worker_cancel_subject(self.id), cb=self._on_cancel),
            await self.nc.subscribe(
                s.WORKER_ADOPT_SUBJECT,
                cb=Adoptions(self.nc, self.id, self._task_runs.running).on_call,
            ),
            await self.nc.subscribe(s.RECRUIT_SUBJECT, queue=s.WORKER_QUEUE, cb=self._on_recruit),
            # Last: a pong says the worker is ready (`imagebus up` waits for it).
            await self.nc.subscribe(s.worker_ping_subject(self.id), cb=self._on_ping),
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
        await self._task_runs.stop(grace_s)
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
        running = self._task_runs.running
        return WorkerStatus(
            state="draining" if self._draining else ("busy" if running else "idle"),
            slots=self.settings.slots,
            free_slots=0 if self._draining else max(self._slots.free, 0),
            running=len(running),
            generating=self._slots.generating,
            peak_generating=self._slots.peak_generating,
            tasks_done=self.tasks_done,
            failures=self.failures,
            batches=batches,
            mean_batch=round(images / batches, 2) if batches else 0.0,
            seconds_per_image=self._task_runs.seconds_per_image,
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
                for running in list(self._task_runs.running.values()):
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
        for (job_id, index), running in self._task_runs.running.items():
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
        # Queued before "assigned" goes out: the model's thread wakes while it travels.
        await self._task_runs.start(running, self._queue_image(running))

    def _queue_image(self, running: RunningTask) -> Queued:
        """Queue a task's image on its model's batcher. The one hook for subclasses
        that look at each assignment first (tests/forging_worker.py)."""
        return self._task_runs.queue_image(running)

    def _refusal_reason(self, assignment: TaskAssignment) -> str | None:
        """Why this worker will not run `assignment`, claiming its reservation if it will."""
        held = self._slots.release(assignment.reservation_id)
        if (assignment.job_id, assignment.index) in self._task_runs.running:
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

    # --- sending ---------------------------------------------------------------------

    async def _reply(self, msg: Msg, payload: bytes, headers: dict[str, str] | None = None) -> None:
        # Not msg.respond(): it would copy the request's headers onto the reply.
        if msg.reply and self.nc is not None:
            await self.nc.publish(msg.reply, payload, headers=headers)
