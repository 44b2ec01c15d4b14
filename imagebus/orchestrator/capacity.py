"""Waiting, first come first served, for a worker slot to free up.

Tasks that found every fitting worker busy queue here. When a worker announces
a freed slot, the slot is handed straight to the oldest waiting task that the
worker fits: before any task that arrives later can take it, so a busy pool
serves tasks in order and none is overtaken again and again. A waiter also
wakes after its timeout and simply tries again, so a lost notice costs a retry,
not a stall.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..protocol import RecruitCall


@dataclass(eq=False)  # compared by identity: removing one from the line stays cheap
class _Waiter:
    call: RecruitCall
    handed: asyncio.Future[str | None]  # the worker id given to it, or None: look again


class CapacitySignal:
    def __init__(self, on_unclaimed: Callable[[str], None] | None = None) -> None:
        self._waiters: deque[_Waiter] = deque()
        # Given a worker id whose slot was handed to a task cancelled before taking it.
        self._on_unclaimed = on_unclaimed

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def wait(
        self, call: RecruitCall, timeout: float, *, first: bool = False
    ) -> tuple[bool, str | None]:
        """Wait for a slot for `call`. Returns (woken, worker id): woken is False if
        `timeout` passed with no news; the worker id is a slot handed over, if any.
        `first` puts a task that waited before (and lost the slot it was handed, to
        another orchestrator, say) back at the head of the line."""
        waiter = _Waiter(call, asyncio.get_running_loop().create_future())
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            try:
                async with asyncio.timeout(timeout):  # no task of its own, unlike wait_for
                    return True, await asyncio.shield(waiter.handed)
            except TimeoutError:
                if waiter.handed.done():  # handed a slot just as the time ran out
                    return True, waiter.handed.result()
                return False, None
            except asyncio.CancelledError:
                # Cancelled (its job timed out, say) once a slot was handed to it: the
                # slot is not lost, it goes back (to the next in line).
                handed = waiter.handed
                worker_id = handed.result() if handed.done() and not handed.cancelled() else None
                if worker_id is not None and self._on_unclaimed is not None:
                    self._on_unclaimed(worker_id)
                raise
        finally:
            if not waiter.handed.done():
                waiter.handed.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def hand_over(self, worker_id: str, slots: int, fits: Callable[[RecruitCall], bool]) -> int:
        """Give up to `slots` slots of `worker_id` to the oldest waiters it `fits`;
        returns how many were handed over."""
        handed = 0
        for waiter in list(self._waiters):
            if handed == slots:
                break
            if not waiter.handed.done() and fits(waiter.call):
                waiter.handed.set_result(worker_id)
                self._waiters.remove(waiter)
                handed += 1
        return handed

    def wake_all(self) -> None:
        """Every waiter looks again (a job was cancelled, say)."""
        for waiter in self._waiters:
            if not waiter.handed.done():
                waiter.handed.set_result(None)
        self._waiters.clear()
