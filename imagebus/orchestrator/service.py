"""The orchestrator: takes requests from `img-gen`, recruits workers, records jobs.

One request (a *job*) of n images becomes n *tasks*, each dispatched on its own:

1. recruit: ask `request-worker` (one random worker of the queue group answers)
   until a willing, non-blacklisted worker offers a reserved slot, at most
   `max_attempts` asks per round. A round in which some worker was merely busy
   means the pool is saturated: the task waits for a capacity notice and tries
   again, up to `queue_timeout_s`. A round that met no worker that could ever
   take it (none connected, only blacklisted or unfit ones) fails the task.
2. assign: send the TaskAssignment to that worker's own subject; it acks.
3. the worker streams progress and the result straight to the requester and
   sends a TaskReport here; the task's record is written behind to Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

import msgpack
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StorageType, StreamConfig

from ..connections import BusUnavailable, connect
from ..db import AttemptRecord, Database, JobRecorder, JobRow, Record, TaskUpdate
from ..db.store import TRANSIENT_ERRORS, fetch_job_status
from ..logs import get_logger
from ..looplag import LoopLag
from ..protocol import (
    AssignmentRefused,
    CapacityNotice,
    Dialect,
    ErrorCode,
    GenerateRequest,
    JobAccepted,
    JobCancel,
    JobRejected,
    JobStatus,
    OfferReason,
    ProtocolError,
    RecruitCall,
    RequestError,
    ReservationRelease,
    TaskAssignment,
    TaskHeartbeat,
    TaskReport,
    TaskResult,
    TaskStatus,
    WorkerAdvert,
    WorkerOffer,
    decode,
    decode_request,
    dialect_of,
    encode,
    events,
    request_schema,
)
from ..protocol import subjects as s
from ..protocol.events import Outbound
from ..protocol.validation import MAX_SEED
from ..settings import OrchestratorSettings
from .blacklist import BlacklistCache
from .capacity import CapacitySignal
from .intake import Intake
from .registry import Registry

_BUS_TIMEOUTS = (TimeoutError, NatsTimeoutError)


@dataclass
class Job:
    job_id: str
    request: GenerateRequest
    dialect: Dialect
    inbox: str
    seeds: list[int]
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    cancelled: bool = False
    answered: set[int] = field(default_factory=set)  # images whose final answer is out


class CancelledInboxes:
    """The inboxes of jobs cancelled before their requester heard of a job id: a request
    served later with one of them is answered as cancelled at once. Each is kept for
    `ttl_s` (the stream's max age: no request waits longer), at most `limit` of them."""

    def __init__(self, ttl_s: float, limit: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self._until: dict[str, float] = {}  # in the order they came

    def add(self, inbox: str) -> None:
        now = time.monotonic()
        self._until.pop(inbox, None)
        self._until[inbox] = now + self.ttl_s
        while self._until and (
            len(self._until) > self.limit or next(iter(self._until.values())) < now
        ):
            del self._until[next(iter(self._until))]

    def __contains__(self, inbox: str) -> bool:
        return self._until.get(inbox, 0.0) >= time.monotonic()


class Outcome(StrEnum):
    """How one assignment of a task to a worker ended."""

    DONE = "done"
    FAILED = "failed"  # the worker reported an error (already sent to the requester)
    CANCELLED = "cancelled"
    REFUSED = "refused"  # the worker refused it, or no worker listened on its subject
    LOST = "lost"  # its heartbeats stopped: crashed, killed or cut off
    TIMEOUT = "timeout"  # it overran the task timeout


@dataclass
class Watch:
    """An assigned task being watched: its worker's heartbeats and final report (or
    its refusal of the assignment)."""

    worker_id: str
    attempt: int  # which assignment of the task this is: a refusal names it
    report: asyncio.Future[TaskReport | AssignmentRefused]
    last_heartbeat: float = field(default_factory=time.monotonic)
    step: int = 0


@dataclass
class RecruitRound:
    offer: WorkerOffer | None
    asks: int
    declined: Counter[str]

    @property
    def saturated(self) -> bool:
        """Some worker could take the task once a slot frees."""
        return self.declined[OfferReason.BUSY] > 0


class Orchestrator:
    def __init__(self, settings: OrchestratorSettings) -> None:
        self.settings = settings
        self.id = settings.orchestrator_id
        self.nc: Client | None = None
        self.db: Database | None = None
        self.recorder: JobRecorder | None = None
        self.blacklist: BlacklistCache | None = None
        self.capacity = CapacitySignal(on_unclaimed=self._slot_unclaimed)
        self._subscriptions: list[Subscription] = []
        self.intake: Intake | None = None
        self._watches: dict[tuple[str, int], Watch] = {}
        self._running_jobs: dict[str, Job] = {}
        self._cancelled_inboxes = CancelledInboxes(settings.intake_max_age_s)
        self.registry = Registry(settings.registry_warm_s)
        self.loop_lag = LoopLag()
        self._log = get_logger(orchestrator_id=self.id)

    # --- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        self.loop_lag.start()
        self.db = await Database.connect(self.settings.database_url)
        applied = await self.db.migrate()
        if applied:
            self._log.info("database migrated", versions=applied)
        self.blacklist = BlacklistCache(self.db)
        await self.blacklist.start()
        self.recorder = JobRecorder(self.db, max_backlog=self.settings.max_record_backlog)
        self.recorder.start()
        self.nc = await connect(self.settings.bus, name=f"imagebus-orchestrator-{self.id}")
        self._subscriptions = [
            await self.nc.subscribe(s.report_subject(self.id), cb=self._on_report),
            await self.nc.subscribe(s.heartbeat_subject(self.id), cb=self._on_heartbeat),
            await self.nc.subscribe(s.refusals_subscription(self.id), cb=self._on_refusal),
            await self.nc.subscribe(s.CAPACITY_SUBJECT, cb=self._on_capacity),
            await self.nc.subscribe(s.CANCEL_SUBJECT, cb=self._on_cancel),
            await self.nc.subscribe(
                s.ORCHESTRATOR_PING_SUBJECT, queue=s.ORCHESTRATOR_QUEUE, cb=self._on_ping
            ),
            await self.nc.subscribe(s.WORKER_ADVERT_SUBJECT, cb=self._on_advert),
            await self.nc.subscribe(s.ORCHESTRATOR_STATS_SUBJECT, cb=self._on_stats),
            await self.nc.subscribe(
                s.WORKERS_QUERY_SUBJECT, queue=s.ORCHESTRATOR_QUEUE, cb=self._on_workers_query
            ),
            await self.nc.subscribe(
                s.JOB_STATUS_SUBJECT, queue=s.ORCHESTRATOR_QUEUE, cb=self._on_job_status
            ),
            await self.nc.subscribe(
                s.SCHEMA_SUBJECT, queue=s.ORCHESTRATOR_QUEUE, cb=self._on_schema
            ),
        ]
        await self._ensure_results_stream()
        # Last, so nothing is taken before the orchestrator can serve it.
        self.intake = Intake(
            self.nc,
            self._serve,
            capacity=self.settings.max_concurrent_jobs,
            ack_wait_s=self.settings.intake_ack_wait_s,
            max_deliver=self.settings.intake_max_deliver,
            max_age_s=self.settings.intake_max_age_s,
            pause_reason=self._intake_pause_reason,
        )
        try:
            await self.intake.start()
        except nats.js.errors.ServiceUnavailableError:
            raise BusUnavailable(
                f"JetStream is not enabled on {self.settings.bus.nats_url}; "
                "start nats-server with -js (imagebus keeps requests in a stream)"
            ) from None
        self._log.info("orchestrator ready", nats=self.settings.bus.nats_url)

    async def settle(self, timeout: float = 10.0) -> bool:
        """Wait until no job is running here and every record is written (tests, tools).

        A requester can hold its images before the orchestrator has heard the
        workers' reports, so "the client got everything" does not mean "recorded".
        """
        deadline = time.monotonic() + timeout
        while self.intake is not None and self.intake.running:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return self.recorder is None or await self.recorder.flush(
            max(deadline - time.monotonic(), 0.1)
        )

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking requests, let running jobs finish for `grace_s`, hand back the rest."""
        if self.intake is not None:
            await self.intake.stop(grace_s)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        if self.recorder is not None:
            await self.recorder.stop()
        if self.blacklist is not None:
            await self.blacklist.stop()
        if self.db is not None:
            await self.db.close()
        await self.loop_lag.stop()
        self._log.info("orchestrator stopped")

    # --- bus callbacks (they run one at a time, so keep them short) -----------------

    async def _on_report(self, msg: Msg) -> None:
        try:
            report = decode(TaskReport, msg.data)
        except ProtocolError as exc:
            self._log.warning("malformed task report dropped", error=str(exc))
            return
        watch = self._watches.get((report.job_id, report.index))
        if watch is None or watch.worker_id != report.worker_id or watch.report.done():
            # A worker that was given up on finished after all: its result is a
            # duplicate the requester drops. Keep a trace of it.
            self._log.warning(
                "late report of a re-assigned task",
                job_id=report.job_id,
                index=report.index,
                worker_id=report.worker_id,
            )
            now = datetime.now(UTC)
            self._record(
                AttemptRecord(
                    report.job_id, report.index, 0, report.worker_id, "late", now, now, report.error
                )
            )
            return
        watch.report.set_result(report)

    async def _on_refusal(self, msg: Msg) -> None:
        """A worker refused an assignment, or the server says no one listens on the
        worker's assignment subject (status 503: the worker is gone)."""
        named = s.assignment_of_refusal(msg.subject)
        watch = self._watches.get(named[:2]) if named else None
        if named is None or watch is None or watch.attempt != named[2] or watch.report.done():
            return  # about an assignment no longer waited for
        if (msg.headers or {}).get(s.HEADER_STATUS) == s.STATUS_NO_RESPONDERS:
            refusal = AssignmentRefused(watch.worker_id, "worker not connected", 0)
            self.registry.note_free(watch.worker_id, 0)
        else:
            try:
                refusal = decode(AssignmentRefused, msg.data)
            except ProtocolError as exc:
                refusal = AssignmentRefused(watch.worker_id, f"malformed refusal: {exc}", 0)
                self.registry.note_free(watch.worker_id, 0)
            else:
                self.registry.note_free(watch.worker_id, refusal.free_slots, refusal.free_seq)
                self._hand_over_free_slots(watch.worker_id)
        watch.report.set_result(refusal)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = decode(TaskHeartbeat, msg.data)
        except ProtocolError:
            return
        watch = self._watches.get((beat.job_id, beat.index))
        if watch is not None and watch.worker_id == beat.worker_id:
            watch.last_heartbeat = time.monotonic()
            watch.step = beat.step

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = decode(JobCancel, msg.data)
        except ProtocolError:
            return
        if cancel.job_id:
            job = self._running_jobs.get(cancel.job_id)
        elif s.is_valid_inbox(cancel.inbox):
            # Its requester has no job id yet: it may run here already, or still wait
            # in the stream, and then it is cancelled when it comes to be served.
            self._cancelled_inboxes.add(cancel.inbox)
            running = (j for j in self._running_jobs.values() if j.inbox == cancel.inbox)
            job = next(running, None)
        else:
            return
        if job is not None and cancel.index is None:
            self._log.info("job cancelled", job_id=job.job_id, reason=cancel.reason)
            job.cancelled = True
            self.capacity.wake_all()  # waiting tasks notice at once

    async def _on_advert(self, msg: Msg) -> None:
        try:
            advert = decode(WorkerAdvert, msg.data)
        except ProtocolError:
            return
        self.registry.update(advert)
        self._hand_over_free_slots(advert.worker_id)  # a new worker, say

    async def _on_workers_query(self, msg: Msg) -> None:
        listing = [
            {
                "advert": dataclasses.asdict(advert),
                "last_seen_s": round(age, 2),
                "blacklisted": advert.worker_id in self._blacklist_ids(),
            }
            for advert, age in self.registry.listing()
        ]
        await self._reply(msg, msgpack.packb(listing, use_bin_type=True))

    async def _on_schema(self, msg: Msg) -> None:
        await self._reply(msg, json.dumps(request_schema(self.settings.limits)).encode())

    async def _on_job_status(self, msg: Msg) -> None:
        job_id = msg.data.decode(errors="replace").strip()
        try:
            assert self.db is not None
            found = await fetch_job_status(self.db, job_id)
        except TRANSIENT_ERRORS as exc:
            await self._reply(msg, f"the database is unreachable: {exc}".encode(), "unavailable")
            return
        if found is None:
            await self._reply(msg, f"no job {job_id!r}".encode(), "not_found")
            return
        job, tasks, attempts = found
        tasks_status = []
        for row in tasks:
            watch = self._watches.get((job_id, row["task_index"]))
            tasks_status.append(
                TaskStatus(
                    index=row["task_index"],
                    seed=row["seed"],
                    state=row["state"],
                    worker_id=row["worker_id"],
                    seconds=row["seconds"],
                    error=row["error"],
                    attempts=attempts.get(row["task_index"], 0),
                    step=watch.step if watch else 0,
                    steps=job["steps"],
                )
            )
        status = JobStatus(
            job_id=job_id,
            state=job["state"],
            n=job["n"],
            succeeded=sum(t.state == "done" for t in tasks_status),
            failed=sum(t.state == "failed" for t in tasks_status),
            prompt=job["prompt"],
            created_at=job["created_at"].isoformat(),
            finished_at=job["finished_at"].isoformat() if job["finished_at"] else None,
            tasks=tasks_status,
        )
        await self._reply(msg, encode(status))

    async def _reply(self, msg: Msg, payload: bytes, error_code: str | None = None) -> None:
        if msg.reply and self.nc is not None:
            headers = {s.HEADER_ERROR_CODE: error_code} if error_code else None
            await self.nc.publish(msg.reply, payload, headers=headers)

    async def _ensure_results_stream(self) -> None:
        assert self.nc is not None
        js = self.nc.jetstream()
        config = StreamConfig(
            name=s.RESULTS_STREAM,
            subjects=[s.RESULTS_SUBJECTS],
            description="imagebus results, for `imagebus job fetch`",
            storage=StorageType.FILE,
            max_age=self.settings.results_ttl_s,
            duplicate_window=120.0,  # a re-run image's copy is dropped: the first stays
        )
        try:
            await js.stream_info(s.RESULTS_STREAM)
        except nats.js.errors.NotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):  # created meanwhile
                await js.add_stream(config)

    async def _on_stats(self, msg: Msg) -> None:
        stats = {
            "orchestrator_id": self.id,
            "jobs_running": len(self._running_jobs),
            "tasks_assigned": len(self._watches),
            "tasks_waiting_for_a_slot": self.capacity.waiting,
            "requests_served": self.intake.served if self.intake else 0,
            "records_not_yet_written": self.recorder.backlog if self.recorder else 0,
            "taking_no_requests_because": self.intake.paused_for if self.intake else None,
            "workers_live": len(self.registry.live()),
            "loop_lag": self.loop_lag.summary(),
        }
        if msg.data.strip() == b"reset":  # benchmarks: measure lag from now on
            self.loop_lag.reset()
        await self._reply(msg, json.dumps(stats).encode())

    async def _on_ping(self, msg: Msg) -> None:
        await self._reply(msg, self.id.encode())

    async def _on_capacity(self, msg: Msg) -> None:
        try:
            notice = decode(CapacityNotice, msg.data)
        except ProtocolError:
            return
        self.registry.note_free(notice.worker_id, notice.free_slots, notice.free_seq)
        self._hand_over_free_slots(notice.worker_id)

    def _slot_unclaimed(self, worker_id: str) -> None:
        """A slot handed to a task that was cancelled before using it: free again."""
        self.registry.note_free(worker_id, self.registry.free(worker_id) + 1)
        self._hand_over_free_slots(worker_id)

    def _hand_over_free_slots(self, worker_id: str) -> None:
        """Give the worker's free slots to waiting tasks, oldest first, before any
        task that comes later can take them."""
        free = self.registry.free(worker_id)
        if free <= 0 or not self.capacity.waiting or worker_id in self._blacklist_ids():
            return
        handed = self.capacity.hand_over(
            worker_id, free, lambda call: self.registry.fits(worker_id, call)
        )
        self.registry.note_free(worker_id, free - handed)

    # --- serving one job -------------------------------------------------------------

    async def _serve(self, msg: Msg, job_id: str) -> None:
        """Serve one request (called by the intake, which acks it when this returns)."""
        headers = msg.headers or {}
        inbox = headers.get(s.HEADER_IMAGE_INBOX, "")
        dialect = dialect_of(headers)
        if not s.is_valid_inbox(inbox):
            # Without an inbox there is nowhere to answer: log it and move on.
            self._log.warning("request dropped: no valid imageInbox header", inbox=inbox[:80])
            return
        try:
            request = decode_request(msg.data, dialect, self.settings.limits)
        except RequestError as exc:
            self._log.info("request rejected", error=str(exc), field=exc.field, inbox=inbox)
            rejection = JobRejected(error=str(exc), code=ErrorCode.INVALID_REQUEST, field=exc.field)
            await self._send(events.rejected(dialect, inbox, rejection))
            return

        job = Job(
            job_id=job_id,
            request=request,
            dialect=dialect,
            inbox=inbox,
            seeds=_seeds(request, job_id),
            cancelled=inbox in self._cancelled_inboxes,  # its tasks end at once, as cancelled
        )
        log = self._log.bind(job_id=job.job_id)
        log.info(
            "job accepted", n=request.n, dialect=dialect.value, prompt=request.params.prompt[:80]
        )
        self._record(_job_row(job, self.id))
        await self._send(
            events.accepted(dialect, inbox, JobAccepted(job.job_id, request.n, job.seeds))
        )
        if job.job_id in self._running_jobs:
            # Redelivered while still running here (this orchestrator was cut off for
            # longer than the ack wait): the first copy goes on serving it.
            log.warning("request redelivered while still being served here; ignored")
            return
        self._running_jobs[job.job_id] = job
        try:
            try:
                async with asyncio.timeout(request.job_timeout_s):
                    if request.n == 1:
                        await self._run_task(job, 0)  # no task of its own: the common case
                    else:
                        await asyncio.gather(*(self._run_task(job, i) for i in range(request.n)))
            except TimeoutError:  # the images' coroutines have been cancelled
                await self._end_job_on_timeout(job)
        finally:
            del self._running_jobs[job.job_id]
        log.info("job finished")

    async def _end_job_on_timeout(self, job: Job) -> None:
        """The job timeout struck: keep the images made, fail and stop the rest."""
        error = f"the job did not finish within its job timeout of {job.request.job_timeout_s:g}s"
        unanswered = job.request.n - len(job.answered)
        for index in range(job.request.n):
            if index not in job.answered:
                # Quietly stop a worker still on it; the requester hears it from here.
                await self._publish_cancel(JobCancel(job.job_id, index, "job timeout"))
                await self._fail_task(job, index, error, ErrorCode.JOB_TIMEOUT)
        self._log.warning("job timed out", job_id=job.job_id, unanswered=unanswered)

    async def _run_task(self, job: Job, index: int) -> None:
        """Recruit, assign and watch one image until it is answered, one way or another."""
        try:
            await self._dispatch(job, index)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must still answer the requester, and say so
            self._log.exception("task crashed", job_id=job.job_id, index=index)
            if index not in job.answered:
                await self._fail_task(job, index, f"internal error: {exc!r}", ErrorCode.INTERNAL)

    async def _dispatch(self, job: Job, index: int) -> None:
        log = self._log.bind(job_id=job.job_id, index=index)
        params = job.request.params
        requirements = job.request.requirements
        call = RecruitCall(
            job_id=job.job_id,
            index=index,
            orchestrator_id=self.id,
            width=params.width,
            height=params.height,
            steps=params.steps,
            model=params.model,
            device=requirements.device,
            min_vram_gb=requirements.min_vram_gb,
        )
        unfit = self.registry.unfit_everywhere(call, self._blacklist_ids())
        if unfit is not None:
            # No registered worker could ever take it: say so now, not after a wait.
            log.warning("task failed: no fitting worker", error=unfit)
            await self._fail_task(job, index, unfit, ErrorCode.NO_FITTING_WORKER)
            return
        queue_timeout = job.request.queue_timeout_s or self.settings.queue_timeout_s
        deadline = time.monotonic() + queue_timeout
        asks = 0
        lost = 0  # assignments whose worker died or overran
        assignments = 0  # refused ones included: each is an attempt on record
        heard_lately = True  # whether the free-slot view can be trusted to say "all busy"
        handed: str | None = None  # a slot handed to this task while it waited
        was_in_line = False  # it waited already: if it must wait again, it goes first
        while True:
            if job.cancelled:
                await self._fail_task(job, index, "cancelled by the requester", ErrorCode.CANCELLED)
                return
            round_ = await self._find_worker(call, trust_view=heard_lately, handed=handed)
            handed = None
            asks += round_.asks
            offer = round_.offer
            if offer is not None:
                assignments += 1
                outcome = await self._attempt(job, index, offer, asks, attempt=assignments)
                if outcome in (Outcome.DONE, Outcome.FAILED, Outcome.CANCELLED):
                    job.answered.add(index)
                    return
                if outcome is Outcome.REFUSED and time.monotonic() < deadline:
                    continue  # the worker did not take it: find another
                if outcome is Outcome.REFUSED:
                    error = f"no worker took the image within {queue_timeout:g}s"
                    await self._fail_task(job, index, error, ErrorCode.QUEUE_TIMEOUT)
                    return
                lost += 1
                if lost > self.settings.max_reassignments:
                    error = (
                        f"gave up after {lost} workers failed to finish the image "
                        f"(last: {offer.worker_id}, {outcome.value})"
                    )
                    code = (
                        ErrorCode.WORKER_LOST if outcome is Outcome.LOST else ErrorCode.TASK_TIMEOUT
                    )
                    log.warning("task failed", error=error)
                    await self._fail_task(job, index, error, code, worker_id=offer.worker_id)
                    return
                log.warning("re-assigning task", reason=outcome.value, worker_id=offer.worker_id)
                deadline = time.monotonic() + queue_timeout
                continue
            remaining = deadline - time.monotonic()
            # Wait for a slot if the pool is merely busy, if this task's worker was
            # lost (its replacement may be restarting right now), or if a fitting
            # worker is registered but the queue group kept picking unfit ones.
            worth_waiting = (
                round_.saturated
                or lost
                or self.registry.fits_somewhere(call, self._blacklist_ids())
            )
            if worth_waiting and remaining > 0:
                # A wait that no capacity notice ends means the view may be stale (a
                # notice lost, a worker restarted): the next try asks around instead.
                heard_lately, handed = await self.capacity.wait(
                    call, min(remaining, 1.0), first=was_in_line
                )
                was_in_line = True
                continue
            if worth_waiting:
                error = f"no worker slot freed up within {queue_timeout:g}s"
                code = ErrorCode.QUEUE_TIMEOUT
            else:
                error = f"no worker available after {asks} attempts ({_describe(round_.declined)})"
                code = ErrorCode.NO_WORKER
            log.warning("task failed: no worker", error=error, attempts=asks)
            await self._fail_task(job, index, error, code, attempts=asks)
            return

    async def _find_worker(
        self, call: RecruitCall, *, trust_view: bool, handed: str | None = None
    ) -> RecruitRound:
        """The fast path first: a slot handed to the task while it waited, or a worker
        the pool view says has a free slot, is assigned directly (it refuses if it has
        no room after all). If the view says every fitting worker is busy, wait rather
        than ask around; otherwise recruit."""
        blacklisted = self._blacklist_ids()
        worker_id = handed or self.registry.claim(call, blacklisted)
        if worker_id is not None:
            return RecruitRound(_direct_offer(worker_id), 1, Counter())
        if trust_view and self.registry.all_busy(call, blacklisted):
            return RecruitRound(None, 0, Counter({OfferReason.BUSY.value: 1}))
        return await self._recruit(call)

    async def _recruit(self, call: RecruitCall) -> RecruitRound:
        assert self.nc is not None
        declined: Counter[str] = Counter()
        payload = encode(call)
        for ask in range(1, self.settings.max_attempts + 1):
            try:
                reply = await self.nc.request(
                    s.RECRUIT_SUBJECT, payload, timeout=self.settings.recruit_timeout_s
                )
            except NoRespondersError:
                declined["no worker connected"] += 1
                # Workers may be starting: back off a little before asking again.
                await asyncio.sleep(min(0.05 * 2 ** (ask - 1), 0.5))
                continue
            except _BUS_TIMEOUTS:
                declined["no answer"] += 1
                continue
            try:
                offer = decode(WorkerOffer, reply.data)
            except ProtocolError:
                declined["malformed answer"] += 1
                continue
            if not s.is_valid_worker_id(offer.worker_id):
                declined["invalid worker id"] += 1
                continue
            if not offer.willing:
                declined[offer.reason or OfferReason.BUSY] += 1
                continue
            if offer.worker_id in self._blacklist_ids():
                declined["blacklisted"] += 1
                await self._release(offer)
                continue
            return RecruitRound(offer, ask, declined)
        return RecruitRound(None, self.settings.max_attempts, declined)

    async def _attempt(
        self, job: Job, index: int, offer: WorkerOffer, asks: int, attempt: int
    ) -> Outcome:
        """Assign the task to `offer`'s worker and watch it until it ends.

        A worker that takes it says nothing (its consent is silent, which saves a
        message and a round trip per image); one that does not answers on the
        assignment's reply subject, as does the server if no worker listens there.
        Taken, it must send a heartbeat at least every `heartbeat_timeout_s` until
        its report arrives, within `task_timeout_s`.
        """
        assert self.nc is not None
        key = (job.job_id, index)
        assignment = TaskAssignment(
            job_id=job.job_id,
            index=index,
            seed=job.seeds[index],
            params=job.request.params_for(index),
            reply_inbox=job.inbox,
            dialect=job.dialect.value,
            reservation_id=offer.reservation_id or "",
            report_subject=s.report_subject(self.id),
            heartbeat_subject=s.heartbeat_subject(self.id),
        )
        watch = Watch(offer.worker_id, attempt, asyncio.get_running_loop().create_future())
        self._watches[key] = watch  # before assigning: a fast worker may report at once
        log = self._log.bind(job_id=job.job_id, index=index, worker_id=offer.worker_id)
        started_at = datetime.now(UTC)
        try:
            await self.nc.publish(
                s.worker_assign_subject(offer.worker_id),
                encode(assignment),
                reply=s.refusal_subject(self.id, job.job_id, index, attempt),
            )
            log.info("task assigned", attempts=asks, attempt=attempt)
            self._record(
                TaskUpdate(
                    job.job_id,
                    index,
                    "running",
                    worker_id=offer.worker_id,
                    recruit_attempts=asks,
                    assigned_at=started_at,
                )
            )
            outcome, report = await self._watch(
                watch, job.request.task_timeout_s or self.settings.task_timeout_s
            )
        finally:
            self._watches.pop(key, None)
        if isinstance(report, AssignmentRefused):
            # A direct assignment on a stale view is refused now and then: not news.
            log.log(
                logging.INFO if offer.reservation_id is None else logging.WARNING,
                "assignment refused; recruiting again",
                reason=report.reason,
            )
            self._record(
                AttemptRecord(
                    job.job_id, index, attempt, offer.worker_id, outcome.value, started_at,
                    datetime.now(UTC), report.reason,
                )
            )  # fmt: skip
            return outcome
        error = report.error if report else f"worker {outcome.value}"
        self._record(
            AttemptRecord(
                job.job_id, index, attempt, offer.worker_id, outcome.value, started_at,
                datetime.now(UTC), error if outcome is not Outcome.DONE else None,
            )
        )  # fmt: skip
        if report is None:
            # Lost or overran: make sure it stops and frees its slot, then re-assign.
            await self._publish_cancel(JobCancel(job.job_id, index, f"re-assigned: {outcome}"))
            return outcome
        state = "done" if report.ok else "failed"
        log.info("task finished", state=state, seconds=round(report.seconds, 3), error=report.error)
        self._record(
            TaskUpdate(
                job.job_id,
                index,
                state,
                worker_id=report.worker_id,
                finished_at=datetime.now(UTC),
                seconds=report.seconds,
                error=report.error,
                error_code=report.code,
            )
        )
        return outcome

    async def _watch(
        self, watch: Watch, task_timeout: float
    ) -> tuple[Outcome, TaskReport | AssignmentRefused | None]:
        deadline = time.monotonic() + task_timeout
        while True:
            check_in = min(
                self.settings.heartbeat_timeout_s / 2, max(deadline - time.monotonic(), 0)
            )
            try:
                async with asyncio.timeout(check_in):
                    report = await asyncio.shield(watch.report)
            except TimeoutError:
                now = time.monotonic()
                if now >= deadline:
                    return Outcome.TIMEOUT, None
                if now - watch.last_heartbeat > self.settings.heartbeat_timeout_s:
                    return Outcome.LOST, None
                continue
            if isinstance(report, AssignmentRefused):
                return Outcome.REFUSED, report
            if report.code == ErrorCode.CANCELLED:
                return Outcome.CANCELLED, report
            return (Outcome.DONE if report.ok else Outcome.FAILED), report

    async def _fail_task(
        self,
        job: Job,
        index: int,
        error: str,
        code: ErrorCode,
        *,
        attempts: int | None = None,
        worker_id: str | None = None,
    ) -> None:
        job.answered.add(index)
        result = TaskResult(
            job_id=job.job_id,
            index=index,
            ok=False,
            seed=job.seeds[index],
            worker_id=worker_id,
            error=error,
            code=code,
        )
        await self._send(events.result(job.dialect, job.inbox, result))
        self._record(
            TaskUpdate(
                job.job_id,
                index,
                "failed",
                worker_id=worker_id,
                recruit_attempts=attempts,
                finished_at=datetime.now(UTC),
                error=error,
                error_code=code,
            )
        )

    # --- helpers -------------------------------------------------------------------

    async def _release(self, offer: WorkerOffer) -> None:
        if offer.reservation_id and self.nc is not None:
            release = ReservationRelease(offer.reservation_id)
            await self.nc.publish(s.worker_release_subject(offer.worker_id), encode(release))

    async def _publish_cancel(self, cancel: JobCancel) -> None:
        if self.nc is not None:
            await self.nc.publish(s.CANCEL_SUBJECT, encode(cancel))

    async def _send(self, out: Outbound | None) -> None:
        if out is not None and self.nc is not None:
            await self.nc.publish(out.subject, out.payload, headers=out.headers)

    def _intake_pause_reason(self) -> str | None:
        if self.recorder is not None and self.recorder.full:
            return (
                f"{self.recorder.backlog} records are waiting for PostgreSQL "
                f"(IMAGEBUS_MAX_RECORD_BACKLOG={self.recorder.max_backlog})"
            )
        return None

    def _record(self, record: Record) -> None:
        if self.recorder is not None:
            self.recorder.add(record)

    def _blacklist_ids(self) -> frozenset[str]:
        return self.blacklist.ids if self.blacklist is not None else frozenset()


def _seeds(request: GenerateRequest, job_id: str) -> list[int]:
    """One seed per image: consecutive from the given seed, else derived from the job id
    (random-looking, and the same if the request is redelivered and served again)."""
    if request.seed is not None:
        return [request.seed + i for i in range(request.n)]
    return [
        int.from_bytes(hashlib.blake2b(f"{job_id}:{i}".encode(), digest_size=4).digest()) & MAX_SEED
        for i in range(request.n)
    ]


def _job_row(job: Job, orchestrator_id: str) -> JobRow:
    params = job.request.params
    return JobRow(
        job_id=job.job_id,
        orchestrator_id=orchestrator_id,
        dialect=job.dialect.value,
        inbox=job.inbox,
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        model=params.model,
        width=params.width,
        height=params.height,
        steps=params.steps,
        guidance=params.guidance,
        n=job.request.n,
        created_at=job.created_at,
        seeds=job.seeds,
    )


def _direct_offer(worker_id: str) -> WorkerOffer:
    """Stands for the offer a worker would make: no reservation; the worker takes the
    assignment, or refuses it."""
    return WorkerOffer(worker_id=worker_id, willing=True, slots=0, free_slots=0, device="")


def _describe(declined: Counter[str]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in declined.most_common()) or "none"
