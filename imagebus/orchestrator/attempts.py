"""One task on its way through dispatch (dispatch.py): its state, how each attempt
on a worker ended, and what follows from that."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from structlog.typing import FilteringBoundLogger

from ..protocol import ErrorCode, RecruitCall, WorkerOffer
from .jobs import RunningJob
from .recruit import REFUSED


class AttemptOutcome(StrEnum):
    """How one assignment of a task to a worker ended (recorded in task_attempts)."""

    DONE = "done"
    FAILED = "failed"  # the request's fault (the worker sent it to the requester)
    WORKER_FAULT = "worker_fault"  # its GPU, driver or model failed: try another worker
    CANCELLED = "cancelled"
    REFUSED = "refused"  # the worker refused it, or no worker listened on its subject
    LOST = "lost"  # its heartbeats stopped: crashed, killed or cut off
    TIMEOUT = "timeout"  # it overran the task timeout
    STALLED = "stalled"  # its heartbeats went on, its denoising step did not advance
    LATE = "late"  # a report that came after the task had been re-assigned


class Next(Enum):
    """What follows an attempt."""

    ANSWERED = "answered"  # the requester has the task's final answer
    RECRUIT_AGAIN = "recruit again"  # the worker never took it: find another
    REASSIGN = "reassign"  # the worker took it and failed it (lost, overran, its fault)


def classify(outcome: AttemptOutcome) -> Next:
    if outcome in (AttemptOutcome.DONE, AttemptOutcome.FAILED, AttemptOutcome.CANCELLED):
        return Next.ANSWERED
    if outcome is AttemptOutcome.REFUSED:
        return Next.RECRUIT_AGAIN
    return Next.REASSIGN


def says_worker_works(outcome: AttemptOutcome) -> bool | None:
    """What the attempt says of its worker, for its circuit breaker: it works (True),
    it failed (False: its GPU, driver or model, or it was lost, stalled or overran), or
    nothing."""
    if outcome is AttemptOutcome.DONE:
        return True
    worker_failed = (
        AttemptOutcome.WORKER_FAULT,
        AttemptOutcome.LOST,
        AttemptOutcome.STALLED,
        AttemptOutcome.TIMEOUT,
    )
    if outcome in worker_failed:
        return False
    return None


@dataclass(frozen=True, slots=True)
class TaskFailure:
    """Why a task ends without an image, as the requester and the record are told."""

    error: str
    code: ErrorCode
    attempts: int | None = None  # recruitment asks, when they are the story
    worker_id: str | None = None


@dataclass(slots=True)
class TaskRun:
    """One task on its way through the state machine."""

    job: RunningJob
    index: int
    call: RecruitCall
    queue_timeout: float
    deadline: float  # of the current wait for a worker
    log: FilteringBoundLogger  # bound to the job and the task
    asks: int = 0  # recruitment asks so far
    assignments: int = 0  # refused ones included: each is an attempt on record
    lost: int = 0  # assignments whose worker died or overran
    tried: set[str] = field(default_factory=set)  # the workers that took it and failed it
    declined: Counter[str] = field(default_factory=Counter)  # why asks found no worker
    last_error: str | None = None  # of the last worker that failed it
    heard_lately: bool = True  # whether the free-slot view can be trusted to say "all busy"
    handed: str | None = None  # a slot handed to this task while it waited
    was_in_line: bool = False  # it waited already: if it must wait again, it goes first
    # The worker that runs it already, for an orchestrator that died (adoption.py): its
    # first attempt here watches it there instead of recruiting one.
    adopted_by: str | None = None


def after_attempt(
    task: TaskRun, offer: WorkerOffer, outcome: AttemptOutcome, max_reassignments: int
) -> TaskFailure | None:
    """After an attempt that left the task unanswered: go on (None), or give up (a
    worker that never took it is replaced until the task's wait ends; one that took it
    and failed it, at most `max_reassignments` times)."""
    if classify(outcome) is Next.RECRUIT_AGAIN:
        task.declined[REFUSED] += 1
        if time.monotonic() < task.deadline:
            return None  # the worker did not take it: find another
        error = f"no worker took the image within {task.queue_timeout:g}s"
        return TaskFailure(error, ErrorCode.QUEUE_TIMEOUT)
    task.lost += 1
    task.tried.add(offer.worker_id)
    if task.lost > max_reassignments:
        last = task.last_error or outcome.value
        error = (
            f"gave up after {task.lost} workers failed to finish the image "
            f"(last: {offer.worker_id}, {last})"
        )
        code = {
            AttemptOutcome.LOST: ErrorCode.WORKER_LOST,
            AttemptOutcome.WORKER_FAULT: ErrorCode.GENERATION_FAILED,
        }.get(outcome, ErrorCode.TASK_TIMEOUT)
        task.log.warning("task failed", error=error)
        return TaskFailure(error, code, worker_id=offer.worker_id)
    task.log.warning("re-assigning task", reason=outcome.value, worker_id=offer.worker_id)
    task.deadline = time.monotonic() + task.queue_timeout
    return None
