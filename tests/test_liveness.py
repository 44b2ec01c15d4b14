"""Liveness by progress: a worker whose heartbeats go on while its model hangs has its
task re-assigned within the stall limit (not the 600 s task timeout), and a slow but
progressing worker is never called stalled."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import asyncpg
import pytest

from imagebus.requester import ImageBusClient
from imagebus.settings import BusSettings, WorkerSettings
from imagebus.worker import Worker
from imagebus.worker.engine import (
    BatchItem,
    DiffusionEngine,
    Engine,
    GenerationCancelled,
    StepCallback,
)

from .conftest import Stack
from .helpers import SETTLE_S

pytestmark = pytest.mark.faults


class _WrappedEngine:
    """The tiny model with something done in the model's thread at each step: `step`
    does the step's extra work and reports it."""

    def __init__(self, engine: DiffusionEngine) -> None:
        self._engine = engine
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def render_batch(self, items: Sequence[BatchItem], on_step: StepCallback | None = None) -> Any:
        self.calls += 1
        call = self.calls

        def stepped(step: int, steps: int) -> None:
            self.step(call, step, items, lambda: on_step(step, steps) if on_step else None)

        return self._engine.render_batch(items, stepped)

    def step(
        self, call: int, step: int, items: Sequence[BatchItem], report: Callable[[], None]
    ) -> None:
        report()


class _HangingEngine(_WrappedEngine):
    """Hangs after step `hang_at` of its `hang_on`-th call, as a hung model does: a
    cancellation does not reach it. `release` ends it (the test's teardown needs that)."""

    def __init__(self, engine: DiffusionEngine, hang_on: int, hang_at: int) -> None:
        super().__init__(engine)
        self.hang_on, self.hang_at = hang_on, hang_at
        self.hung_at: float | None = None  # monotonic
        self.release = threading.Event()

    def step(
        self, call: int, step: int, items: Sequence[BatchItem], report: Callable[[], None]
    ) -> None:
        report()
        if call == self.hang_on and step == self.hang_at:
            self.hung_at = time.monotonic()
            self.release.wait()
            raise GenerationCancelled()


class _SlowEngine(_WrappedEngine):
    """Each step takes `step_s`; the very first one `warmup_s` (a first run's warm-up)."""

    def __init__(self, engine: DiffusionEngine, step_s: float, warmup_s: float) -> None:
        super().__init__(engine)
        self.step_s, self.warmup_s = step_s, warmup_s
        self._lock = threading.Lock()
        self._warmed = False

    def step(
        self, call: int, step: int, items: Sequence[BatchItem], report: Callable[[], None]
    ) -> None:
        with self._lock:
            first, self._warmed = not self._warmed, True
        time.sleep(self.warmup_s if first else self.step_s)
        report()


async def _start_worker(stack: Stack, engine: _WrappedEngine, worker_id: str, **kw: Any) -> Worker:
    settings = WorkerSettings(worker_id, bus=BusSettings(stack.nats_url, None), **kw)
    worker = Worker(settings, engine=cast(Engine, engine))
    await worker.start()
    stack.workers.append(worker)
    return worker


async def _attempts(database_url: str, job_id: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT worker_id, outcome FROM task_attempts WHERE job_id = $1 ORDER BY attempt",
            job_id,
        )
    finally:
        await conn.close()
    return [(r["worker_id"], r["outcome"]) for r in rows]


async def test_a_hung_model_is_reassigned_within_30_s(stack: Stack) -> None:
    await stack.start_orchestrator()  # the default stall settings
    hanging = _HangingEngine(stack.engine, hang_on=2, hang_at=5)
    await _start_worker(stack, hanging, "hangs", slots=1)
    try:
        await _hang_and_reassign(stack, hanging)
    finally:
        hanging.release.set()


async def _hang_and_reassign(stack: Stack, hanging: _HangingEngine) -> None:
    orchestrator = stack.orchestrators[0]
    async with ImageBusClient(stack.nats_url) as client:
        # A first job runs well: the worker measures its speed (its seconds per step).
        warmup = await client.submit("warm-up", width=64, height=64, steps=20)
        assert [i.worker_id for i in await warmup.wait(60)] == ["hangs"]
        assigned: list[tuple[str, float]] = []
        job = await client.submit(
            "hangs at step 5", width=64, height=64, steps=20,
            on_assigned=lambda _i, wid: assigned.append((wid, time.monotonic())),
        )  # fmt: skip
        while hanging.hung_at is None:
            await asyncio.sleep(0.05)
        hung_at = hanging.hung_at
        await stack.start_worker("good")  # it joins once the first worker hangs
        images = await job.wait(45)
        answered_after = time.monotonic() - hung_at
        job_id = await job.accepted()
    assert [image.worker_id for image in images] == ["good"]
    reassigned_after = next(at for wid, at in assigned if wid == "good") - hung_at
    print(
        f"hung model: re-assigned {reassigned_after:.1f}s after the hang, "
        f"answered after {answered_after:.1f}s (task timeout 600s)"
    )
    assert reassigned_after < 30
    assert await orchestrator.settle(SETTLE_S)
    assert await _attempts(stack.database_url, job_id) == [("hangs", "stalled"), ("good", "done")]


async def test_a_slow_but_progressing_worker_is_not_stalled(stack: Stack) -> None:
    # A tight stall limit (1.5 s floor, 4 times the pace) and a worker slower than it:
    # its steps take 2.5 s, the first of its first run 4 s (a warm-up, its pace still
    # unknown). A limit blind to the pace would re-assign its tasks.
    orchestrator = await stack.start_orchestrator(stall_floor_s=1.5, stall_factor=4.0)
    slow = _SlowEngine(stack.engine, step_s=2.5, warmup_s=4.0)
    await _start_worker(stack, slow, "slow", slots=2, max_batch=2, batch_window_ms=500)
    async with ImageBusClient(stack.nats_url) as client:
        first = await client.submit("first run", width=64, height=64, steps=3)
        assert [i.worker_id for i in await first.wait(60)] == ["slow"]
        # Then two at once: they run as one batch (their steps advance together), or one
        # waits in the worker's queue behind the other: neither is a stall.
        batched = await client.submit(["a", "b"], width=64, height=64, steps=3)
        assert [i.worker_id for i in await batched.wait(60)] == ["slow", "slow"]
        ids = [await first.accepted(), await batched.accepted()]
    assert await orchestrator.settle(SETTLE_S)
    outcomes = [await _attempts(stack.database_url, job_id) for job_id in ids]
    print(f"slow worker (2.5 s a step, stall floor 1.5 s): attempts {outcomes}")
    assert outcomes == [[("slow", "done")], [("slow", "done"), ("slow", "done")]]
