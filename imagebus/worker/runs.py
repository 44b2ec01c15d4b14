"""Running the tasks assigned to a worker, each from its assignment to its report.

A task's image is queued on its model's batcher; once rendered, its slot is free
for the next while the result travels: to the requester (confirmed or re-sent, in
delivery.py) with a copy kept in the results stream, then the task's report to the
orchestrator. A run that stop() aborts reports its task lost, so another worker
takes it. The worker's bus callbacks (service.py) decide whether to take a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping

from nats.aio.client import Client
from structlog.typing import FilteringBoundLogger

from ..protocol import ErrorCode, Fault, TaskAssigned, TaskAssignment, TaskProgress, encode, events
from ..protocol.events import Outbound
from .batching import Batcher, Queued
from .delivery import Delivery
from .engine import Engine
from .outcomes import failure, for_the_requester, report_of, result_of
from .slots import Slots
from .tasks import RunningTask

# How long stop() waits for aborted runs to end (each reports its task lost first).
ABORT_WAIT_S = 5.0


class TaskRuns:
    """The tasks a worker runs, by (job id, index) in `running`, and what they made:
    `tasks_done`, `failures` and the seconds the done ones took."""

    def __init__(
        self,
        worker_id: str,
        engines: Mapping[str, Engine],
        batchers: Mapping[str, Batcher],
        slots: Slots,
        announce_capacity: Callable[[], Awaitable[None]],
        log: FilteringBoundLogger,
    ) -> None:
        """`engines` and `batchers`: the worker's, by model (filled as its models load);
        `announce_capacity`: tells the orchestrators of a slot freed."""
        self.id = worker_id
        self.engines = engines
        self._batchers = batchers
        self._slots = slots
        self._announce_capacity = announce_capacity
        self._log = log
        self.nc: Client | None = None
        self._delivery: Delivery | None = None
        self.running: dict[tuple[str, int], RunningTask] = {}
        self._runs: dict[asyncio.Task[None], RunningTask] = {}  # for stop()
        self.tasks_done = 0
        self.failures = 0
        self._seconds_total = 0.0

    def connect(self, nc: Client, delivery: Delivery) -> None:
        """Run tasks over the worker's connection, once it has one."""
        self.nc = nc
        self._delivery = delivery

    @property
    def seconds_per_image(self) -> float:
        return self._seconds_total / self.tasks_done if self.tasks_done else 0.0

    async def start(self, running: RunningTask, queued: Queued) -> None:
        """Run a task whose image is queued, and tell its requester it is assigned here."""
        assignment = running.assignment
        self.running[(assignment.job_id, assignment.index)] = running
        self._slots.start_generating()
        # The run (which frees the slot whatever happens) exists before anything can fail.
        running.run = asyncio.create_task(self._run(running, queued))
        self._runs[running.run] = running
        running.run.add_done_callback(self._forget_run)
        assigned = TaskAssigned(assignment.job_id, assignment.index, self.id)
        inbox, key = assignment.reply_inbox, running.event_key
        await self._send(events.assigned(running.dialect, inbox, assigned, key))

    async def stop(self, grace_s: float) -> None:
        """Let the runs finish, up to `grace_s`; abort the others."""
        if self._runs:
            self._log.info("finishing running tasks", running=len(self._runs))
            _, pending = await asyncio.wait(self._runs, timeout=grace_s)
            for run in pending:
                self._runs[run].abort()
            if pending:  # bounded: a stop must end, whatever a run is stuck on
                _, stuck = await asyncio.wait(pending, timeout=ABORT_WAIT_S)
                if stuck:
                    self._log.warning("tasks still stuck after abort", stuck=len(stuck))

    def _batcher_for(self, assignment: TaskAssignment) -> Batcher:
        """The batcher of the model the task names, or of the default model (the first)."""
        default = next(iter(self.engines.values()))
        return self._batchers[self.engines.get(assignment.params.model or "", default).model]

    # --- running one task ------------------------------------------------------------

    def queue_image(self, running: RunningTask) -> Queued:
        assignment = running.assignment
        dialect, key = running.dialect, running.event_key

        async def on_step(step: int, steps: int) -> None:
            running.step = step
            progress = TaskProgress(assignment.job_id, assignment.index, step, steps, self.id)
            await self._send(events.progress(dialect, assignment.reply_inbox, progress, key))

        running.queued = self._batcher_for(assignment).submit(
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
            self.running.pop((assignment.job_id, assignment.index), None)
            self._slots.finished(rendered=not running.generating)
            if running.generating:  # it ended before its image: the slot is free now
                running.generating = False
                with contextlib.suppress(Exception):
                    await self._announce_capacity()

    async def _run_body(self, running: RunningTask, queued: Queued) -> None:
        assert self.nc is not None and self._delivery is not None
        assignment = running.assignment
        log = self._log.bind(job_id=assignment.job_id, index=assignment.index)
        params = assignment.params
        log.info("task started", width=params.width, height=params.height, steps=params.steps)
        started = time.perf_counter()
        rendering = self._batcher_for(assignment).result(queued)
        result = await result_of(assignment, self.id, rendering, log)
        seconds = time.perf_counter() - started
        dialect = running.dialect
        # Hashed once, for a large image's chunked result, the kept copy's headers and
        # the report (a large image's digest is about a millisecond of this event loop).
        digest = hashlib.sha256(result.png).hexdigest() if result.ok and result.png else None
        result, messages = events.result_messages(
            dialect, assignment.reply_inbox, result, self.nc.max_payload, running.event_key, digest
        )
        if not result.ok:  # too large for the prototype's protocol: a failure now
            digest = None
        # The copy and the result go out in one write (a write per message is most of
        # the bus's cost per job). The slot was freed when the image was rendered.
        # A failure of this worker's own goes to the orchestrator only: it retries it
        # on another worker, and answers the requester itself if none succeeds.
        if not running.reassigned and for_the_requester(result):
            if result.png is not None and digest is not None:
                await self._delivery.keep(
                    assignment.job_id, assignment.index, result.png, running.event_key, digest
                )
            if not await self._delivery.deliver(messages, dialect):
                log.warning("requester did not confirm the result; giving up on it")
        if result.ok:
            self.tasks_done += 1
            self._seconds_total += seconds
        else:
            self.failures += 1
        running.reported = True  # from here on, an orchestrator adopting it would wait in vain
        report = report_of(result, self.id, seconds, digest)
        await self.nc.publish(running.report_subject, encode(report))
        log.info("task finished", ok=result.ok, seconds=round(seconds, 3), error=result.error)

    async def _send(self, out: Outbound) -> None:
        assert self.nc is not None
        await self.nc.publish(out.subject, out.payload, headers=out.headers)
