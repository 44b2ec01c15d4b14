"""One task's state machine: recruit a worker, assign the task, watch it, settle it.

1. recruit: a slot handed over while the task waited, or a worker the pool view says
   has room, is assigned directly; otherwise ask `request-worker` (one random worker
   of the queue group answers) until a willing, non-blacklisted worker offers a
   reserved slot, at most `max_attempts` asks per round. A round that found none
   for a reason that may change (every worker busy, none connected at all, workers
   restarting or resting) means a wait: for a freed slot or a new worker, then it
   tries again, up to `queue_timeout_s`; the job's status says why it waits. A round
   that met only workers that could never take it (blacklisted, or not holding the
   model, device or size asked for) fails the task.
2. assign: send the TaskAssignment to that worker's own subject. It takes it
   silently, or refuses it on the assignment's reply subject.
3. watch: the worker streams progress and the result straight to the requester and
   sends a TaskReport here, with heartbeats meanwhile. A failure that is the worker's
   fault (its GPU, driver or model) goes to the orchestrator only.
4. settle: each attempt ends in an `AttemptOutcome`; `classify` says what follows
   (answered, recruit again, re-assign: a worker's fault is re-assigned to another
   worker, not the same one if another fits). The worker's circuit breaker hears
   the verdict. The task's record is written behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from nats.aio.client import Client
from structlog.typing import FilteringBoundLogger

from ..db import AttemptRecord, Record, TaskUpdate
from ..protocol import (
    AssignmentRefused,
    ErrorCode,
    Fault,
    JobCancel,
    RecruitCall,
    TaskAssignment,
    TaskReport,
    TaskResult,
    TaskState,
    WorkerOffer,
    encode,
    events,
)
from ..protocol import subjects as s
from ..settings import OrchestratorSettings
from .adoption import adopted_offer
from .attempts import (
    AttemptOutcome,
    Next,
    TaskFailure,
    TaskRun,
    after_attempt,
    classify,
    says_worker_works,
)
from .cancels import tell_worker
from .capacity import CapacitySignal
from .jobs import RunningJob
from .recruit import Recruiter, RecruitRound, describe
from .registry import Registry
from .watch import Watch


class Dispatcher:
    """Runs a job's tasks. It keeps the tasks assigned now in `watches`, by (job id,
    index), where the orchestrator's callbacks deliver the workers' reports and
    heartbeats, and why each task waiting for a worker waits in `waiting` (for the
    job's status)."""

    def __init__(
        self,
        nc: Client,
        settings: OrchestratorSettings,
        registry: Registry,
        capacity: CapacitySignal,
        watches: dict[tuple[str, int], Watch],
        blacklisted: Callable[[], frozenset[str]],
        record: Callable[[Record], None],
        log: FilteringBoundLogger,
        held_back: Callable[[bool], frozenset[str]] = lambda trusted_only: frozenset(),
    ) -> None:
        self.nc = nc
        self.settings = settings
        self.id = settings.orchestrator_id
        self.registry = registry
        self.capacity = capacity
        self._blacklisted = blacklisted
        self._record = record
        self._log = log
        # Workers on probation a task must not go to now (trust.py): (trusted_only) -> ids.
        self._held_back = held_back
        self.watches = watches
        self.waiting: dict[tuple[str, int], str] = {}
        self.recruiter = Recruiter(
            nc,
            registry,
            blacklisted,
            max_attempts=settings.max_attempts,
            recruit_timeout_s=settings.recruit_timeout_s,
        )

    async def run_job(
        self,
        job: RunningJob,
        indexes: Sequence[int] | None = None,
        adopted: Mapping[int, str] | None = None,
    ) -> None:
        """Run the job's tasks (`indexes`, by default all) until each is answered or the
        job times out. Those `adopted` (adoption.py) run on a worker already, by index:
        they are watched there first."""
        adopted = adopted or {}
        try:
            async with asyncio.timeout(job.request.job_timeout_s):
                if indexes is None and job.request.n == 1:
                    await self.run_task(job, 0)  # no task of its own: the common case
                else:
                    todo = range(job.request.n) if indexes is None else indexes
                    await asyncio.gather(*(self.run_task(job, i, adopted.get(i)) for i in todo))
        except TimeoutError:  # the images' coroutines have been cancelled
            await self._end_job_on_timeout(job)

    async def _end_job_on_timeout(self, job: RunningJob) -> None:
        """The job timeout struck: keep the images made, fail and stop the rest."""
        error = f"the job did not finish within its job timeout of {job.request.job_timeout_s:g}s"
        job.timed_out = True
        unanswered = job.request.n - len(job.answered)
        for index in range(job.request.n):
            if index not in job.answered:
                # Quietly stop a worker still on it; the requester hears it from here.
                if index in job.workers:
                    cancel = JobCancel(job.job_id, index, "job timeout")
                    await tell_worker(self.nc, job.workers[index], cancel)
                await self.fail_task(job, index, TaskFailure(error, ErrorCode.JOB_TIMEOUT))
        self._log.warning("job timed out", job_id=job.job_id, unanswered=unanswered)

    async def run_task(self, job: RunningJob, index: int, adopted_by: str | None = None) -> None:
        """Recruit, assign and watch one image until it is answered, one way or another
        (watch it on `adopted_by` first, the worker that runs it already, if given)."""
        try:
            await self._dispatch(job, index, adopted_by)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must still answer the requester, and say so
            self._log.exception("task crashed", job_id=job.job_id, index=index)
            if index not in job.answered:
                failure = TaskFailure(f"internal error: {exc!r}", ErrorCode.INTERNAL)
                await self.fail_task(job, index, failure)
        finally:
            self.waiting.pop((job.job_id, index), None)
            self.watches.pop((job.job_id, index), None)  # an adopted one never attempted

    async def _dispatch(self, job: RunningJob, index: int, adopted_by: str | None) -> None:
        task = self._start(job, index)
        task.adopted_by = adopted_by
        blacklisted = self._blacklisted()
        unfit = None if adopted_by else self.registry.unfit_everywhere(task.call, blacklisted)
        if unfit is not None:
            # No registered worker could ever take it: say so now, not after a wait.
            task.log.warning("task failed: no fitting worker", error=unfit)
            await self.fail_task(job, index, TaskFailure(unfit, ErrorCode.NO_FITTING_WORKER))
            return
        while True:
            if job.timed_out:
                return  # answered by _end_job_on_timeout already
            if job.cancelled:
                failure = TaskFailure(job.cancel_reason, ErrorCode.CANCELLED)
                break
            if task.adopted_by is not None:  # it runs there already: watched, not recruited
                round_ = RecruitRound(adopted_offer(task.adopted_by), 0, Counter())
            else:
                round_ = await self.recruiter.find_worker(
                    task.call, trust_view=task.heard_lately, handed=task.handed,
                    avoid=self._avoid(task),
                )  # fmt: skip
            task.handed = None
            task.asks += round_.asks
            if round_.asks:  # not a wait the pool view advised (no ask made)
                task.declined.update(round_.declined)
            if round_.offer is None:
                found = await self._wait_for_slot(task, round_)
            elif (job.cancelled or job.timed_out) and task.adopted_by is None:
                # Cancelled (or timed out) while a worker was being found: its cancel
                # could not name that worker, so the image must not go there.
                await self.recruiter.give_back(round_.offer)
                continue
            else:
                outcome = await self._attempt(task, round_.offer)
                if classify(outcome) is Next.ANSWERED:
                    job.answered.add(index)
                    return
                found = after_attempt(task, round_.offer, outcome, self.settings.max_reassignments)
            if found is not None:
                failure = found
                break
        await self.fail_task(job, index, failure)

    def _start(self, job: RunningJob, index: int) -> TaskRun:
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
        queue_timeout = job.request.queue_timeout_s or self.settings.queue_timeout_s
        log = self._log.bind(job_id=job.job_id, index=index)
        return TaskRun(job, index, call, queue_timeout, time.monotonic() + queue_timeout, log)

    def _avoid(self, task: TaskRun) -> frozenset[str]:
        """The workers that failed the task already, if another live one fits it, and
        those on probation it must not go to now."""
        held = self._held_back(task.job.request.trusted_only)
        tried = frozenset(task.tried)
        if tried and self.registry.fits_somewhere(task.call, self._blacklisted() | tried | held):
            return tried | held
        return held

    async def _wait_for_slot(self, task: TaskRun, round_: RecruitRound) -> TaskFailure | None:
        """After a round that found no worker: wait for a slot or a worker (None), or
        give up. It waits unless the round met only workers that could never take it
        (blacklisted or unfit), and no fitting worker is registered: none connected at
        all is a wait (workers may be starting or restarting), not a failure."""
        remaining = task.deadline - time.monotonic()
        worth_waiting = (
            not round_.hopeless
            or task.lost
            or self.registry.fits_somewhere(task.call, self._blacklisted())
        )
        if worth_waiting and remaining > 0:
            self.waiting[(task.job.job_id, task.index)] = self._why_waiting(round_)
            # A wait that no capacity notice ends means the view may be stale (a
            # notice lost, a worker restarted): the next try asks around instead.
            task.heard_lately, task.handed = await self.capacity.wait(
                task.call, min(remaining, 1.0), first=task.was_in_line
            )
            task.was_in_line = True
            return None
        attempts = sum(task.declined.values())  # the count its reasons add up to
        if not worth_waiting:
            error = f"no worker available after {attempts} attempts ({describe(task.declined)})"
            code = ErrorCode.NO_WORKER
        elif round_.empty_pool:
            error = (
                f"no worker available within {task.queue_timeout:g}s: no worker connected "
                f"({attempts} attempts)"
            )
            code = ErrorCode.NO_WORKER
        else:
            error = (
                f"no worker slot freed up within {task.queue_timeout:g}s "
                f"({attempts} attempts: {describe(task.declined)})"
            )
            code = ErrorCode.QUEUE_TIMEOUT
        task.log.warning("task failed: no worker", error=error, attempts=task.asks)
        return TaskFailure(error, code, attempts=task.asks)

    def _why_waiting(self, round_: RecruitRound) -> str:
        """What a waiting task's status says it waits for."""
        if round_.empty_pool and not self.registry.live():
            return "no worker connected"
        if round_.saturated:
            return "every fitting worker is busy"
        return f"no worker free ({describe(round_.declined)})"

    async def _attempt(self, task: TaskRun, offer: WorkerOffer) -> AttemptOutcome:
        """Assign the task to `offer`'s worker and watch it until it ends.

        A worker that takes it says nothing (its consent is silent, which saves a
        message and a round trip per image); one that does not answers on the
        assignment's reply subject, as does the server if no worker listens there.
        Taken, it must send a heartbeat at least every `heartbeat_timeout_s` until
        its report arrives, within `task_timeout_s`.
        """
        job = task.job
        key = (job.job_id, task.index)
        self.waiting.pop(key, None)
        self.registry.breaker.assigned(offer.worker_id)
        # An adopted task's watch was set up when its worker answered (adoption.py),
        # with the attempt it runs under: a re-assignment from here numbers on from it.
        adopted, task.adopted_by = self.watches.get(key) if task.adopted_by else None, None
        task.assignments = adopted.attempt if adopted is not None else task.assignments + 1
        watch = adopted or Watch(
            offer.worker_id, task.assignments, asyncio.get_running_loop().create_future()
        )
        self.watches[key] = watch  # before assigning: a fast worker may report at once
        log = task.log.bind(worker_id=offer.worker_id)
        started_at = datetime.now(UTC)
        try:
            if adopted is None:
                await self._assign(task, offer, watch.attempt, started_at)
            else:  # its worker makes it already: only its record changes hands
                self._record(TaskUpdate(job.job_id, task.index, TaskState.RUNNING,
                                        worker_id=offer.worker_id))  # fmt: skip
            log.info("task adopted" if adopted is not None else "task assigned",
                     attempts=task.asks, attempt=watch.attempt)  # fmt: skip
            timeout = job.request.task_timeout_s or self.settings.task_timeout_s
            outcome, report = await watch.until_ended(timeout, self.settings)
        except BaseException:  # cancelled (its job timed out, say): no verdict on the worker
            self.registry.breaker.ended(offer.worker_id)
            raise
        finally:
            self.watches.pop(key, None)
        if isinstance(report, TaskReport) and not report.ok and report.fault == Fault.WORKER:
            outcome = AttemptOutcome.WORKER_FAULT  # not sent to the requester: try another
            task.last_error = report.error
        breaker = self.registry.breaker
        if breaker.judge(offer.worker_id, says_worker_works(outcome)):
            view = breaker.view(offer.worker_id)
            log.warning("worker's breaker open: no work for it meanwhile",
                        failures=view.failures, seconds=round(view.open_for_s, 1))  # fmt: skip
        await self._settle(task, offer, watch.attempt, started_at, outcome, report, log)
        return outcome

    async def _assign(
        self, task: TaskRun, offer: WorkerOffer, attempt: int, started_at: datetime
    ) -> None:
        job, index = task.job, task.index
        assignment = TaskAssignment(
            job_id=job.job_id,
            index=index,
            seed=job.seeds[index],
            params=job.request.params_for(index),
            reply_inbox=job.inbox,
            dialect=job.dialect.value,
            reservation_id=offer.reservation_id or "",
            report_subject=s.report_subject(self.id, offer.worker_id),
            heartbeat_subject=s.heartbeat_subject(self.id, offer.worker_id),
            attempt=attempt,
            event_key=job.assignment_key(index, attempt),
        )
        job.workers[index] = offer.worker_id
        await self.nc.publish(
            s.worker_assign_subject(offer.worker_id),
            encode(assignment),
            reply=s.refusal_subject(self.id, job.job_id, index, attempt),
        )
        self._record(
            TaskUpdate(
                job.job_id,
                index,
                TaskState.RUNNING,
                worker_id=offer.worker_id,
                recruit_attempts=task.asks,
                assigned_at=started_at,
            )
        )

    async def _settle(
        self,
        task: TaskRun,
        offer: WorkerOffer,
        attempt: int,
        started_at: datetime,
        outcome: AttemptOutcome,
        report: TaskReport | AssignmentRefused | None,
        log: FilteringBoundLogger,
    ) -> None:
        """Record how the attempt ended; stop a worker that was lost or overran."""
        job_id, index = task.job.job_id, task.index
        if isinstance(report, AssignmentRefused):
            # A direct assignment on a stale view is refused now and then: not news.
            log.log(
                logging.INFO if offer.reservation_id is None else logging.WARNING,
                "assignment refused; recruiting again",
                reason=report.reason,
            )
            error: str | None = report.reason
        elif report is None:
            error = f"worker {outcome.value}"
        else:
            error = report.error if outcome is not AttemptOutcome.DONE else None
        self._record(
            AttemptRecord(
                job_id, index, attempt, offer.worker_id, outcome.value, started_at,
                datetime.now(UTC), error,
            )
        )  # fmt: skip
        if report is None:
            # Lost or overran: make sure it stops and frees its slot, then re-assign.
            cancel = JobCancel(job_id, index, f"re-assigned: {outcome}")
            await tell_worker(self.nc, offer.worker_id, cancel)
        elif isinstance(report, TaskReport) and outcome is not AttemptOutcome.WORKER_FAULT:
            state = TaskState.DONE if report.ok else TaskState.FAILED
            log.info(
                "task finished", state=state, seconds=round(report.seconds, 3), error=report.error
            )
            self._record(
                TaskUpdate(
                    job_id,
                    index,
                    state,
                    worker_id=report.worker_id,
                    finished_at=datetime.now(UTC),
                    seconds=report.seconds,
                    error=report.error,
                    error_code=report.code,
                    sha256=report.sha256 if report.ok else None,
                )
            )

    async def fail_task(self, job: RunningJob, index: int, failure: TaskFailure) -> None:
        """Answer the requester that the image failed, and record it."""
        job.answered.add(index)
        result = TaskResult(
            job_id=job.job_id,
            index=index,
            ok=False,
            seed=job.seeds[index],
            worker_id=failure.worker_id,
            error=failure.error,
            code=failure.code,
        )
        out = events.result(job.dialect, job.inbox, result, job.event_key)
        if out is not None:
            await self.nc.publish(out.subject, out.payload, headers=out.headers)
        self._record(
            TaskUpdate(
                job.job_id,
                index,
                TaskState.FAILED,
                worker_id=failure.worker_id,
                recruit_attempts=failure.attempts,
                finished_at=datetime.now(UTC),
                error=failure.error,
                error_code=failure.code,
            )
        )
