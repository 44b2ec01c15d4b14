"""The orchestrator: takes requests from `img-gen`, recruits workers, records jobs.

One request (a *job*) of n images becomes n *tasks*, each dispatched on its own
(dispatch.py: recruit, assign, watch, settle). This module wires the parts
together, starts and stops them, and holds the callbacks for the workers'
messages (reports, heartbeats, refusals, adverts, freed slots) and cancellations.
The control plane (ping, stats, workers, schema, job status, the blacklist) is in
control.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime

import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import StorageType, StreamConfig

from ..connections import BusUnavailable, connect
from ..db import AttemptRecord, BlacklistCache, Database, JobRecorder, Record
from ..logs import get_logger
from ..looplag import LoopLag
from ..metrics import MetricsServer
from ..protocol import (
    AssignmentRefused,
    CapacityNotice,
    ErrorCode,
    JobAccepted,
    JobRejected,
    ProtocolError,
    RequestError,
    TaskHeartbeat,
    TaskReport,
    WorkerAdvert,
    decode,
    decode_request,
    dialect_of,
    events,
)
from ..protocol import subjects as s
from ..protocol.auth import AuthError, orchestrator_event_key, secret_of
from ..protocol.control import LoopLagSummary, OrchestratorStats
from ..protocol.events import Outbound
from ..settings import OrchestratorSettings
from .attempts import AttemptOutcome
from .breaker import Breaker
from .cancels import Cancels
from .capacity import CapacitySignal
from .control import ControlPlane
from .dispatch import Dispatcher
from .figures import PoolFigures
from .handoff import take_over
from .intake import Intake, IntakeLimits, redelivered
from .jobs import CancelledInboxes, RunningJob, seeds_for
from .metrics import serve_metrics
from .registry import Registry
from .senders import advert_problem, assigned_to_sender, from_sender, notice_problem
from .verify import Verifier, start_verification
from .watch import Watches


class Orchestrator:
    def __init__(self, settings: OrchestratorSettings) -> None:
        self.settings = settings
        self.id = settings.orchestrator_id
        self.nc: Client | None = None
        self.db: Database | None = None
        self.recorder: JobRecorder | None = None
        self.blacklist: BlacklistCache | None = None
        self.dispatcher: Dispatcher | None = None
        self.intake: Intake | None = None
        self.verifier: Verifier | None = None  # re-runs a sample of images; trust levels
        self.capacity = CapacitySignal(on_unclaimed=self._slot_unclaimed)
        breaker = Breaker(
            settings.breaker_failures, settings.breaker_backoff_s, settings.breaker_max_backoff_s
        )
        self.registry = Registry(settings.registry_warm_s, breaker)
        self.loop_lag = LoopLag()
        self.figures = PoolFigures()  # for dashboards and metrics, from the records
        self._metrics: MetricsServer | None = None
        self._subscriptions: list[Subscription] = []
        self._running_jobs: dict[str, RunningJob] = {}
        # The tasks assigned now, by (job id, index): dispatch watches them, the
        # workers' reports and heartbeats land in them.
        self._watches = Watches()
        self._cancelled_inboxes = CancelledInboxes(settings.intake_max_age_s)
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
        self.nc = nc = await connect(self.settings.bus, name=f"imagebus-orchestrator-{self.id}")
        self.verifier = verifier = await start_verification(
            nc, self.settings, self.db, self.registry, self.blacklist, self._log
        )
        self.dispatcher = Dispatcher(
            nc,
            self.settings,
            self.registry,
            self.capacity,
            self._watches,
            self._blacklist_ids,
            self._record,
            self._log,
            held_back=lambda trusted_only: verifier.book.held_back(self._watches, trusted_only),
        )
        control = ControlPlane(
            nc,
            self.id,
            limits=self.settings.limits,
            db=self.db,
            blacklist=self.blacklist,
            registry=self.registry,
            watches=self._watches,
            waiting=self.dispatcher.waiting,
            stats=self._stats,
            loop_lag=self.loop_lag,
            figures=self.figures,
            log=self._log,
            trust=verifier.book,
        )
        cancels = Cancels(
            nc,
            self._running_jobs,
            self._watches,
            self._cancelled_inboxes,
            self.capacity.wake_all,
            self._log,
        )
        self._subscriptions = [
            await nc.subscribe(s.report_subject(self.id), cb=self._on_report),
            await nc.subscribe(s.heartbeat_subject(self.id), cb=self._on_heartbeat),
            await nc.subscribe(s.refusals_subscription(self.id), cb=self._on_refusal),
            await nc.subscribe(s.capacity_subject(), cb=self._on_capacity),
            await nc.subscribe(s.CANCEL_SUBJECT, cb=cancels.on_cancel),
            await nc.subscribe(s.ADMIN_CANCEL_SUBJECT, cb=cancels.on_admin_cancel),
            await nc.subscribe(s.worker_advert_subject(), cb=self._on_advert),
            *await control.subscribe(),
        ]
        if self.settings.metrics_port is not None:
            self._metrics = serve_metrics(
                self.settings.metrics_port, control.pool_snapshot, control.worker_listing
            )
        await self._ensure_results_stream()
        await self._start_intake()  # late, so nothing is taken before it can be served
        self._subscriptions.append(await control.answer_pings())  # ready: requests are kept
        self._log.info("orchestrator ready", nats=self.settings.bus.nats_url)

    async def _start_intake(self) -> None:
        assert self.nc is not None
        self.intake = Intake(
            self.nc,
            self._serve,
            capacity=self.settings.max_concurrent_jobs,
            ack_wait_s=self.settings.intake_ack_wait_s,
            max_deliver=self.settings.intake_max_deliver,
            limits=IntakeLimits(
                max_request_bytes=self.settings.limits.max_payload_bytes,
                max_bytes=self.settings.intake_max_bytes,
                max_msgs=self.settings.intake_max_msgs,
                max_age_s=self.settings.intake_max_age_s,
            ),
            pause_reason=self._intake_pause_reason,
        )
        try:
            await self.intake.start()
        except nats.js.errors.ServiceUnavailableError:
            raise BusUnavailable(
                f"JetStream is not enabled on {self.settings.bus.nats_url}; "
                "start nats-server with -js (imagebus keeps requests in a stream)"
            ) from None

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
        if self.verifier is not None:
            await self.verifier.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        if self.recorder is not None:
            await self.recorder.stop()
        if self.blacklist is not None:
            await self.blacklist.stop()
        if self.db is not None:
            await self.db.close()
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.stop)
        await self.loop_lag.stop()
        self._log.info("orchestrator stopped")

    # --- the workers' messages (callbacks run one at a time, so keep them short) -----

    async def _on_report(self, msg: Msg) -> None:
        try:
            report = decode(TaskReport, msg.data)
        except ProtocolError as exc:
            self._log.warning("malformed task report dropped", error=str(exc))
            return
        if not from_sender(msg, report.worker_id):  # a worker reporting as another
            self._log.warning("report dropped: sent as another worker", subject=msg.subject)
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
                    report.job_id, report.index, 0, report.worker_id, AttemptOutcome.LATE.value,
                    now, now, report.error,
                )
            )  # fmt: skip
            return
        watch.report.set_result(report)
        if self.verifier is not None:  # maybe re-run it on a trusted worker, and compare
            self.verifier.consider(self._running_jobs.get(report.job_id), report)

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
                self.registry.note_free(
                    watch.worker_id, refusal.free_slots, refusal.free_seq, refusal.instance
                )
                self._hand_over_free_slots(watch.worker_id)
        watch.report.set_result(refusal)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = decode(TaskHeartbeat, msg.data)
        except ProtocolError:
            return
        watch = self._watches.get((beat.job_id, beat.index))
        if watch is not None and assigned_to_sender(msg, watch.worker_id, beat.worker_id):
            watch.beat(beat, time.monotonic())  # dispatch's watch tells a stall from it

    async def _on_advert(self, msg: Msg) -> None:
        try:
            advert = decode(WorkerAdvert, msg.data)
        except ProtocolError:
            return
        if problem := advert_problem(msg, advert):
            self._log.warning("advert dropped", problem=problem, subject=msg.subject)
            return
        self.registry.update(advert)
        self._hand_over_free_slots(advert.worker_id)  # a new worker, say

    async def _on_capacity(self, msg: Msg) -> None:
        try:
            notice = decode(CapacityNotice, msg.data)
        except ProtocolError:
            return
        if notice_problem(msg, notice):
            return  # a worker speaking for another, or nonsense: not believed
        self.registry.note_free(
            notice.worker_id, notice.free_slots, notice.free_seq, notice.instance
        )
        self._hand_over_free_slots(notice.worker_id)

    def _slot_unclaimed(self, worker_id: str) -> None:
        """A slot handed to a task that was cancelled before using it: free again."""
        self.registry.unclaim(worker_id)
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
        secret = None
        try:
            secret = secret_of(headers)  # None: the prototype's client, unauthenticated
            request = decode_request(msg.data, dialect, self.settings.limits)
        except (RequestError, AuthError) as exc:
            field = exc.field if isinstance(exc, RequestError) else s.HEADER_JOB_SECRET
            self._log.info("request rejected", error=str(exc), field=field, inbox=inbox)
            rejection = JobRejected(error=str(exc), code=ErrorCode.INVALID_REQUEST, field=field)
            key = orchestrator_event_key(secret)
            await self._send(events.rejected(dialect, inbox, rejection, key))
            return
        job = RunningJob(
            job_id=job_id,
            request=request,
            dialect=dialect,
            inbox=inbox,
            seeds=seeds_for(request, job_id),
            # Cancelled by its owner while it waited: its tasks end at once, as cancelled.
            cancelled=self._cancelled_inboxes.cancels(inbox, secret),
            secret=secret,
        )
        log = self._log.bind(job_id=job.job_id)
        log.info(
            "job accepted", n=request.n, dialect=dialect.value, prompt=request.params.prompt[:80]
        )
        self._record(job.row(self.id))
        accepted = JobAccepted(job.job_id, request.n, job.seeds)
        await self._send(events.accepted(dialect, inbox, accepted, job.event_key))
        if job.job_id in self._running_jobs:
            # Redelivered while still running here (this orchestrator was cut off for
            # longer than the ack wait): the first copy goes on serving it.
            log.warning("request redelivered while still being served here; ignored")
            return
        assert self.dispatcher is not None and self.nc is not None
        self._running_jobs[job.job_id] = job
        try:
            if redelivered(msg):  # served before (its orchestrator died, say)
                left = await take_over(
                    self.nc, job, self.id, [w.worker_id for w in self.registry.live()],
                    self._watches, self._send, self._record, log,
                )  # fmt: skip
                await self.dispatcher.run_job(job, left.indexes, left.adopted)
            else:
                await self.dispatcher.run_job(job)
        finally:
            del self._running_jobs[job.job_id]
        log.info("job finished")

    # --- helpers -------------------------------------------------------------------

    def _stats(self, loop_lag: LoopLagSummary) -> OrchestratorStats:
        return OrchestratorStats(
            orchestrator_id=self.id,
            jobs_running=len(self._running_jobs),
            tasks_assigned=len(self._watches),
            tasks_waiting_for_a_slot=self.capacity.waiting,
            requests_served=self.intake.served if self.intake else 0,
            records_not_yet_written=self.recorder.backlog if self.recorder else 0,
            taking_no_requests_because=self.intake.paused_for if self.intake else None,
            workers_live=len(self.registry.live()),
            loop_lag=loop_lag,
        )

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
        self.figures.observe(record)
        if self.recorder is not None:
            self.recorder.add(record)

    def _blacklist_ids(self) -> frozenset[str]:
        return self.blacklist.ids if self.blacklist is not None else frozenset()
