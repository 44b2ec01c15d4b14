"""Freed worker slots go to the oldest waiting task that the worker fits."""

from __future__ import annotations

import asyncio

from imagebus.orchestrator.capacity import CapacitySignal
from imagebus.orchestrator.registry import Registry
from imagebus.protocol import RecruitCall, WorkerAdvert


def _call(job: str, model: str | None = None) -> RecruitCall:
    return RecruitCall(job, 0, "orchestrator", 64, 64, 2, model=model)


async def test_a_freed_slot_goes_to_the_oldest_waiter_the_worker_fits() -> None:
    signal = CapacitySignal()
    wants_flux = asyncio.create_task(signal.wait(_call("a", model="flux"), 5))
    first = asyncio.create_task(signal.wait(_call("b"), 5))
    second = asyncio.create_task(signal.wait(_call("c"), 5))
    await asyncio.sleep(0)
    assert signal.waiting == 3

    # A worker without flux frees one slot: "b" (older than "c") gets it, "a" waits on.
    handed = signal.hand_over("tiny-worker", 1, lambda call: call.model != "flux")
    assert handed == 1
    assert await first == (True, "tiny-worker")
    assert not second.done() and not wants_flux.done()

    # Two more slots on the same worker: only "c" fits, so one is handed over.
    assert signal.hand_over("tiny-worker", 2, lambda call: call.model != "flux") == 1
    assert await second == (True, "tiny-worker")

    signal.wake_all()  # e.g. a job was cancelled: everyone looks again
    assert await wants_flux == (True, None)
    assert signal.waiting == 0


async def test_a_waiter_with_no_news_times_out_and_leaves_the_queue() -> None:
    signal = CapacitySignal()
    assert await signal.wait(_call("a"), 0.05) == (False, None)
    assert signal.waiting == 0


def test_the_pool_view_ignores_older_reports_of_free_slots() -> None:
    registry = Registry()
    advert = WorkerAdvert("w", ["tiny"], "cpu", 1, 1, 1 << 22, "idle", free_seq=10)
    registry.update(advert)
    call = _call("a")
    assert registry.claim(call, frozenset()) == "w"  # the view takes the slot
    assert registry.claim(call, frozenset()) is None
    registry.note_free("w", 1, seq=12)  # the worker's notice: a slot is free again
    registry.note_free("w", 0, seq=11)  # an older ack, handled late: ignored
    assert registry.free("w") == 1
    registry.note_free("w", 0, seq=13)
    assert registry.free("w") == 0


async def test_a_task_that_waited_before_goes_back_to_the_head_of_the_line() -> None:
    signal = CapacitySignal()
    newer = asyncio.create_task(signal.wait(_call("new"), 5))
    await asyncio.sleep(0)
    returning = asyncio.create_task(signal.wait(_call("old"), 5, first=True))
    await asyncio.sleep(0)
    assert signal.hand_over("w", 1, lambda call: True) == 1
    assert await returning == (True, "w")
    assert not newer.done()
    signal.wake_all()
    await newer


async def test_a_slot_handed_to_a_task_cancelled_before_it_resumes_goes_back() -> None:
    returned: list[str] = []
    signal = CapacitySignal(on_unclaimed=returned.append)
    waiting = asyncio.create_task(signal.wait(_call("timed out"), 5))
    await asyncio.sleep(0)
    assert signal.hand_over("w", 1, lambda call: True) == 1
    waiting.cancel()  # its job timed out in the same turn: it never used the slot
    await asyncio.gather(waiting, return_exceptions=True)
    assert waiting.cancelled()
    assert returned == ["w"]
    # Cancelled with nothing handed: nothing to give back.
    idle = asyncio.create_task(signal.wait(_call("idle"), 5))
    await asyncio.sleep(0)
    idle.cancel()
    await asyncio.gather(idle, return_exceptions=True)
    assert returned == ["w"] and signal.waiting == 0
