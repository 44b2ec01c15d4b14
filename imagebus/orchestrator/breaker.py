"""A circuit breaker per worker: one that keeps failing generations gets no work for a while.

After `failures` worker-fault failures in a row (out of memory, a CUDA error, a task
lost or overrun) the breaker opens: the worker is given no task for `backoff_s`.
Then it is half-open: one task (a probe) may go to it. A success closes the breaker;
another failure opens it again for twice as long, up to `max_backoff_s`. The
registry's direct claims, its hand-over of freed slots and recruitment all ask
`allows` first, so an open breaker keeps every path to the worker shut.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"  # gets work
    OPEN = "open"  # resting: no work until its back-off ends
    HALF_OPEN = "half-open"  # back-off over: one probe task may go to it


@dataclass(slots=True)
class _Health:
    failures: int = 0  # worker-fault failures in a row
    backoff_s: float = 0.0  # of the current or last opening
    open_until: float = 0.0  # monotonic; 0: never opened since it last succeeded
    probing: bool = False  # a probe task is on it now


@dataclass(frozen=True, slots=True)
class BreakerView:
    state: BreakerState
    open_for_s: float  # seconds left while open
    failures: int


class Breaker:
    def __init__(
        self, failures: int = 3, backoff_s: float = 10.0, max_backoff_s: float = 300.0
    ) -> None:
        self.failures = max(failures, 1)
        self.backoff_s = backoff_s
        self.max_backoff_s = max(max_backoff_s, backoff_s)
        self._health: dict[str, _Health] = {}

    def view(self, worker_id: str) -> BreakerView:
        health = self._health.get(worker_id)
        if health is None or not health.open_until:
            return BreakerView(BreakerState.CLOSED, 0.0, health.failures if health else 0)
        left = health.open_until - time.monotonic()
        if left > 0:
            return BreakerView(BreakerState.OPEN, left, health.failures)
        return BreakerView(BreakerState.HALF_OPEN, 0.0, health.failures)

    def allows(self, worker_id: str) -> bool:
        """Whether a task may go to the worker now (a half-open one: if no probe is on it)."""
        health = self._health.get(worker_id)
        if health is None or not health.open_until:
            return True
        return time.monotonic() >= health.open_until and not health.probing

    def assigned(self, worker_id: str) -> None:
        """A task went to the worker: if its breaker is half-open, that task is the probe."""
        health = self._health.get(worker_id)
        if health is not None and health.open_until:
            health.probing = True

    def judge(self, worker_id: str, works: bool | None) -> bool:
        """A task on the worker ended: it worked, it failed (the worker's fault), or it
        says nothing of the worker (refused, cancelled). Whether the breaker opened."""
        if works is None:
            self.ended(worker_id)
            return False
        if works:
            self.succeeded(worker_id)
            return False
        return self.failed(worker_id)

    def succeeded(self, worker_id: str) -> None:
        self._health.pop(worker_id, None)  # closed, and its count starts again

    def failed(self, worker_id: str) -> bool:
        """A worker-fault failure; whether the breaker opened (or opened again) on it."""
        health = self._health.setdefault(worker_id, _Health())
        health.failures += 1
        health.probing = False
        if health.open_until > time.monotonic():
            return False  # open already (a task it had before it opened)
        if health.open_until:  # a failed probe: rest again, twice as long
            health.backoff_s = min(health.backoff_s * 2, self.max_backoff_s)
        elif health.failures >= self.failures:
            health.backoff_s = self.backoff_s
        else:
            return False
        health.open_until = time.monotonic() + health.backoff_s
        return True

    def ended(self, worker_id: str) -> None:
        """A task on the worker ended with no verdict on it (refused, cancelled): a
        probe in flight is no longer one."""
        health = self._health.get(worker_id)
        if health is not None:
            health.probing = False
