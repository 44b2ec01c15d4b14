"""Waiting, first come first served, for a worker slot to free up."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class CapacitySignal:
    """Tasks that found every worker busy wait here; workers' capacity notices wake them.

    Waking is FIFO and limited to the number of slots announced, so a burst of
    waiting tasks does not stampede one free slot. A waiter also wakes after its
    timeout and simply asks again, so a lost notice costs a poll, not a stall.
    """

    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def wait(self, timeout: float) -> bool:
        """Wait for a slot to free up; False if `timeout` passed without a notice."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            try:
                await asyncio.wait_for(asyncio.shield(future), timeout)
            except TimeoutError:
                return False
            return True
        finally:
            if not future.done():
                future.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(future)

    def notify(self, slots: int) -> None:
        while slots > 0 and self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                slots -= 1
