"""What a worker is doing: its running tasks, and a snapshot of itself."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from ..protocol import Dialect, TaskAssignment, TaskHeartbeat
from ..protocol.auth import EventKey
from .batching import Queued


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """A snapshot of a worker, for dashboards and tests (not sent on the bus as is:
    `Worker.advert()` is what the orchestrators see). Reading it changes nothing."""

    state: str  # "idle", "busy" (some task running or delivering) or "draining"
    slots: int
    free_slots: int  # as of the last expiry of reservations; 0 while draining
    running: int  # tasks taken and not ended: generating or delivering their result
    generating: int  # tasks whose image is being made: never above `slots`
    peak_generating: int  # the most images ever made at once
    tasks_done: int
    failures: int
    batches: int  # pipeline calls made
    mean_batch: float  # images per pipeline call on average (dynamic batching)
    seconds_per_image: float
    copies_unanswered: int  # copies sent to the results stream that JetStream has not answered


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
    run: asyncio.Task[None] | None = None
    queued: Queued | None = None  # its image in the batcher: says when its batch began
    dialect: Dialect = field(init=False)
    # What this task's events to the requester are MACed with (None: a requester
    # without a job secret, whose events go unauthenticated).
    event_key: EventKey | None = field(init=False)
    # Where its report and heartbeats go: the assigning orchestrator's subjects, or
    # those of one that adopted it when that one died (adoption.py).
    report_subject: str = field(init=False)
    heartbeat_subject: str = field(init=False)
    reported: bool = False  # its report is out: too late to adopt it

    def __post_init__(self) -> None:
        self.report_subject = self.assignment.report_subject
        self.heartbeat_subject = self.assignment.heartbeat_subject
        try:
            self.dialect = Dialect(self.assignment.dialect)
        except ValueError:
            self.dialect = Dialect.NATIVE
        key = self.assignment.event_key
        self.event_key = None if key is None else EventKey(key, self.assignment.attempt)

    @property
    def making_image(self) -> bool:
        """Whether its image is being made right now: its batch has begun, and the
        image is not rendered yet (a step that does not advance then means a stall)."""
        return self.generating and self.queued is not None and self.queued.began

    def heartbeat(self, worker_id: str, step_s: float) -> TaskHeartbeat:
        """Its heartbeat: its step, and the yardstick for its progress (whether its
        image is being made, and `step_s`, the model's measured seconds per step)."""
        a = self.assignment
        return TaskHeartbeat(
            a.job_id, a.index, worker_id, self.step, a.params.steps, self.making_image, step_s
        )

    def cancel(self, *, reassigned: bool = False) -> None:
        """Stop making the image at the next step; the run still reports it cancelled."""
        self.cancelled = True
        self.reassigned = reassigned

    def abort(self) -> None:
        """Stop this task and its run at once (nothing is reported)."""
        self.cancelled = True
        if self.run is not None:
            self.run.cancel()
