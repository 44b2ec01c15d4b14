"""An assigned task being watched: its worker's heartbeats, its final report, and
whether its image is still making progress (a hung model keeps its heartbeats going,
not its denoising steps; see docs/reliability.md, "When a model hangs")."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ..protocol import AssignmentRefused, ErrorCode, TaskHeartbeat, TaskReport
from ..settings import OrchestratorSettings
from .attempts import AttemptOutcome


@dataclass
class Watch:
    """An assigned task being watched: its worker's heartbeats and final report (or
    its refusal of the assignment), and whether its image is still making progress."""

    worker_id: str
    attempt: int  # which assignment of the task this is: a refusal names it
    report: asyncio.Future[TaskReport | AssignmentRefused]
    last_heartbeat: float = field(default_factory=time.monotonic)
    step: int = 0
    steps: int = 0
    generating: bool = False  # its batch has begun on the worker and is not yet rendered
    step_s: float = 0.0  # the worker's measured seconds per step (0: not yet measured)
    began_at: float = 0.0  # when it was first heard generating
    progress_at: float = 0.0  # when it began generating or its step last advanced
    first_advance: tuple[int, float] | None = None  # (step, when) of the first advance heard

    def beat(self, beat: TaskHeartbeat, now: float) -> None:
        """Take a heartbeat of this task's worker."""
        self.last_heartbeat = now
        self.steps = beat.steps
        self.step_s = beat.step_s
        if not beat.generating:  # still in the worker's queue, or rendered: no clock runs
            self.generating = False
            self.step = max(self.step, beat.step)
            return
        if not self.generating:
            self.generating = True
            self.began_at = self.progress_at = now
        if beat.step > self.step:
            if self.first_advance is None:
                self.first_advance = (beat.step, now)
            self.step = beat.step
            self.progress_at = now

    def pace(self) -> float:
        """Seconds per step: the worker's measured figure, or this run's observed one if
        slower (a bigger batch than usual; a slow but progressing run is not a stall)."""
        observed = 0.0
        if self.first_advance is not None and self.step > self.first_advance[0]:
            first_step, first_at = self.first_advance
            observed = (self.progress_at - first_at) / (self.step - first_step)
        elif self.step > 0:  # one advance heard: since it began, warm-up included
            observed = (self.progress_at - self.began_at) / self.step
        return max(self.step_s, observed)

    def stalled(self, now: float, factor: float, floor_s: float) -> bool:
        """Whether its step has not advanced for `factor` times its pace (at least
        `floor_s`; twice that for the first step, which includes text encoding and a
        new size's warm-up). A run of unknown pace that has not made its first step
        yet is never stalled: a model's first run may take minutes to warm up."""
        if factor <= 0 or not self.generating or self.step >= self.steps > 0:
            return False
        pace = self.pace()
        if pace <= 0:
            if self.step == 0:
                return False
            limit = 2 * floor_s
        elif self.step == 0:
            limit = max(2 * floor_s, factor * pace)
        else:
            limit = max(floor_s, factor * pace)
        return now - self.progress_at > limit

    async def until_ended(
        self, task_timeout: float, settings: OrchestratorSettings
    ) -> tuple[AttemptOutcome, TaskReport | AssignmentRefused | None]:
        """Wait for the task's report (or refusal) until its worker is lost, stalls or
        overruns `task_timeout`: how the attempt ended, and the report if one came."""
        deadline = time.monotonic() + task_timeout
        heartbeat_timeout = settings.heartbeat_timeout_s
        while True:
            check_in = min(heartbeat_timeout / 2, max(deadline - time.monotonic(), 0))
            try:
                async with asyncio.timeout(check_in):
                    report = await asyncio.shield(self.report)
            except TimeoutError:
                now = time.monotonic()
                if now >= deadline:
                    return AttemptOutcome.TIMEOUT, None
                if now - self.last_heartbeat > heartbeat_timeout:
                    return AttemptOutcome.LOST, None
                if self.stalled(now, settings.stall_factor, settings.stall_floor_s):
                    return AttemptOutcome.STALLED, None
                continue
            if isinstance(report, AssignmentRefused):
                return AttemptOutcome.REFUSED, report
            if report.code == ErrorCode.CANCELLED:
                return AttemptOutcome.CANCELLED, report
            return (AttemptOutcome.DONE if report.ok else AttemptOutcome.FAILED), report


_MISSING: Any = object()  # pop's default when none is given


class Watches(dict[tuple[str, int], Watch]):
    """The tasks assigned now, by (job id, index), with how many each worker holds,
    counted as they come and go: the trust book asks, for every task to dispatch, how
    many each worker on probation holds (trust.py), which a count over every task in
    flight would make O(tasks) per task. Only `[key] = `, `del` and `pop` change it."""

    def __init__(self) -> None:
        super().__init__()
        self.by_worker: Counter[str] = Counter()

    def __setitem__(self, key: tuple[str, int], watch: Watch) -> None:
        if key in self:
            self._uncount(self[key])
        super().__setitem__(key, watch)
        self.by_worker[watch.worker_id] += 1

    def __delitem__(self, key: tuple[str, int]) -> None:
        self._uncount(self[key])
        super().__delitem__(key)

    def pop(self, key: tuple[str, int], default: Any = _MISSING) -> Any:  # type: ignore[override]
        watch = super().pop(key, _MISSING)
        if watch is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        self._uncount(watch)
        return watch

    def _uncount(self, watch: Watch) -> None:
        self.by_worker[watch.worker_id] -= 1
        if self.by_worker[watch.worker_id] <= 0:
            del self.by_worker[watch.worker_id]

    def _unsupported(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("Watches changes by [key] =, del and pop only (they keep its counts)")

    clear = popitem = setdefault = update = __ior__ = _unsupported  # type: ignore[assignment]
