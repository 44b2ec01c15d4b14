"""One loop, many followers: what several Server-Sent Events streams share.

A Feed asks its source for the next frame (SSE bytes) every `every_s` while anyone
follows, and wakes every follower when there is a new one; a follower too slow to
read one gets the newest next, never a backlog (each frame is a whole snapshot). So
however many browsers watch the same thing, the orchestrators are asked once per
`every_s`. Used by pool_feed.py (the dashboard) and sse.py (a job submitted through
another process, whose status is polled).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog

from ..tasks import stop_task

# A follower is sent a comment this often without a frame, so proxies keep it open.
KEEPALIVE_S = 15.0

# The source's answer: (a new frame, or None if nothing changed; whether it has ended).
Source = Callable[[], Awaitable[tuple[bytes | None, bool]]]

log = structlog.get_logger(__name__)


class Wakeup:
    """Wakes every waiter at once; a waiter that comes after waits for the next wake.
    (Check what you wait for, then call wait(): it takes the event before any await.)"""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, timeout_s: float = KEEPALIVE_S) -> bool:
        """True when woken, False after `timeout_s` without."""
        event = self._event
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            return False
        return True


class Feed:
    def __init__(
        self, source: Source, every_s: float, on_over: Callable[[Feed], None] | None = None
    ) -> None:
        self.source = source
        self.every_s = every_s
        self.on_over = on_over  # called once the loop has stopped (no followers, or ended)
        self.followers = 0
        self.frame: bytes | None = None  # the newest
        self.ended = False  # the source said so: followers get the last frame, then stop
        self._changed = Wakeup()
        self._loop: asyncio.Task[None] | None = None

    async def follow(self) -> AsyncIterator[bytes]:
        """The newest frame whenever there is one, a comment every KEEPALIVE_S without,
        until the source ends."""
        self.followers += 1
        if not self.ended and (self._loop is None or self._loop.done()):
            self._loop = asyncio.create_task(self._run())
        try:
            sent: bytes | None = None
            while True:
                if self.frame is not None and self.frame is not sent:
                    sent = self.frame
                    yield sent
                if self.ended:
                    return
                if not await self._changed.wait():
                    yield b": keep-alive\n\n"
        finally:
            self.followers -= 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.followers > 0 and not self.ended:
                started = loop.time()
                try:
                    frame, ended = await self.source()
                except Exception:  # never leave the followers without a loop
                    log.exception("a feed's source failed")
                    frame, ended = None, False
                if frame is not None or ended:
                    if frame is not None:
                        self.frame = frame
                    self.ended = ended
                    self._changed.wake()
                if not ended:
                    await asyncio.sleep(max(self.every_s - (loop.time() - started), 0.05))
        finally:
            if self.on_over is not None:
                self.on_over(self)

    async def close(self) -> None:
        await stop_task(self._loop)
