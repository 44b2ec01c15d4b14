"""imagebus.tasks: no cancellation is lost, and a stop is bounded (Python 3.11 pitfalls)."""

from __future__ import annotations

import asyncio

from imagebus.tasks import cancel_was_lost, stop_task, stop_tasks, wait_event


async def _cancel_as_the_event_is_set(waiter: asyncio.Task[object], event: asyncio.Event) -> None:
    for _ in range(50):  # until the waiter is parked on the event
        await asyncio.sleep(0)
    event.set()
    waiter.cancel()  # lands in the same turn of the event loop as the event
    await asyncio.wait({waiter}, timeout=5)


async def test_a_cancel_that_lands_with_the_event_is_not_lost() -> None:
    async def loop_on(event: asyncio.Event) -> None:
        while True:
            await wait_event(event, 60)
            event.clear()

    event = asyncio.Event()
    waiter = asyncio.create_task(loop_on(event))
    await _cancel_as_the_event_is_set(waiter, event)
    assert waiter.cancelled()


async def test_wait_event_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert not await wait_event(event, 0.01)
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 10)
    assert await wait_event(event, 0)


class _Stubborn:
    """A task that ignores cancels until it is released (a thread-bound step, say)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self.release.is_set():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                continue

    async def end(self) -> None:
        self.release.set()
        self.task.cancel()
        await asyncio.wait({self.task}, timeout=5)
        assert self.task.done()


async def test_stop_task_is_bounded_when_a_task_ignores_its_cancel() -> None:
    stubborn = _Stubborn()
    await asyncio.sleep(0)
    assert await stop_task(stubborn.task, timeout_s=0.05) is False
    assert not stubborn.task.done()
    await stubborn.end()


async def test_the_stopping_task_can_itself_be_cancelled() -> None:
    """`with suppress(CancelledError): await task` swallowed this: a stop that its own
    caller cancelled (a timeout, a shutdown) went on as if nothing had happened."""
    stubborn = _Stubborn()
    await asyncio.sleep(0)
    stopping = asyncio.create_task(stop_task(stubborn.task, timeout_s=60))
    await asyncio.sleep(0.05)
    stopping.cancel()
    await asyncio.wait({stopping}, timeout=5)
    assert stopping.cancelled()
    await stubborn.end()


async def test_stop_tasks_retrieves_their_errors() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    async def sleeps() -> None:
        await asyncio.sleep(60)

    tasks = [asyncio.create_task(fails()), asyncio.create_task(sleeps())]
    await asyncio.sleep(0)
    assert await stop_tasks(tasks) is True
    assert tasks[1].cancelled()
    assert isinstance(tasks[0].exception(), RuntimeError)
    assert await stop_task(None) is True


async def test_a_cancel_lost_under_a_request_is_seen() -> None:
    """nats-py's request waits with wait_for: a reply that lands with the cancel is
    returned, and the cancelled task goes on unless it asks `cancel_was_lost`."""
    reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    seen: list[bool] = []

    async def requester() -> None:
        await asyncio.wait_for(reply, 10)  # as nats-py's request does
        seen.append(cancel_was_lost())

    task = asyncio.create_task(requester())
    for _ in range(5):
        await asyncio.sleep(0)
    reply.set_result("offer")
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert seen == [True]  # the reply came back although the task was cancelled
    assert not await asyncio.create_task(_not_cancelled())


async def _not_cancelled() -> bool:
    return cancel_was_lost()
