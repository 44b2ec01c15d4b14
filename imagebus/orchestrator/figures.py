"""The orchestrator's figures for dashboards and metrics, read from its own records.

Every change the orchestrator makes to a job or a task goes through one place (the
record it writes behind to PostgreSQL), so the figures are taken there, with no hook
in dispatch: a job's record opens its images' queue; a task's first assignment
closes its queue wait; an attempt that ends unanswered puts it back in the queue; a
task's final record counts its outcome and generation time; a job whose every image
is final counts its outcome. `PoolFigures.snapshot` answers `imagebus.orchestrators.
pool` (protocol/control.py) and feeds the orchestrator's own /metrics.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from ..db import AttemptRecord, JobRow, Record, TaskUpdate
from ..protocol import ErrorCode, JobState, TaskState
from ..protocol.control import (
    Count,
    Histogram,
    ModelFigures,
    OrchestratorStats,
    PoolSnapshot,
    RecentFigures,
)
from .attempts import AttemptOutcome

DEFAULT_MODEL = "default"  # the label of requests that name no model
# Prometheus-style upper bounds, in seconds.
QUEUE_WAIT_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
GENERATION_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
RECENT_KEEP_S = 300.0  # the longest recent window asked for; also the chart's span
BUCKET_S = 5.0  # the chart's resolution
# Latency samples kept for the recent percentiles: on a pool busier than this many
# images per window, the percentiles cover the latest MAX_SAMPLES images.
MAX_SAMPLES = 10_000
MAX_TRACKED_JOBS = 100_000  # jobs whose end was never seen here (taken over elsewhere)
# Looked up once: every record passes here, and an enum member's lookup is not free.
_RUNNING = TaskState.RUNNING
_DONE = TaskState.DONE
_ENDED = (TaskState.DONE, TaskState.FAILED)
_LATE = AttemptOutcome.LATE
_CANCELLED = ErrorCode.CANCELLED


class _Rate:
    """Events counted per second over the last RECENT_KEEP_S seconds."""

    def __init__(self) -> None:
        self._seconds: deque[list[int]] = deque()  # [whole second, count], oldest first

    def add(self, now: float) -> None:
        second = int(now)
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += 1
        else:
            self._seconds.append([second, 1])
            while self._seconds and self._seconds[0][0] <= second - RECENT_KEEP_S:
                self._seconds.popleft()

    def since(self, start: float) -> int:
        return sum(n for second, n in self._seconds if second >= start)

    def series(self, now: float) -> list[int]:
        """Events per BUCKET_S over the last RECENT_KEEP_S seconds, oldest first."""
        buckets = int(RECENT_KEEP_S / BUCKET_S)
        series = [0] * buckets
        for second, n in self._seconds:
            age = now - second
            if 0 <= age < RECENT_KEEP_S:
                series[buckets - 1 - int(age / BUCKET_S)] += n
        return series


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * len(bounds)  # not cumulative: made so in `frozen`
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        i = bisect_left(self.bounds, value)  # the first bound >= value
        if i < len(self.bounds):
            self.buckets[i] += 1

    def frozen(self) -> Histogram:
        cumulative, total = [], 0
        for n in self.buckets:
            total += n
            cumulative.append(total)
        return Histogram(list(self.bounds), cumulative, round(self.sum, 6), self.count)


@dataclass
class _Job:
    model: str
    n: int
    created_at: datetime
    queued: set[int]  # images waiting for a worker now
    assigned: set[int] = field(default_factory=set)  # assigned at least once
    final: dict[int, str] = field(default_factory=dict)  # index -> outcome


@dataclass
class _Model:
    queue_wait: _Histogram = field(default_factory=lambda: _Histogram(QUEUE_WAIT_BOUNDS))
    generation: _Histogram = field(default_factory=lambda: _Histogram(GENERATION_BOUNDS))


class PoolFigures:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.jobs_by_outcome: Counter[str] = Counter()
        self.tasks_by_outcome: Counter[str] = Counter()
        self._jobs: dict[str, _Job] = {}
        self._models: dict[str, _Model] = {}
        # (monotonic time, seconds) of the recent past, oldest first
        self._waits: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self._generations: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self._images_done = _Rate()
        self._jobs_done = _Rate()

    def observe(self, record: Record) -> None:
        """Take what a record tells (called for every record the orchestrator writes)."""
        if isinstance(record, JobRow):
            self._job_opened(record)
            return
        job = self._jobs.get(record.job_id)
        if job is None or record.index in job.final:
            return
        if isinstance(record, AttemptRecord):
            if record.outcome != _LATE:
                job.queued.add(record.index)  # unanswered: it waits for a worker again
        elif record.state == _RUNNING:
            self._assigned(job, record)
        elif record.state in _ENDED:
            self._task_ended(record.job_id, job, record)

    def _job_opened(self, row: JobRow) -> None:
        if row.job_id in self._jobs:
            return  # redelivered while still served here
        self._jobs[row.job_id] = _Job(
            row.model or DEFAULT_MODEL, row.n, row.created_at, set(range(row.n))
        )
        while len(self._jobs) > MAX_TRACKED_JOBS:
            del self._jobs[next(iter(self._jobs))]

    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            model = self._models[name] = _Model()
        return model

    def _assigned(self, job: _Job, update: TaskUpdate) -> None:
        job.queued.discard(update.index)
        if update.index in job.assigned or update.assigned_at is None:
            return
        job.assigned.add(update.index)
        wait = max((update.assigned_at - job.created_at).total_seconds(), 0.0)
        self._model(job.model).queue_wait.observe(wait)
        self._waits.append((time.monotonic(), wait))

    def _task_ended(self, job_id: str, job: _Job, update: TaskUpdate) -> None:
        now = time.monotonic()
        job.queued.discard(update.index)
        if update.state == _DONE:
            outcome = "done"
            self._images_done.add(now)
            if update.seconds is not None:
                self._model(job.model).generation.observe(update.seconds)
                self._generations.append((now, update.seconds))
        else:
            outcome = "cancelled" if update.error_code == _CANCELLED else "failed"
        job.final[update.index] = outcome
        self.tasks_by_outcome[outcome] += 1
        if len(job.final) >= job.n:
            del self._jobs[job_id]
            self.jobs_by_outcome[_job_outcome(job.final.values())] += 1
            self._jobs_done.add(now)

    def queue_depth(self) -> Counter[str]:
        depth: Counter[str] = Counter()
        for job in self._jobs.values():
            if job.queued:
                depth[job.model] += len(job.queued)
        return depth

    def snapshot(self, stats: OrchestratorStats, window_s: float = 60.0) -> PoolSnapshot:
        depth = self.queue_depth()
        models = [
            ModelFigures(
                name,
                depth.get(name, 0),
                self._model(name).queue_wait.frozen(),
                self._model(name).generation.frozen(),
            )
            for name in sorted(set(self._models) | set(depth))
        ]
        return PoolSnapshot(
            stats=stats,
            uptime_s=round(time.monotonic() - self.started, 1),
            jobs=_counts(self.jobs_by_outcome),
            tasks=_counts(self.tasks_by_outcome),
            models=models,
            recent=self.recent(window_s),
            queue_depth=sum(depth.values()),
        )

    def recent(self, window_s: float) -> RecentFigures:
        now = time.monotonic()
        window_s = min(max(window_s, 1.0), RECENT_KEEP_S)
        since = now - window_s
        waits = sorted(v for t, v in self._waits if t >= since)
        generations = sorted(v for t, v in self._generations if t >= since)
        images = self._images_done.since(since)
        jobs = self._jobs_done.since(since)
        return RecentFigures(
            window_s=window_s,
            images_per_s=round(images / window_s, 3),
            jobs_per_s=round(jobs / window_s, 3),
            queue_wait_p50_s=_quantile(waits, 0.5),
            queue_wait_p95_s=_quantile(waits, 0.95),
            generation_p50_s=_quantile(generations, 0.5),
            generation_p95_s=_quantile(generations, 0.95),
            bucket_s=BUCKET_S,
            images=self._images_done.series(now),
            jobs=self._jobs_done.series(now),
        )


def _job_outcome(outcomes: Iterable[str]) -> str:
    """As the job's record will say (db/store.py's rule)."""
    kinds = set(outcomes)
    if kinds <= {"done"}:
        return JobState.DONE.value
    if kinds == {"cancelled"}:
        return JobState.CANCELLED.value
    if "done" not in kinds:
        return JobState.FAILED.value
    return JobState.PARTIAL.value


def _counts(counter: Counter[str]) -> list[Count]:
    return [Count(label, value) for label, value in sorted(counter.items())]


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)
