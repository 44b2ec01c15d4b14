"""GET /v1/pool/events: the pool's document pushed to every open dashboard.

A poll of GET /v1/pool costs the web process a whole HTTP request each second per
dashboard; a stream costs it one write of bytes framed once for all. One loop reads
the PoolCache (so the orchestrators are still asked about once a second) while
anyone follows, frames the document as a `pool` event, and wakes every follower;
a follower too slow to read one gets the newest next, never a backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import sse
from .auth import require_token
from .jobs import KEEPALIVE_S
from .pool import POOL_MAX_AGE_S, PoolCache, PoolState, document_bytes, pool_cache

log = structlog.get_logger(__name__)


class PoolFeed:
    def __init__(
        self,
        cache: PoolCache,
        render: Callable[[PoolState], bytes],
        every_s: float = POOL_MAX_AGE_S,
    ) -> None:
        self.cache = cache
        self.render = render
        self.every_s = every_s
        self.followers = 0
        self.frame: bytes | None = None  # the newest `pool` event, framed
        self._changed = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    async def follow(self) -> AsyncIterator[bytes]:
        """The newest frame whenever there is one, a comment every KEEPALIVE_S without."""
        self.followers += 1
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._refresh_while_followed())
        try:
            sent: bytes | None = None
            while True:
                if self.frame is not None and self.frame is not sent:
                    sent = self.frame
                    yield sent
                changed = self._changed
                try:
                    async with asyncio.timeout(KEEPALIVE_S):
                        await changed.wait()
                except TimeoutError:
                    yield b": keep-alive\n\n"
        finally:
            self.followers -= 1

    async def _refresh_while_followed(self) -> None:
        taken = None
        while self.followers > 0:
            started = asyncio.get_running_loop().time()
            try:
                state = await self.cache.get()
                if state.taken != taken:
                    taken = state.taken
                    self.frame = b"event: pool\ndata: " + self.render(state) + b"\n\n"
                    changed, self._changed = self._changed, asyncio.Event()
                    changed.set()
            except Exception:  # never leave the dashboards without a loop
                log.exception("the pool's state could not be read")
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(self.every_s - elapsed, 0.05))

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop


def pool_feed(request: Request) -> PoolFeed:
    """The app's PoolFeed, made on first use (app.py closes it with the app)."""
    feed: PoolFeed | None = getattr(request.app.state, "pool_feed", None)
    if feed is None:
        feed = request.app.state.pool_feed = PoolFeed(pool_cache(request), document_bytes)
    return feed


async def pool_events(request: Request) -> Response:
    require_token(request)
    return sse.stream(pool_feed(request).follow())


def routes() -> list[BaseRoute]:
    return [Route("/v1/pool/events", pool_events, methods=["GET"])]


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/pool/events": {
        "get": {
            "summary": "Server-Sent Events: GET /v1/pool's document as a `pool` event, each "
            "time the pool's state is read (about once a second)",
            "responses": {
                "200": {
                    "description": "an event stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "401": {
                    "description": "a token is required, or it is not valid",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                },
            },
        }
    },
}
