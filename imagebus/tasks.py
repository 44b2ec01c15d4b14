"""Stopping a background task and waiting on an event, safely on Python 3.11.

Two idioms lose a cancellation on Python 3.11, and both hung an orchestrator's stop:

- `asyncio.wait_for(event.wait(), t)` returns normally when the cancel lands in the
  same turn of the event loop as the event (3.11's wait_for then returns the inner
  result); the cancelled loop goes on waiting, and whoever awaits it waits forever.
  `wait_event` uses `asyncio.timeout`, which passes the cancel on.
- `task.cancel(); with suppress(CancelledError): await task` also swallows the
  cancellation of the task doing the stopping, and waits without bound. `stop_task`
  waits with `asyncio.wait`, which does neither.

ruff bans `asyncio.wait_for` in imagebus (pyproject.toml) so the first cannot return.
nats-py's `request` still uses it: see `cancel_was_lost`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

STOP_WAIT_S = 5.0


async def wait_event(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Wait until `event` is set or `timeout_s` passes; whether it is set."""
    if not event.is_set():
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            pass
    return event.is_set()


def cancel_was_lost() -> bool:
    """Whether this task was cancelled but an await returned anyway: nats-py's
    `request`, whose wait_for can return the reply that landed with the cancel. The
    caller tidies up what the reply holds and raises CancelledError. (Code that
    handles a cancel on purpose uncancels, as asyncio.timeout does.)"""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def stop_task(task: asyncio.Task[object] | None, timeout_s: float = STOP_WAIT_S) -> bool:
    """Cancel `task` and wait at most `timeout_s` for it to end; whether it ended.
    Its exception, if any, is not raised here: the task's own code logs what matters."""
    if task is None:
        return True
    return await stop_tasks([task], timeout_s)


async def stop_tasks(tasks: Iterable[asyncio.Task[object]], timeout_s: float = STOP_WAIT_S) -> bool:
    """`stop_task` for several tasks at once, with one bound for all of them."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return True
    _, still = await asyncio.wait(pending, timeout=timeout_s)
    for task in pending:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit
    return not still
