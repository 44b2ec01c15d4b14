"""Event-loop lag: how late the loop gets round to a callback that is due.

A coroutine that blocks (a slow parse, a synchronous call) delays every other
one; this measures it from the inside. The orchestrator reports it on
`imagebus.orchestrators.stats`, and the benchmarks read it under load.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from .tasks import stop_task


class LoopLag:
    def __init__(self, interval_s: float = 0.05, keep: int = 1200) -> None:
        self.interval_s = interval_s
        self._samples: deque[float] = deque(maxlen=keep)  # the last minute, at 20 a second
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="imagebus-loop-lag")

    async def stop(self) -> None:
        await stop_task(self._task)

    def reset(self) -> None:
        self._samples.clear()

    def summary(self) -> dict[str, float]:
        """p50, p99 and max lag in milliseconds over the samples kept."""
        ordered = sorted(self._samples)
        if not ordered:
            return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "samples": 0}

        def at(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 3)

        return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0), "samples": len(ordered)}

    async def _run(self) -> None:
        while True:
            due = time.perf_counter() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self._samples.append(max(time.perf_counter() - due, 0.0))
